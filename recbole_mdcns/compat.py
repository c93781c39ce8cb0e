"""Everything RecBole 1.2.1 needs to run on today's stack, in one place.

RecBole 1.2.1 predates NumPy 2, pandas 3, setuptools 81, torch 2.6 and hyperopt
0.2.7. The package's dependency pins (``numpy<2``, ``pandas<3``, ``setuptools<81``)
fix most breaks; this module checks those pins at import time (so a later upgrade
fails loudly instead of silently mis-remapping ``token_seq`` fields) and adds
the shims the pins cannot:

* RecBole saves checkpoints with ``pickle_protocol=4`` holding its ``Config``;
  torch >= 2.6 loads with ``weights_only=True``, which cannot read them, and
  ``weights_only=False`` would let a checkpoint run code. Every RecBole loader
  (its trainer's best model and resume, the models that load pre-trained
  weights, ``recbole.quick_start.load_data_and_model``, and the dataset and
  dataloader caches ``save_dataset`` / ``save_dataloaders`` write) reads through
  :func:`load_recbole_checkpoint` / :mod:`recbole_mdcns.safe_pickle` instead: the
  types RecBole's files hold, nothing else. ``torch`` and ``pickle`` themselves
  are untouched; the RecBole modules get stand-ins whose ``load`` is restricted.
* ``recbole.quick_start`` imports ``ray.tune`` at import time. If ray cannot be
  imported, a placeholder takes its place whose every use raises an error
  naming the original failure: training works, ray-based tuning fails clearly.
* ``recbole.model.sequential_recommender.sine`` calls ``torch.autograd.set_detect_anomaly(True)`` at
  import, and RecBole imports every sequential model whenever it builds one: anomaly mode (a debugging
  aid -- every autograd op records its stack, every backward checks for NaN) then slows every model's
  training in the process. The module is imported here with the mode kept as it was; imported by
  someone before this package, the mode is left on with a warning.
* hyperopt >= 0.2.7 samples with a ``numpy.random.Generator`` (``rng.integers``);
  RecBole's exhaustive search hands it a ``RandomState`` (RecBole issue #1868).
  ``recbole.trainer.hyper_tuning`` sees a ``numpy`` whose ``random.RandomState``
  gives the generator the installed hyperopt expects.
* RecBole's graph models (LightGCN, NGCF, NCL, SpectralCF, GCMC) fill their adjacency matrix with
  ``scipy.sparse.dok_matrix._update(dict)``, the ``dict.update`` of a ``dok_matrix`` that was a ``dict``
  subclass; scipy >= 1.13 keeps the entries in ``_dict`` instead and has no ``_update``
  (``AttributeError`` when the model is built). :func:`_restore_dok_update` gives it back, as the same
  unchecked update of the entries.
"""
from __future__ import annotations

import contextlib
import importlib
import pickle
import re
import sys
import types
import warnings
from logging import getLogger
from typing import Any, Iterator

import numpy
import pandas
import scipy.sparse
import torch
from recbole.config import Config

from recbole_mdcns import safe_pickle

_PINS = {"numpy": (numpy.__version__, 2), "pandas": (pandas.__version__, 3)}


def _check_pins() -> None:
    for name, (version, below) in _PINS.items():
        if int(version.split(".")[0]) >= below:
            raise ImportError(
                f"recbole_mdcns needs {name}<{below} for RecBole 1.2.1 (found {name} {version}); "
                f"run: pip install '{name}<{below}'"
            )


class _RayUnavailable(types.ModuleType):
    """Stands in for ``ray`` when it cannot be imported; any use re-raises why."""

    def __init__(self, error: BaseException) -> None:
        super().__init__("ray")
        self._error = error

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "tune":
            return self
        raise RuntimeError(
            "RecBole's hyper-parameter tuning needs ray, which failed to import "
            f"({type(self._error).__name__}: {self._error}). Install 'ray<=2.6.3' "
            "with 'setuptools<81' (ray 2.6 imports pkg_resources) and 'numpy<2'."
        )


def _guard_ray() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        try:
            import ray  # noqa: F401
            import ray.tune  # noqa: F401
        except Exception as error:  # any import-time failure of ray, reported on use
            for key in [k for k in sys.modules if k == "ray" or k.startswith("ray.")]:
                del sys.modules[key]
            sys.modules["ray"] = _RayUnavailable(error)


@contextlib.contextmanager
def _naming(source: Any) -> Iterator[None]:
    """Prefix a refusal with the file it came from, and say how to load a trusted file anyway."""
    try:
        yield
    except safe_pickle.UnsafePickleError as error:
        name = getattr(source, "name", source)
        raise safe_pickle.UnsafePickleError(
            f"{name}: {error}. Load a file you trust with torch.load(..., weights_only=False) / pickle.load"
        ) from None


def load_recbole_checkpoint(f: Any, map_location: Any = None) -> Any:
    """``torch.load`` of a checkpoint RecBole (or this plug-in) saved, through the restricted
    unpickler :mod:`recbole_mdcns.safe_pickle`: tensors, RecBole's ``Config`` and enums, numpy
    values and plain containers load; any other type raises ``safe_pickle.UnsafePickleError``
    naming it (``module.qualname``) before anything in the file is called."""
    with _naming(f):
        return torch.load(f, map_location=map_location, weights_only=False, pickle_module=safe_pickle)


