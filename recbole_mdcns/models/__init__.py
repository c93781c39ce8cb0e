"""Models this package (or a user) adds to RecBole, found by name as RecBole's own are.

:func:`register_model` makes a model class reachable by ``--model=NAME``, by
``mdcns_peer_model: NAME`` and by RecBole's own ``get_model`` -- hence by
``recbole.quick_start.run_recbole`` and ``load_data_and_model`` -- once
``recbole_mdcns`` is imported (:func:`install_hook`, run by the package). A model's
YAML defaults (``config_file``) are merged where RecBole merges
``properties/model/<Model>.yaml``: after ``overall.yaml``, before the dataset's and
the model type's defaults, under the user's values.

An unknown model name is a ``ValueError`` naming the key ``model`` and the available
models (RecBole 1.2.1 itself answers ``No module named 'lightgbm'``: it imports its
``exlib_recommender`` package while searching).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass

import recbole.config.configurator as recbole_configurator
import recbole.quick_start.quick_start as recbole_quick_start
import recbole.utils as recbole_utils
import recbole.utils.utils as recbole_utils_utils
from recbole.config import Config
from recbole.model.abstract_recommender import AbstractRecommender
from recbole.utils import ModelType

# RecBole's model packages, searched in its own order; exlib_recommender (XGBoost, LightGBM) last and
# only if its optional libraries import.
_RECBOLE_PACKAGES = ("general_recommender", "context_aware_recommender", "sequential_recommender",
                     "knowledge_aware_recommender", "exlib_recommender")
_RECBOLE_MODEL_YAMLS = os.path.join(os.path.dirname(recbole_configurator.__file__), "..", "properties", "model")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cls: type
    config_file: str | None


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, cls: type | None = None, *, config_file: str | None = None):
    """Make model class ``cls`` available as ``name`` wherever RecBole takes a model name; returns ``cls``
    (usable as ``@register_model(name)``). ``cls`` must be a RecBole ``AbstractRecommender`` subclass whose
    ``__name__`` is ``name`` (RecBole's ``Config`` names models by class). A name RecBole already uses, or
    one registered by another class, is an error."""
    if cls is None:
        return lambda klass: register_model(name, klass, config_file=config_file)
    if not (isinstance(cls, type) and issubclass(cls, AbstractRecommender)):
        raise TypeError(f"register_model({name!r}, ...): {cls!r} is not a RecBole model "
                        "(a subclass of recbole.model.abstract_recommender.AbstractRecommender)")
    if cls.__name__ != name:
        raise ValueError(f"register_model({name!r}, ...): the class is called {cls.__name__!r}; "
                         "RecBole names a model by its class, so register it under that name")
    if config_file is not None and not os.path.isfile(config_file):
        raise ValueError(f"register_model({name!r}, ...): config_file {config_file!r} does not exist")
    taken = _MODELS.get(name)
    if taken is not None:
        if taken.cls is cls:
            return cls
        raise ValueError(f"model name {name!r} is already registered by {taken.cls.__module__}.{taken.cls.__qualname__}")
    if _recbole_model(name) is not None:
        raise ValueError(f"model name {name!r} is one of RecBole's own models; choose another name")
    _MODELS[name] = ModelEntry(name, cls, config_file)
    return cls


def _recbole_model(name: str) -> type | None:
    """RecBole's built-in model class ``name``, or ``None``."""
    if not isinstance(name, str) or not name.isidentifier():
        return None
    for package in _RECBOLE_PACKAGES:
        try:
            if importlib.util.find_spec(f"recbole.model.{package}.{name.lower()}") is None:
                continue
            module = importlib.import_module(f"recbole.model.{package}.{name.lower()}")
        except ImportError:  # exlib_recommender without xgboost / lightgbm
            continue
        model = getattr(module, name, None)
        if isinstance(model, type):
            return model
    return None


def available_models() -> list[str]:
    """RecBole's model names (one YAML per model in its ``properties/model``) and the registered ones."""
    recbole_names = [os.path.splitext(f)[0] for f in os.listdir(_RECBOLE_MODEL_YAMLS) if f.endswith(".yaml")]
    return sorted({*recbole_names, *_MODELS})


def get_model(name: str) -> type:
    """The model class called ``name``: a registered one, else RecBole's; ``ValueError`` naming ``model``
    and the available models otherwise. Installed in place of RecBole's ``get_model``."""
    if name in _MODELS:
        return _MODELS[name].cls
    model = _recbole_model(name)
    if model is None:
        raise ValueError(f"model must be one of {available_models()}, got {name!r}")
    return model


def sequential_model_class(name) -> type | None:
    """The sequential model class called ``name`` (registered or RecBole's), or ``None``."""
    try:
        model = get_model(name) if isinstance(name, str) else None
    except ValueError:
        return None
    return model if getattr(model, "type", None) == ModelType.SEQUENTIAL else None


def registered_models() -> dict[str, type]:
    """The registered model classes by name."""
    return {name: entry.cls for name, entry in _MODELS.items()}


def model_config_file(name: str) -> str | None:
    """The YAML defaults of a registered model, or ``None``."""
    entry = _MODELS.get(name)
    return entry.config_file if entry else None


_original_load_internal = Config._load_internal_config_dict


def _load_internal_config_dict(self, model, model_class, dataset):
    """RecBole's internal defaults, with a registered model's YAML merged where RecBole merges its
    own ``properties/model/<Model>.yaml`` (right before ``properties/dataset/sample.yaml``)."""
    extra = model_config_file(model)
    if extra is None:
        return _original_load_internal(self, model, model_class, dataset)
    update = self._update_internal_config_dict

    def update_with_model_defaults(file):
        if os.path.basename(file) == "sample.yaml":
            update(extra)
        return update(file)

    self._update_internal_config_dict = update_with_model_defaults
    try:
        return _original_load_internal(self, model, model_class, dataset)
    finally:
        del self._update_internal_config_dict


def install_hook() -> None:
    """Route RecBole's model lookups through :func:`get_model` and register this package's models (idempotent)."""
    _register_builtin_models()
    for module in (recbole_utils, recbole_utils_utils, recbole_configurator, recbole_quick_start):
        module.get_model = get_model
    Config._load_internal_config_dict = _load_internal_config_dict


def _register_builtin_models() -> None:
    from recbole_mdcns.config import packaged_yaml
    from recbole_mdcns.models.gru4rec_right_aligned import GRU4RecRightAligned
    from recbole_mdcns.models.mamba4rec import Mamba4Rec
    from recbole_mdcns.models.sasrec_right_aligned import SASRecRightAligned

    register_model("Mamba4Rec", Mamba4Rec, config_file=packaged_yaml("models/Mamba4Rec"))
    register_model("SASRecRightAligned", SASRecRightAligned,
                   config_file=os.path.join(_RECBOLE_MODEL_YAMLS, "SASRec.yaml"))  # SASRec's own defaults
    register_model("GRU4RecRightAligned", GRU4RecRightAligned,
                   config_file=os.path.join(_RECBOLE_MODEL_YAMLS, "GRU4Rec.yaml"))
