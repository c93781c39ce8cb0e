"""A ``pickle`` module that loads RecBole's checkpoints and dataset caches and nothing else.

Plain ``pickle`` lets a file call any function while it loads (``os.system`` included), and
torch's ``weights_only`` loader cannot read RecBole's files (they are pickled with protocol 4
and hold its ``Config``). This unpickler rebuilds only the types RecBole's files hold, and
tells apart what a file may do with each (a global in a pickle is either *called* by the
``REDUCE`` opcode, *instantiated* without ``__init__`` by ``NEWOBJ``, or only *referenced*):

* called: torch's own ``weights_only`` allowlist (tensor rebuild functions, ``torch.device``,
  dtypes, ``OrderedDict`` ...), ``torch.storage._load_from_bytes`` (a tensor in a plain pickle,
  e.g. a dataloader cache) replaced by a ``weights_only=True`` load of the storage, numpy's
  array / scalar / dtype rebuilders, RecBole's enums,
  pandas' block, block-manager and index rebuilders, ``logging.getLogger``, ``slice``,
  ``frozenset``, ``range``, ``collections.defaultdict`` (a dataset loaded from benchmark files holds one;
  its factory must be an allowed global: ``int``), ``pathlib`` paths, and ``getattr(obj, name)`` only to take a
  bound method of a RecBole object (a dataloader's ``collate_fn``), never a dunder;
* instantiated (``cls.__new__`` + its pickled state): RecBole's ``Config``, ``Interaction``,
  datasets, dataloaders, samplers and transforms; ``torch.nn`` and ``recbole.model`` modules
  (``Config.model_class``; the feature layer that SASRecF, GRU4RecF and FDSA save as
  ``other_parameter``); torch's index samplers; pandas frames and indexes;
* referenced: ``numpy.ndarray`` and ``yaml.loader.FullLoader`` (``Config.yaml_loader``).

Anything else is refused with :class:`UnsafePickleError` naming it (``module.qualname``)
before it is imported or called. Use it as ``torch.load(f, pickle_module=safe_pickle,
weights_only=False)`` or ``safe_pickle.load(file)``.
"""
from __future__ import annotations

import importlib
import inspect
import io
import pickle
import types
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import _weights_only_unpickler

CALL, NEW, REFERENCE = "call", "new", "reference"
_RANK = {REFERENCE: 0, NEW: 1, CALL: 2}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global, or a call, that RecBole's files never need."""


def _load_storage_from_bytes(data: bytes) -> Any:
    """``torch.storage._load_from_bytes`` (a tensor pickled with plain ``pickle``), which
    would unpickle ``data`` unrestricted; a lone storage loads with ``weights_only=True``."""
    return torch.load(io.BytesIO(data), weights_only=True)


