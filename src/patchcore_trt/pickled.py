"""Load an anomalib checkpoint with torch's weights_only unpickler, turning its pickled objects into inert records.

anomalib 1.x and 2.0-2.6 pickle whole objects: the pre-processor's torchvision transforms, the PreProcessor and
PostProcessor, and - through the ``log``/``log_dict`` bound methods Lightning attaches to every callback - the
LightningModule with its timm backbone and torchmetrics metrics. Everything patchcore-trt needs from them is
plain state, so none of their code has to run.

How it stays inert (torch/_weights_only_unpickler.py): GLOBAL resolves only names in the allowlist, and each name
allowed here resolves to a stand-in class of ours, never to the real class; NEWOBJ calls ``cls.__new__`` and REDUCE
calls ``cls(*args)`` only on allowlisted callables, which here means building a record that stores its arguments;
BUILD calls the record's ``__setstate__``, which stores the state. ``builtins.getattr`` (how pickle spells a bound
method) resolves to a function that records (object, name) and looks nothing up; calling the result is refused by
torch because it is not an allowlisted callable. No name from the file is imported, so no code of anomalib,
torchvision, timm, Lightning or the file runs, and none of them need be installed.

The archive is checked before torch opens it: torch.save writes every entry uncompressed, so a compressed entry
(a zip bomb) or entries that claim more bytes than the file holds are refused without unpacking anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

# Classes whose state the reader interprets; matched by exact qualified name.
INTERPRETED = (
    "anomalib.pre_processing.pre_processor.PreProcessor",
    "anomalib.post_processing.post_processor.PostProcessor",
    "anomalib.data.transforms.center_crop.ExportableCenterCrop",
    "anomalib.PrecisionType",
    "anomalib.utils.types.PrecisionType",
    "torchvision.transforms.v2._container.Compose",
    "torchvision.transforms.v2._geometry.Resize",
    "torchvision.transforms.v2._geometry.CenterCrop",
    "torchvision.transforms.v2._misc.Normalize",
    "torchvision.transforms.functional.InterpolationMode",
)
# Packages whose objects only ride along inside the pickled LightningModule (its backbone, metrics, evaluator and
# the other anomalib components). They are recorded, never interpreted. A record is inert whatever its name says,
# so any class of these packages may be stood in; that keeps other backbones and metrics readable without a list
# of every timm block.
CARRIED_PREFIXES = (
    "anomalib.",
    "timm.",
    "torch.nn.modules.",
    "torchmetrics.",
    "torchvision.transforms.",
    "lightning.",
    "functools.partial",
)
# Lightning's hyper-parameter container is a dict subclass; torch's unpickler fills only exact dicts (SETITEMS).
DICT_ALIASES = (
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
)


def _numpy_reduce(value: Any) -> Any:
    return value.__reduce__()[0]


# anomalib's own allowlist (anomalib.utils.serialization): numpy scalars and arrays, built by numpy itself.
NUMPY_GLOBALS: list[Any] = [
    (_numpy_reduce(np.float64(0)), "numpy.core.multiarray.scalar"),
    (_numpy_reduce(np.float64(0)), "numpy._core.multiarray.scalar"),
    (_numpy_reduce(np.empty(0)), "numpy.core.multiarray._reconstruct"),
    (_numpy_reduce(np.empty(0)), "numpy._core.multiarray._reconstruct"),
    np.dtype,
    np.ndarray,
    np.dtypes.Float64DType,
]
_NUMPY_NAMES = {item[1] for item in NUMPY_GLOBALS if isinstance(item, tuple)} | {
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.dtypes.Float64DType",
}


class Record:
    """An inert stand-in for one pickled object: class name, constructor arguments, state. Executes nothing.

    ``called``: the pickle built it by calling the class (REDUCE, as enums are) rather than with
    ``cls.__new__`` (NEWOBJ, as objects are), so it can be written back the way it was.
    """

    qualname: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Record:
        record = object.__new__(cls)
        object.__setattr__(record, "args", args)
        object.__setattr__(record, "state", None)
        object.__setattr__(record, "called", False)
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """REDUCE builds with ``cls(*args)``; ``__new__`` already kept the arguments."""
        object.__setattr__(self, "called", True)

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "state", state)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("records are read-only")

    def __repr__(self) -> str:
        return f"<pickled {self.qualname}>"

    @property
    def value(self) -> Any:
        """An enum member's value (enums pickle as ``cls(value)``)."""
        return self.args[0] if self.args else None

    def get(self, name: str, default: Any = None) -> Any:
        """An attribute as ``nn.Module.__getattr__`` finds it: instance dict, then submodules, buffers, parameters."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]  # (instance dict, slot state)
        if not isinstance(state, dict):
            return default
        if name in state:
            return state[name]
        for table in ("_modules", "_buffers", "_parameters"):
            inner = state.get(table)
            if isinstance(inner, dict) and name in inner:
                return inner[name]
        return default

    def has(self, name: str) -> bool:
        """Whether the recorded object carried attribute ``name``."""
        return self.get(name, _MISSING) is not _MISSING


_MISSING = object()


@dataclass(frozen=True)
class BoundMethod:
    """What ``getattr(obj, name)`` in a pickle would have produced, recorded instead of looked up."""

    owner: Any
    name: str


def _bound_method(owner: Any, name: Any) -> BoundMethod:
    return BoundMethod(owner, str(name))


_RECORD_CLASSES: dict[str, type[Record]] = {}


def record_class(qualname: str) -> type[Record]:
    """The stand-in class for ``qualname`` (one per name, so torch's allowlist can tell them apart)."""
    if qualname not in _RECORD_CLASSES:
        short = qualname.rsplit(".", 1)[-1]
        _RECORD_CLASSES[qualname] = type(short, (Record,), {"qualname": qualname, "__module__": __name__})
    return _RECORD_CLASSES[qualname]


class UnknownGlobalsError(Exception):
    """The pickle names globals that are neither torch's defaults nor stood in here; ``names`` lists them."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


def stand_in(name: str) -> Any | None:
    """What the pickle's global ``name`` resolves to, or None when it is not one accepted here."""
    if name == "builtins.getattr":
        return _bound_method
    if name in DICT_ALIASES:
        return dict
    if name in INTERPRETED or name.startswith(CARRIED_PREFIXES):
        return record_class(name)
    return None


def pickled_globals(path: Path) -> list[str]:
    """The globals the checkpoint's pickle names beyond torch's own defaults, read from its opcodes only."""
    return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))


