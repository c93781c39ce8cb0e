"""RecBole's own keys under a sampler: none is silently ignored.

Every key RecBole 1.2.1's ``Trainer`` and its sequential models read is either honoured as
RecBole honours it, mapped onto its PyTorch Lightning counterpart, refused with an error naming
what to set instead, or warned about once (docs/usage.md, "RecBole keys with a sampler"). Only keys the
user set -- config files, ``config_dict``, command line -- are refused or warned about; RecBole's
and this package's defaults never are. Everything here runs before any data is loaded.
"""
from __future__ import annotations

import sys
import warnings

from pytorch_lightning.utilities.rank_zero import rank_zero_only
from recbole.config import Config

# RecBole's own multi-process start-up (``run_recboles``); Lightning owns distributed training here.
# ``local_rank`` alone makes RecBole's Config open an NCCL process group, so these are checked
# before a Config is built.
DISTRIBUTED_KEYS = ("nproc", "world_size", "local_rank", "ip", "port", "offset")
# The arguments of torch.nn.utils.clip_grad_norm_, which RecBole calls with ``**clip_grad_norm``.
CLIP_ARGUMENTS = ("max_norm", "norm_type", "error_if_nonfinite", "foreach")
# Keys a RecBole model reads only for terms of its own ``calculate_loss`` (BERT4Rec: for the Cloze
# samples of its ``mask_itemseq`` transform), which the sampler's loss (``neg_loss`` over the sampled
# negatives) replaces. TransRec's regulariser has no key; HRM reads reg_weight and never uses it.
LOSS_ONLY_KEYS = {
    "Caser": ("reg_weight",),
    "FOSSIL": ("reg_weight",),
    "GCSAN": ("reg_weight",),
    "HGN": ("reg_weight",),
    "NextItNet": ("reg_weight",),
    "SHAN": ("reg_weight",),
    "SINE": ("reg_loss_ratio",),
    "FEARec": ("contrast", "lmd", "lmd_sem", "tau", "sim", "fredom", "fredom_type"),
    "BERT4Rec": ("mask_ratio", "ft_ratio"),
}
# RecBole's autocast dtype per device (torch.autocast's default): float16 on CUDA, bfloat16 on CPU.
AMP_PRECISION = {"cpu": "bf16-mixed", "gpu": "16-mixed"}


class RecBoleKeyWarning(UserWarning):
    """A RecBole key the user set that a sampler run does not use."""


def user_settings(config_file_list=None, config_dict=None) -> dict:
    """The settings the user gave -- ``config_file_list``, ``config_dict``, the command line -- parsed
    and merged as RecBole's ``Config`` does (command line > dict > files), without RecBole's defaults."""
    parser = Config.__new__(Config)  # RecBole's own parsers, without building a config
    parser.yaml_loader = parser._build_yaml_loader()
    settings = parser._load_config_files(config_file_list)
    settings.update(parser._load_variable_config_dict(dict(config_dict or {})))
    command_line = dict(arg[2:].split("=") for arg in sys.argv[1:] if arg.startswith("--") and arg.count("=") == 1)
    settings.update(parser._convert_config_dict(command_line))
    return settings


def check_distributed_keys(user: dict) -> None:
    """RecBole's DDP keys are refused: Lightning starts the processes (``devices``, ``strategy``, ``num_nodes``)."""
    given = [key for key in DISTRIBUTED_KEYS if key in user]
    if given:
        raise ValueError(
            f"{', '.join(given)}: RecBole's own multi-process start-up is not used with a sampler; PyTorch Lightning "
            "starts the processes: set devices (processes per node, e.g. devices: 2), strategy (e.g. ddp) and "
            "num_nodes (and accelerator: cpu for CPU DDP); Lightning reads the node rank and address from its "
            "launcher's environment (MASTER_ADDR, MASTER_PORT, NODE_RANK)")


def audit(config: Config, user: dict) -> None:
    """Check, map or warn about every RecBole trainer and model key ``user`` set (see the module docstring).

    Errors are ``ValueError`` naming the key and what to set instead; warnings are one
    :class:`RecBoleKeyWarning` per key, on rank 0.
    """
    check_distributed_keys(user)
    _check_train_neg_sample_args(config, user)
    _check_clip_grad_norm(config)
    _map_mixed_precision(config, user)
    _check_gpu_ids(config)
    _warn_loss_only_keys(config, user)