_NUMPY_CALLS = ("multiarray._reconstruct", "multiarray.scalar", "numeric._frombuffer")
_FIXED_NAMES = {
    **{f"numpy.{core}.{name}": CALL for core in ("core", "_core") for name in _NUMPY_CALLS},
    "numpy.dtype": CALL,
    "numpy.ndarray": REFERENCE,
    "builtins.getattr": REFERENCE,  # called only as Unpickler._bound_method allows
    "builtins.slice": CALL,
    "builtins.frozenset": CALL,
    "builtins.range": CALL,
    "builtins.int": REFERENCE,  # a defaultdict's default factory
    "collections.defaultdict": CALL,  # a dataset's field2seqlen after benchmark files (its factory checked too)
    "logging.getLogger": CALL,
    **{f"pathlib.{name}": CALL for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")},
    "pandas._libs.internals._unpickle_block": CALL,
    "pandas.core.indexes.base._new_Index": CALL,
    "pandas.core.frame.DataFrame": NEW,
    "pandas.core.indexes.base.Index": NEW,
    "pandas.core.indexes.range.RangeIndex": NEW,
    "pandas.core.internals.managers.BlockManager": CALL,
    "recbole.config.configurator.Config": NEW,
    "recbole.data.interaction.Interaction": NEW,
    "yaml.loader.FullLoader": REFERENCE,
}


# (module prefix, base class, tier): classes defined under the prefix that subclass the base.
_CLASS_FAMILIES = (
    ("recbole.utils.enum_type", "enum:Enum", CALL),
    ("recbole.data.dataset", "recbole.data.dataset:Dataset", NEW),
    ("recbole.data.dataloader", "builtins:object", NEW),
    ("recbole.sampler", "recbole.sampler.sampler:AbstractSampler", NEW),
    ("recbole.data.transform", "builtins:object", NEW),
    ("recbole.model", "torch.nn:Module", NEW),
    ("torch.nn", "torch.nn:Module", NEW),
    ("torch.utils.data.sampler", "torch.utils.data:Sampler", NEW),
)


def _import(module: str, name: str) -> Any:
    """``module.name``, or None if this environment has no such module or name."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


@lru_cache(maxsize=None)
def allowed(module: str, name: str) -> tuple[Any, str] | None:
    """``(object, tier)`` for the global ``module.name`` if RecBole's files may hold it, else None.

    Only modules of the allowed families are imported, and only top-level names that are
    defined where the pickle says (no dotted names, no re-exported modules or functions).
    """
    key = f"{module}.{name}"
    if key == "torch.storage._load_from_bytes":
        return _load_storage_from_bytes, CALL
    torch_globals = _weights_only_unpickler._get_allowed_globals()
    if key in torch_globals:
        return torch_globals[key], CALL
    if "." in name:
        return None
    if key in _FIXED_NAMES:
        obj = _import(module, name)
        return None if obj is None else (obj, _FIXED_NAMES[key])
    for prefix, base_name, tier in _CLASS_FAMILIES:
        if module == prefix or module.startswith(prefix + "."):
            obj = _import(module, name)
            base_module, base_attr = base_name.split(":")
            base = getattr(importlib.import_module(base_module), base_attr)
            if isinstance(obj, type) and issubclass(obj, base) and obj.__module__ == module:
                return obj, tier
    return None


def _registered_model(module: str, name: str) -> tuple[Any, str] | None:
    """A model class registered with :func:`recbole_mdcns.register_model` (a RecBole model's peer in
    this package or the user's own), trusted like RecBole's ``recbole.model`` classes."""
    from recbole_mdcns.models import registered_models

    obj = registered_models().get(name)
    return (obj, NEW) if obj is not None and obj.__module__ == module else None


def _name(obj: Any) -> str:
    """``module.qualname`` of a class or function, else of the object's type."""
    named = obj if hasattr(obj, "__qualname__") and hasattr(obj, "__module__") else type(obj)
    return f"{named.__module__}.{named.__qualname__}"


class Unpickler(pickle._Unpickler):
    """``pickle.Unpickler`` restricted to what RecBole's files hold (see the module docstring).

    Pure Python (``pickle._Unpickler``) so that ``REDUCE``, ``NEWOBJ`` and ``BUILD`` can be
    checked; tensors' data never passes through it (torch loads storages itself).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self._tiers: dict[int, str] = {}  # id(global) -> tier, for the globals this pickle named
        self._recbole_objects: dict[int, Any] = {}  # instantiated RecBole objects, kept alive by id

    def find_class(self, module: str, name: str) -> Any:
        found = allowed(module, name) or _registered_model(module, name)
        if found is None:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: not a type RecBole's checkpoints or dataset caches "
                "hold (only RecBole's Config, enums, datasets, dataloaders and models, torch tensors and "
                "modules, numpy and pandas data, and plain containers are loaded)"
            )
        obj, tier = found
        self._tiers[id(obj)] = tier
        return obj

    def _require(self, obj: Any, tier: str, action: str) -> None:
        granted = self._tiers.get(id(obj))
        if granted is None or _RANK[granted] < _RANK[tier]:
            raise UnsafePickleError(
                f"refusing to {action} {_name(obj)} while loading: RecBole's files never {action} it"
            )

    def _call(self, func: Callable, args: tuple) -> Any:
        if func is getattr:
            return self._bound_method(*args)
        self._require(func, CALL, "call")
        return func(*args)

    def _bound_method(self, obj: Any, name: Any) -> Any:
        """``getattr(obj, name)`` as pickle stores a bound method: a RecBole object's own method
        (a dataloader's ``collate_fn`` or negative-sampling function), never a dunder."""
        if id(obj) in self._recbole_objects and isinstance(name, str) and not name.startswith("__"):
            method = getattr(obj, name, None)
            if inspect.ismethod(method) and method.__self__ is obj:
                return method
        raise UnsafePickleError(
            f"refusing to call builtins.getattr on {_name(obj)}, {name!r} while loading: "
            "RecBole's files only take methods of RecBole objects"
        )

    def _new(self, cls: Any, args: tuple, kwargs: dict) -> Any:
        self._require(cls, NEW, "instantiate")
        obj = cls.__new__(cls, *args, **kwargs)
        if cls.__module__.startswith("recbole."):
            self._recbole_objects[id(obj)] = obj
        return obj

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, {}))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def _instantiate(self, klass: Any, args: tuple) -> None:  # protocol 0/1 INST and OBJ
        if args or not isinstance(klass, type):
            self.append(self._call(klass, tuple(args)))
        else:
            self.append(self._new(klass, (), {}))

    def load_build(self) -> None:
        target = self.stack[-2]
        if isinstance(target, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
                               types.MethodType)):
            raise UnsafePickleError(f"refusing to set the state of {_name(target)} while loading")
        super().load_build()

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


def load(file, **kwargs) -> Any:
    """``pickle.load`` through :class:`Unpickler`."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs) -> Any:
    """``pickle.loads`` through :class:`Unpickler`."""
    return load(io.BytesIO(data), **kwargs)
