"""The ``neg_sampler`` registry: name -> sampler class (a LightningModule) and its YAML defaults.

Built-in samplers register themselves when :mod:`recbole_mdcns.methods` is imported (the
package's ``__init__`` does it); a user registers their own with :func:`register_sampler`
(a call or a decorator, as timm's ``register_model``), and an installed package through the
entry-point group :data:`ENTRY_POINT_GROUP`::

    [project.entry-points."recbole_mdcns.samplers"]
    my_sampler = "my_package.sampling:MySampler"   # a class; its ``config_file`` attribute, if any,
                                                   # names its YAML defaults

The core (config, trainer) looks samplers up here by name and never imports a method.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata

ENTRY_POINT_GROUP = "recbole_mdcns.samplers"
RESERVED = ("recbole",)  # RecBole's own, untouched pipeline


@dataclass(frozen=True)
class SamplerEntry:
    """A registered sampler: its LightningModule class and its YAML defaults (or ``None``)."""

    name: str
    cls: type
    config_file: str | None


_SAMPLERS: dict[str, SamplerEntry] = {}
_entry_points_loaded = False


def _check_sampler_class(name: str, cls) -> None:
    from recbole_mdcns.lightning_module import NegativeSamplingModule

    if not (isinstance(cls, type) and issubclass(cls, NegativeSamplingModule)):
        raise TypeError(
            f"register_sampler({name!r}, ...): {cls!r} is not a sampler; a sampler is a subclass of "
            "recbole_mdcns.NegativeSamplingModule that implements training_loss(batch)")
    if cls.training_loss is NegativeSamplingModule.training_loss:
        raise TypeError(f"register_sampler({name!r}, ...): {cls.__qualname__} does not implement training_loss(batch)")


def register_sampler(name: str, cls: type | None = None, *, config_file: str | None = None):
    """Make ``neg_sampler: name`` train with ``cls``; returns ``cls`` (usable as ``@register_sampler(name)``).

    ``cls`` subclasses :class:`~recbole_mdcns.lightning_module.NegativeSamplingModule`; its
    ``validate_config(config)`` runs before any data is loaded. ``config_file`` (default: the
    class's ``config_file`` attribute, if any) is a YAML of defaults merged under the user's
    values, after ``config_yamls/base.yaml``, exactly as the built-in samplers' are.
    Registering the same class again under its name is a no-op; a name taken by another
    class, or a class that is not a sampler, is an error.
    """
    if cls is None:
        return lambda klass: register_sampler(name, klass, config_file=config_file)
    if not isinstance(name, str) or not name or name in RESERVED:
        raise ValueError(f"sampler name must be a non-empty string other than {list(RESERVED)}, got {name!r}")
    _check_sampler_class(name, cls)
    config_file = config_file if config_file is not None else getattr(cls, "config_file", None)
    if config_file is not None and not os.path.isfile(config_file):
        raise ValueError(f"register_sampler({name!r}, ...): config_file {config_file!r} does not exist")
    taken = _SAMPLERS.get(name)
    if taken is not None:
        if taken.cls is cls and taken.config_file == config_file:
            return cls
        raise ValueError(f"neg_sampler name {name!r} is already taken by "
                         f"{taken.cls.__module__}.{taken.cls.__qualname__}; register under another name")
    _SAMPLERS[name] = SamplerEntry(name, cls, config_file)
    return cls


def _load_entry_points() -> None:
    """Register the samplers installed packages declare (once; a name already taken is an error)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = point.load()
        except Exception as error:  # report which package's entry point broke
            raise ImportError(f"entry point {point.name} = {point.value!r} ({ENTRY_POINT_GROUP}) "
                              f"failed to load: {error}") from error
        register_sampler(point.name, cls)


def available_samplers() -> list[str]:
    """Every ``neg_sampler`` value: ``recbole`` and the registered samplers, sorted."""
    _load_entry_points()
    return [*RESERVED, *sorted(_SAMPLERS)]


def get_sampler(name: str) -> SamplerEntry:
    """The registered sampler ``name``; ``ValueError`` naming ``neg_sampler`` and its valid values."""
    if name not in _SAMPLERS:
        _load_entry_points()
    if name not in _SAMPLERS:
        raise ValueError(f"neg_sampler must be one of {available_samplers()}, got {name!r}")
    return _SAMPLERS[name]
