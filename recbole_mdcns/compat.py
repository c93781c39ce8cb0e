"""Everything RecBole 1.2.1 needs to run on today's stack, in one place.

RecBole 1.2.1 predates NumPy 2, pandas 3, setuptools 81 and torch 2.6. The
package's dependency pins (``numpy<2``, ``pandas<3``, ``setuptools<81``) fix
most breaks; this module checks those pins at import time (so a later upgrade
fails loudly instead of silently mis-remapping ``token_seq`` fields) and adds
the two shims the pins cannot:

* RecBole saves checkpoints with ``pickle_protocol=4`` holding its ``Config``;
  torch >= 2.6 loads with ``weights_only=True`` and refuses them. The RecBole
  modules that load such checkpoints (its trainer; S3Rec and the other models
  that load pre-trained weights) get a ``torch`` whose ``load`` defaults to
  ``weights_only=False`` (these are the user's own checkpoints); ``torch``
  itself is untouched.
* ``recbole.quick_start`` imports ``ray.tune`` at import time. If ray cannot be
  imported, a placeholder takes its place whose every use raises an error
  naming the original failure: training works, ray-based tuning fails clearly.
"""
from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

import numpy
import pandas
import torch

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


class _TorchTrustedLoad(types.ModuleType):
    """``torch`` as seen by RecBole's trainer: ``load`` reads its own checkpoints."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("weights_only", False)
        return torch.load(f, *args, **kwargs)


# RecBole modules that torch.load checkpoints RecBole itself saved (its Config pickled inside):
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


def apply() -> None:
    """Check the pins and install the shims; idempotent."""
    _check_pins()
    if "ray" not in sys.modules:
        _guard_ray()
    for name in _LOADS_RECBOLE_CHECKPOINTS:
        module = importlib.import_module(name)
        if not isinstance(module.torch, _TorchTrustedLoad):
            module.torch = _TorchTrustedLoad()
