"""RecBole ``Config`` plus per-sampler defaults, and validation before any data is loaded."""
from __future__ import annotations

import math
import numbers
import os
from importlib import resources
from logging import getLogger
from pathlib import Path

import torch
import yaml
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from recbole.config import Config
from recbole.utils import ModelType

from recbole_mdcns import eval_prefixes, history_mask
from recbole_mdcns.benchmark_files import check_benchmark_config
from recbole_mdcns.data import CANDIDATE_EXCLUDE
from recbole_mdcns.full_sequence import TRAIN_POSITIONS
from recbole_mdcns.general import GENERAL_MODELS, unsupported_model_message
from recbole_mdcns.recbole_keys import audit, check_distributed_keys, user_settings
from recbole_mdcns.registry import available_samplers, get_sampler

NEG_LOSSES = ("bpr", "bce", "softmax")
CANDIDATE_DISTRIBUTIONS = ("uniform", "popularity")
# A general model's full-sort evaluation batch with fewer users than FEW_EVAL_USERS, over more than MANY_EVAL_BATCHES
# batches: a validation >= 1.4x its time at EVAL_USERS a batch, ~1 ms a batch more (BPR-MF and LightGCN on Amazon
# Beauty, benchmarks/studies/general_eval_batch.md)
FEW_EVAL_USERS, MANY_EVAL_BATCHES, EVAL_USERS = 16, 1000, 256
# No sampled-negative (BPR) mode in RecBole: DIN, DIEN, RepeatNet are point-wise,
# CORE is CE-only, the CPR models exit when given BPR.
NO_BPR_MODELS = ("DIN", "DIEN", "CORE", "RepeatNet", "GRU4RecCPR", "SASRecCPR")


def packaged_yaml(name: str) -> str:
    """Path of ``config_yamls/<name>.yaml`` (``dns``, ``models/Mamba4Rec``, ``presets/...``): installed with
    the package, or in a source checkout."""
    try:
        folder = resources.files("recbole_mdcns.config_yamls")
    except ModuleNotFoundError:  # imported from a checkout, where config_yamls/ sits beside the package
        folder = Path(__file__).resolve().parent.parent / "config_yamls"
    return str(folder.joinpath(f"{name}.yaml"))


def available_presets() -> list[str]:
    """Names of the packaged presets (``config_yamls/presets/*.yaml``)."""
    return sorted(path.stem for path in Path(packaged_yaml("presets/_")).parent.glob("*.yaml"))


def preset_yaml(name: str) -> str:
    """Path of ``config_yamls/presets/<name>.yaml``, a ready-made configuration to pass as ``--config_files``
    (``python -m recbole_mdcns --preset NAME``); ``ValueError`` naming the presets for another name."""
    if name not in available_presets():
        raise ValueError(f"preset must be one of {available_presets()}, got {name!r}")
    return packaged_yaml(f"presets/{name}")


def create_config(model=None, dataset=None, config_file_list=None, config_dict=None) -> Config:
    """RecBole's ``Config`` with the chosen sampler's defaults merged under the user's values.

    Without ``neg_sampler`` (or with ``neg_sampler: recbole``) this is RecBole's
    own ``Config``, untouched but for ``load_col`` (:func:`check_time_column`).
    """
    files = list(config_file_list or [])
    user = user_settings(files, config_dict)
    name = user.get("neg_sampler")
    if name in (None, "recbole", "None"):
        config = Config(model=model, dataset=dataset, config_file_list=files, config_dict=config_dict)
        config["neg_sampler"] = "recbole"
        if config["train_positions"] not in (None, "last"):
            raise ValueError(f"train_positions: {config['train_positions']} needs one of this package's samplers "
                             f"(neg_sampler one of {available_samplers()[1:]}); neg_sampler=recbole runs RecBole's "
                             "own trainer, which trains prefix rows")
        check_time_column(config, user)
        if config[history_mask.KEY] is not None or config[history_mask.SCORE_KEY] is not None:
            # this package's loaders (and trainer class) mask RecBole's own trainer's evaluation too
            history_mask.check_config(config)
            check_benchmark_config(config)
        return config
    sampler = get_sampler(name)  # ValueError naming neg_sampler and the registered samplers
    check_distributed_keys(user)  # before RecBole's Config, which would open its own process group
    defaults = [packaged_yaml("base"), *([sampler.config_file] if sampler.config_file else [])]
    config = Config(model=model, dataset=dataset, config_file_list=defaults + files, config_dict=config_dict)
    _resolve_device(config)
    validate(config, user)
    return config