def _check_train_neg_sample_args(config: Config, user: dict) -> None:
    args = config["train_neg_sample_args"] or {}
    if "train_neg_sample_args" not in user or args.get("distribution", "none") == "none":
        return
    k = " and neg_num (K, how many negatives each row trains on)" if "neg_num" in config else ""
    raise ValueError(
        f"train_neg_sample_args is RecBole's own negative sampling (its sample_num would also shrink the training "
        f"batches); with neg_sampler={config['neg_sampler']} the negatives come from a candidate pool: set "
        f"candidate_num (N), candidate_distribution (uniform | popularity){k} instead, and remove "
        "train_neg_sample_args (or set it to ~). RecBole's own pipeline, its dynamic DNS included, is neg_sampler: "
        "recbole")


def _check_clip_grad_norm(config: Config) -> None:
    clip = config["clip_grad_norm"]
    if clip is None:
        return
    if not isinstance(clip, dict) or "max_norm" not in clip or set(clip) - set(CLIP_ARGUMENTS):
        raise ValueError(
            f"clip_grad_norm must be a dict of torch.nn.utils.clip_grad_norm_ arguments with max_norm, keys from "
            f"{list(CLIP_ARGUMENTS)} (e.g. {{max_norm: 5, norm_type: 2}}), got {clip!r}")


def _map_mixed_precision(config: Config, user: dict) -> None:
    """``enable_amp`` -> Lightning's ``precision`` (RecBole's autocast dtype for the device); a gradient
    scaler comes with ``16-mixed`` on a GPU, so ``enable_scaler`` is honoured only there and with AMP."""
    amp, scaler = bool(config["enable_amp"]), bool(config["enable_scaler"])
    if scaler and not amp:
        raise ValueError("enable_scaler: True scales the gradients of mixed-precision training; set enable_amp: True "
                         "as well (precision 16-mixed on a GPU, which uses a gradient scaler), or precision directly")
    if not amp:
        return
    mapped = AMP_PRECISION["cpu" if config["accelerator"] == "cpu" else "gpu"]
    if "precision" in user and str(config["precision"]) != mapped:
        raise ValueError(f"enable_amp: True means precision: {mapped} on accelerator {config['accelerator']}, but "
                         f"precision: {config['precision']} is set too; set one of them")
    config["precision"] = mapped
    if mapped == "16-mixed" and "enable_scaler" in user and not scaler:
        _warn("enable_scaler: False is not honoured: Lightning's precision 16-mixed always scales the gradients "
              "(a scaler only guards float16 gradients against underflow)")


def _check_gpu_ids(config: Config) -> None:
    """RecBole makes only the GPUs in ``gpu_id`` visible (CUDA_VISIBLE_DEVICES), so ``devices`` must fit in it."""
    devices, visible = config["devices"], [g for g in str(config["gpu_id"] or "").split(",") if g.strip()]
    if config["accelerator"] in ("gpu", "cuda") and isinstance(devices, int) and devices > len(visible):
        raise ValueError(
            f"devices: {devices} needs {devices} GPUs, but gpu_id: {config['gpu_id']!r} makes only {len(visible)} "
            f"visible (RecBole sets CUDA_VISIBLE_DEVICES from it); set gpu_id: "
            f"'{','.join(str(i) for i in range(devices))}' or fewer devices")


def _warn_loss_only_keys(config: Config, user: dict) -> None:
    models = dict.fromkeys(m for m in (config["model"], config["mdcns_peer_model"]) if isinstance(m, str))
    for model in models:
        for key in LOSS_ONLY_KEYS.get(model, ()):
            if key in user:
                _warn(f"{key} is not used: it serves only {model}'s own training loss (RecBole's calculate_loss), "
                      f"and neg_sampler={config['neg_sampler']} trains {model} on its loss over the sampled "
                      f"negatives (neg_loss: {config['neg_loss']})")


def _warn(message: str) -> None:
    if rank_zero_only.rank == 0:
        warnings.warn(message, RecBoleKeyWarning, stacklevel=3)