def allowed_globals(path: Path) -> list[Any]:
    """What each global the pickle names resolves to (torch's defaults aside), read from its opcodes only.

    Raises:
        UnknownGlobalsError: names the pickle uses that are not stood in.
    """
    allowed: list[Any] = list(NUMPY_GLOBALS)
    unknown = []
    for name in pickled_globals(path):
        if name in _NUMPY_NAMES:
            continue
        target = stand_in(name)
        if target is None:
            unknown.append(name)
        else:
            allowed.append((target, name))
    if unknown:
        raise UnknownGlobalsError(unknown)
    return allowed


def safe_load(path: Path, allowed: list[Any] | None = None) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with the inert stand-ins (``allowed``: ``allowed_globals(path)``).

    Tensors are memory-mapped, so what the caller does not touch (a 2.0.x module's training embeddings, the
    pickled module's copies of the weights) is never read into memory.

    Raises:
        UnknownGlobalsError: names the pickle uses that are not stood in.
        pickle.UnpicklingError: the structure is not one weights_only can build (message from torch).
    """
    with torch.serialization.safe_globals(allowed_globals(path) if allowed is None else allowed):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def trusted_load(path: Path) -> Any:
    """Plain ``torch.load``: runs whatever the pickle says. Only behind the user's explicit opt-in."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # nosec B614 - explicit opt-in


def qualname(obj: Any) -> str:
    """The qualified class name of a record or of a real (trusted) object."""
    if isinstance(obj, Record):
        return obj.qualname
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def attr(obj: Any, name: str) -> Any:
    """Attribute ``name`` of a record or of a real object; None when absent."""
    if isinstance(obj, Record):
        return obj.get(name)
    return getattr(obj, name, None)


def has_attr(obj: Any, name: str) -> bool:
    """Whether a record or real object carries ``name`` (in its own dict, for real objects)."""
    if isinstance(obj, Record):
        return obj.has(name)
    return name in getattr(obj, "__dict__", {})


def owner_of(method: Any) -> Any:
    """The object a recorded or real bound method belongs to."""
    if isinstance(method, BoundMethod):
        return method.owner
    return getattr(method, "__self__", None)


def enum_value(value: Any) -> Any:
    """An enum member's value, pickled (record) or real; plain values pass through."""
    if isinstance(value, Record):
        return value.value
    return getattr(value, "value", value)


def is_object(value: Any) -> bool:
    """A pickled object (not a flag, number, string or container)."""
    return value is not None and not isinstance(value, (bool, int, float, str, dict, list, tuple))