def _check_choice(config: Config, key: str, choices) -> None:
    if config[key] not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {config[key]!r}")


def check_number(config: Config, key: str, low: float, high: float = math.inf, integer: bool = False,
                 low_open: bool = False):
    """``config[key]``, checked to be a number (an int if ``integer``) in ``[low, high]`` (``(low, high]``
    if ``low_open``); else ``ValueError`` naming the key and the range. With ``integer``, a whole
    number of another type (hyperopt's ``quniform`` gives ``100.0``) is stored back as an ``int``."""
    value = config[key]
    if integer and isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        value = config[key] = int(value)
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    bracket = "(" if low_open else "["
    if isinstance(value, bool) or not ok_type or not (low < value if low_open else low <= value) or value > high:
        raise ValueError(f"{key} must be {kind} in {bracket}{low}, {high}], got {value!r}")
    return value


def check_bool(config: Config, key: str) -> bool:
    """``config[key]``, checked to be ``true`` or ``false``; else ``ValueError`` naming the key."""
    if not isinstance(config[key], bool):
        raise ValueError(f"{key} must be true or false, got {config[key]!r}")
    return config[key]


def require_one(config: Config, key: str, sampler: str, why: str, hint: str = "") -> None:
    """``ValueError`` unless ``config[key]`` is 1 (a sampler's ``top_m`` or ``neg_num``), naming the key, the
    sampler and why it needs 1; ``hint`` is appended to the message."""
    if config[key] != 1:
        raise ValueError(f"{key} must be 1 for neg_sampler={sampler} ({why}), got {config[key]!r}{hint}")


def validate(config: Config, user: dict) -> None:
    """Check every sampler key, and every RecBole key the user set (``user``: their own settings,
    :func:`recbole_mdcns.recbole_keys.user_settings`, without the packaged defaults the config also
    holds); raises ``ValueError`` naming the key and its valid values."""
    if config["MODEL_TYPE"] == ModelType.GENERAL:
        _check_general(config)
    elif config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        raise ValueError(unsupported_model_message(config["model"]))
    if config["model"] in NO_BPR_MODELS:
        raise ValueError(
            f"model {config['model']} has no sampled-negative (BPR) mode in RecBole; "
            f"use neg_sampler=recbole for it, or another model (not one of {list(NO_BPR_MODELS)})"
        )
    if config["loss_type"] != "BPR":
        raise ValueError(
            f"neg_sampler={config['neg_sampler']} trains on sampled negatives: loss_type must be 'BPR' "
            f"(got {config['loss_type']!r}); choose the loss over negatives with neg_loss, one of {list(NEG_LOSSES)}"
        )
    if config["model"] == "S3Rec" and config["train_stage"] != "finetune":
        raise ValueError(
            f"S3Rec with neg_sampler={config['neg_sampler']} fine-tunes: train_stage must be 'finetune' "
            f"(got {config['train_stage']!r}); pre-train with neg_sampler=recbole, then pass pre_model_path"
        )
    _check_choice(config, "neg_loss", NEG_LOSSES)
    _check_choice(config, "candidate_distribution", CANDIDATE_DISTRIBUTIONS)
    _check_choice(config, "candidate_exclude", CANDIDATE_EXCLUDE)
    check_bool(config, "candidate_distinct")
    module = get_sampler(config["neg_sampler"]).cls
    if config["candidate_exclude"] == "row" and module.user_state_why:
        raise ValueError(f"candidate_exclude: row leaves a user's other items in a row's pool, but "
                         f"neg_sampler={config['neg_sampler']} {module.user_state_why}: an item kept for one row "
                         f"could be another row's target; use candidate_exclude: user with it")
    draws_pool = module.draws_pool  # False: the sampler checks its pool keys
    if draws_pool:
        check_number(config, "candidate_num", 1, integer=True)
        check_number(config, "top_m", 1, config["candidate_num"], integer=True)
    _check_positions(config)
    if config["torch_threads"] is not None:
        check_number(config, "torch_threads", 1, integer=True)
    check_number(config, "neg_num", 1, integer=True)
    history_mask.check_config(config)
    eval_prefixes.check_config(config)
    if draws_pool and config["neg_num"] > config["candidate_num"]:
        raise ValueError(f"neg_num must be <= candidate_num (each row's neg_num negatives come from its pool of "
                         f"candidate_num items), got neg_num={config['neg_num']}, "
                         f"candidate_num={config['candidate_num']}")
    audit(config, user)
    check_benchmark_config(config)
    parts = [f".{part}" for part in config["benchmark_filename"] or []] or [""]
    for inter in (os.path.join(config["data_path"], f"{config['dataset']}{part}.inter") for part in parts):
        if not os.path.isfile(inter):
            raise ValueError(
                f"dataset {config['dataset']!r} not found: no atomic file {inter}; set data_path to the folder that "
                "holds <dataset>/<dataset>.inter (or the benchmark_filename parts; ml-100k ships with RecBole)"
            )
    check_time_column(config, user)
    module.validate_config(config)