class _TorchSafeLoad(types.ModuleType):
    """``torch`` as seen by RecBole's modules that load its checkpoints: ``load`` is restricted."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, map_location: Any = None) -> Any:
        return load_recbole_checkpoint(f, map_location=map_location)


class _PickleSafeLoad(types.ModuleType):
    """``pickle`` as seen by ``recbole.data.utils`` (dataset and dataloader caches): ``load`` is restricted."""

    def __init__(self) -> None:
        super().__init__("pickle")

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    @staticmethod
    def load(file: Any) -> Any:
        with _naming(file):
            return safe_pickle.load(file)


def load_data_and_model(model_file: str) -> tuple:
    """``recbole.quick_start.load_data_and_model``, reading ``model_file`` through
    :func:`load_recbole_checkpoint` (RecBole's imports ``torch`` inside the function, out of
    reach of a module stand-in): ``(config, model, dataset, train_data, valid_data, test_data)``; the
    validation and test loaders mask each row's prefix when the run had ``eval_mask_history: true``."""
    from recbole.data import create_dataset, data_preparation  # RecBole is imported after the pin checks
    from recbole.utils import get_model, init_logger, init_seed

    from recbole_mdcns.history_mask import mask_history

    checkpoint = load_recbole_checkpoint(model_file)
    config = checkpoint["config"]
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)

    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    valid_data, test_data = mask_history(config, train_data, valid_data, test_data)

    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data


def _hyperopt_wants_generator() -> bool:
    import hyperopt

    return tuple(int(part) for part in re.findall(r"\d+", hyperopt.__version__)[:3]) >= (0, 2, 7)


class _NumpyRandomForHyperopt(types.ModuleType):
    """``numpy.random`` whose ``RandomState(seed)`` is the generator the installed hyperopt samples with."""

    def __init__(self) -> None:
        super().__init__("numpy.random")

    def __getattr__(self, name: str) -> Any:
        return getattr(numpy.random, name)

    @staticmethod
    def RandomState(seed: Any = None) -> Any:  # noqa: N802 -- numpy's name
        return numpy.random.default_rng(seed) if _hyperopt_wants_generator() else numpy.random.RandomState(seed)


class _NumpyForHyperopt(types.ModuleType):
    """``numpy`` as seen by ``recbole.trainer.hyper_tuning`` (its exhaustive search's rng)."""

    def __init__(self) -> None:
        super().__init__("numpy")
        self.random = _NumpyRandomForHyperopt()

    def __getattr__(self, name: str) -> Any:
        return getattr(numpy, name)


# RecBole modules that torch.load checkpoints RecBole saved (its Config pickled inside):
# the trainer (best model, resume) and the models that load their pre-trained weights.
_LOADS_RECBOLE_CHECKPOINTS = (
    "recbole.trainer.trainer",
    "recbole.model.sequential_recommender.s3rec",
    "recbole.model.general_recommender.convncf",
    "recbole.model.general_recommender.nais",
    "recbole.model.general_recommender.neumf",
    "recbole.model.general_recommender.ract",
    "recbole.model.context_aware_recommender.kd_dagfm",
)


def _keep_anomaly_mode_off() -> None:
    """Import RecBole's SINE module without letting it switch on autograd anomaly detection."""
    name = "recbole.model.sequential_recommender.sine"
    if name in sys.modules:
        if torch.is_anomaly_enabled():
            warnings.warn(f"{name} switched on torch.autograd anomaly detection when it was imported (before "
                          "recbole_mdcns), which slows every backward pass; call "
                          "torch.autograd.set_detect_anomaly(False) unless you want it", stacklevel=3)
        return
    enabled, check_nan = torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()
    try:
        importlib.import_module(name)
    finally:
        torch.autograd.set_detect_anomaly(enabled, check_nan)


def _dok_update(self: scipy.sparse.dok_matrix, entries: dict) -> None:
    """``dok_matrix._update`` as scipy < 1.13 had it: set the ``(row, col) -> value`` entries, unchecked."""
    self._dict.update(entries)


def _restore_dok_update() -> None:
    """Give scipy >= 1.13's ``dok_matrix`` the ``_update`` RecBole's graph models call (module docstring)."""
    if not hasattr(scipy.sparse.dok_matrix, "_update"):
        scipy.sparse.dok_matrix._update = _dok_update


def apply() -> None:
    """Check the pins and install the shims; idempotent."""
    _check_pins()
    _restore_dok_update()
    _keep_anomaly_mode_off()
    if "ray" not in sys.modules:
        _guard_ray()
    for name in _LOADS_RECBOLE_CHECKPOINTS:
        module = importlib.import_module(name)
        if not isinstance(module.torch, _TorchSafeLoad):
            module.torch = _TorchSafeLoad()
    importlib.import_module("recbole.data.utils").pickle = _PickleSafeLoad()
    for name in ("recbole.quick_start", "recbole.quick_start.quick_start"):  # after the ray guard: imports ray.tune
        importlib.import_module(name).load_data_and_model = load_data_and_model
    importlib.import_module("recbole.trainer.hyper_tuning").np = _NumpyForHyperopt()
    # RecBole's metrics use np.float etc., which RecBole only restores when a Config is built -- a process
    # that only loads a checkpoint (load_data_and_model, then evaluate) would fail in NDCG without this.
    Config.compatibility_settings(None)