def _check_general(config: Config) -> None:
    """A general model: one of :data:`~recbole_mdcns.general.GENERAL_MODELS`, a sampler that trains them,
    prefix rows, and faiss for NCL (its ``e_step`` clusters with it)."""
    name, sampler = config["model"], config["neg_sampler"]
    if name not in GENERAL_MODELS:
        raise ValueError(unsupported_model_message(name))
    if not get_sampler(sampler).cls.general_models:
        general = [s for s in available_samplers()[1:] if get_sampler(s).cls.general_models]
        raise ValueError(f"neg_sampler={sampler} works with RecBole's sequential models only "
                         f"({get_sampler(sampler).cls.general_models_why}); for the general model {name} use one "
                         f"of {general}")
    for key, value in (("train_positions", "last"), ("candidate_exclude", "user")):
        if config[key] != value:
            raise ValueError(f"{key} must be '{value}' for the general model {name} (its rows are (user, item) "
                             f"interactions, there is no sequence), got {config[key]!r}")
    if name == "NCL":
        try:
            import faiss  # noqa: F401  (RecBole's NCL.e_step clusters with faiss.Kmeans)
        except ImportError as error:
            raise ValueError("model NCL needs faiss for its e_step (RecBole clusters users and items with "
                             "faiss.Kmeans): pip install faiss-cpu (or recbole-mdcns[ncl])") from error


def _inter_fields(config: Config) -> list[str]:
    """Field names in the header (first line) of ``<dataset>.inter``, read as RecBole reads it (``field_separator``,
    ``encoding``); empty when there is no such file (RecBole reports that itself)."""
    path = os.path.join(config["data_path"], f"{config['dataset']}.inter")
    if not os.path.isfile(path):
        return []
    with open(path, encoding=config["encoding"]) as f:
        header = f.readline().rstrip("\r\n")
    return [column.split(":")[0] for column in header.split(config["field_separator"])]


def check_time_column(config: Config, user: dict) -> None:
    """A sequential model's dataset orders each user's interactions by ``TIME_FIELD``, so ``load_col`` must load
    it when the ``.inter`` file has it. RecBole's default ``load_col`` (``inter: [user_id, item_id]`` for a
    dataset without its own YAML) does not: when the user did not set ``load_col`` (``user``: their own settings,
    :func:`recbole_mdcns.recbole_keys.user_settings`), the field is added and a warning logged; a ``load_col``
    the user set without it is a ``ValueError`` naming the fix, before any data is loaded. Other models, an
    ``.inter`` without the field, a ``load_col`` that loads every column, and ``benchmark_filename`` parts (already
    split, so never ordered by time) are left to RecBole."""
    time_field, load_col = config["TIME_FIELD"], config["load_col"]
    if (config["MODEL_TYPE"] != ModelType.SEQUENTIAL or not time_field or not isinstance(load_col, dict)
            or config["benchmark_filename"]):
        return
    columns = load_col.get("inter") or []
    if columns == "*" or time_field in columns or time_field not in _inter_fields(config):
        return
    fixed = {**load_col, "inter": [*(columns or [config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]]), time_field]}
    if "load_col" in user:
        fix = yaml.safe_dump({"load_col": fixed}, default_flow_style=True, sort_keys=False, width=math.inf)
        raise ValueError(
            f"load_col must load {time_field} (TIME_FIELD) from {config['dataset']}.inter: {config['model']} is a "
            f"sequential model, whose dataset orders each user's interactions by it; got load_col: {load_col}. "
            f"Add it to the inter columns: {fix.strip()[1:-1]}")
    config["load_col"] = fixed
    if rank_zero_only.rank == 0:
        getLogger().warning(f"load_col: added {time_field} (TIME_FIELD) to RecBole's default inter columns, as "
                            f"{config['model']} is a sequential model, whose dataset orders each user's "
                            f"interactions by it: load_col = {fixed}")


def _check_positions(config: Config) -> None:
    _check_choice(config, "train_positions", TRAIN_POSITIONS)
    if config["train_window_stride"] is not None:
        check_number(config, "train_window_stride", 1, config["MAX_ITEM_LIST_LENGTH"], integer=True)
    transform = config.external_config_dict.get("transform")  # one the user set (BERT4Rec's own is its default)
    if config["train_positions"] == "all" and transform:
        raise ValueError(f"train_positions: all trains RecBole's rows as user windows and cannot apply the sequence "
                         f"transform {transform!r}; set transform: ~ or train_positions: last")


def check_catalogue(config: Config, dataset) -> None:
    """Checks that need the item count: the pool must fit in the catalogue (and :func:`warn_few_eval_users`)."""
    warn_few_eval_users(config, dataset)
    if config["neg_sampler"] == "recbole":
        return
    n_items = dataset.item_num - 1
    if config["candidate_num"] > n_items:
        raise ValueError(
            f"candidate_num must be in [1, {n_items}] (the number of items in {config['dataset']}), "
            f"got {config['candidate_num']}"
        )
    clustered = min(dataset.user_num, dataset.item_num)
    if config["model"] == "NCL" and not 1 <= config["num_clusters"] <= clustered:
        raise ValueError(f"num_clusters must be in [1, {clustered}] for NCL on {config['dataset']} (its e_step clusters "
                         f"the users and the items into num_clusters prototypes each), got {config['num_clusters']}")


def warn_few_eval_users(config: Config, dataset) -> None:
    """Warn when RecBole's full-sort evaluation of a general model scores fewer than :data:`FEW_EVAL_USERS` users a
    batch in more than :data:`MANY_EVAL_BATCHES` batches: for these models RecBole's ``eval_batch_size`` counts
    user x item scores, ``eval_batch_size // item_num`` users a batch (at least one), not users; the metrics do not
    depend on it."""
    modes = config["eval_args"]["mode"]
    users = max(config["eval_batch_size"] // dataset.item_num, 1)
    if (config["MODEL_TYPE"] == ModelType.SEQUENTIAL or "full" not in modes.values() or users >= FEW_EVAL_USERS
            or dataset.user_num / users <= MANY_EVAL_BATCHES or rank_zero_only.rank != 0):
        return
    scores = EVAL_USERS * dataset.item_num
    getLogger().warning(
        f"eval_batch_size: {config['eval_batch_size']} scores {users} user(s) a batch in RecBole's full-sort "
        f"evaluation of the general model {config['model']} (eval_batch_size counts user x item scores there: "
        f"eval_batch_size // {dataset.item_num} items); one validation of Amazon Beauty took 6-7x as long at one user "
        f"a batch as at {EVAL_USERS}. eval_batch_size: {scores} scores {EVAL_USERS} users a batch "
        f"({scores * 4 / 2 ** 20:.0f} MiB of float32 scores); the metrics are the same")


def _resolve_device(config: Config) -> None:
    """One device for Lightning and RecBole's evaluation. ``accelerator: auto`` means the GPU
    only when RecBole would use one (``gpu_id`` non-empty, CUDA present) and ``use_gpu`` is not False."""
    accelerator = config["accelerator"]
    if accelerator == "auto":
        cuda = config["device"].type == "cuda" and config["use_gpu"] is not False
        accelerator = "gpu" if cuda else "cpu"
    config["accelerator"] = accelerator
    config["use_gpu"] = accelerator != "cpu"  # RecBole's trainer and environment table read it
    config["device"] = torch.device("cpu" if accelerator == "cpu" else "cuda")
