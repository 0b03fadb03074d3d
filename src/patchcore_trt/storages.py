"""Every tensor a checkpoint declares, checked against the bytes its archive holds, before torch builds one.

torch.load trusts the pickle's declarations: a storage record shorter than its declared size is read on into the
bytes that follow it (with ``mmap=True`` the storage is a slice of the mapped file; without, a buffer overrun), and
a tensor may declare any shape over a storage through zero strides, so a one-row memory bank can claim a million
rows and cost gigabytes once materialised. torch.save writes each storage exactly once, as one uncompressed record
of exactly ``numel * element size`` bytes, and every tensor anomalib saves is a plain strided view inside its
storage; anything else was not written by torch.save from an anomalib model.

The declarations are read by a scan of the pickle that builds nothing real: every global resolves to an inert
class that keeps nothing, the tensor rebuild functions to checks, and the storages to their ids. No name from
the file is imported and no code of the file runs; what the scan builds is dropped afterwards. Its cost is linear in
the pickle's size, and nothing is read from the storages.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from patchcore_trt.pickled import DICT_ALIASES

# What torch.save writes for an ordinary (dense, strided, CPU or CUDA) tensor and a Parameter.
_REBUILD_TENSOR = "torch._utils._rebuild_tensor_v2"
_REBUILD_PARAMETER = "torch._utils._rebuild_parameter"
_OTHER_TENSORS = "torch._utils._rebuild_"  # sparse, meta, quantized, nested, subclass, from numpy: never anomalib's


class StorageError(Exception):
    """A declared tensor or storage does not fit the bytes the archive holds; the message says which."""


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


class _Inert:
    """What every other global of the pickle becomes in the scan: takes any arguments and state, keeps none."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _Dict(dict):
    """OrderedDict and Lightning's AttributeDict: dicts that pickle an instance dict as well (BUILD)."""


def _whole(value: Any) -> bool:
    return type(value) is int and value >= 0


class _Scan(pickle._Unpickler):  # the pure-Python one reads what is there; the C one allocates declared sizes
    """The pickle's declarations (storages by key, tensors over them) and nothing else."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _Storage] = {}
        self.inert: dict[str, type[_Inert]] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if qualname == _REBUILD_TENSOR:
            return self._tensor
        if qualname == _REBUILD_PARAMETER:
            return _parameter
        if qualname.startswith(_OTHER_TENSORS):
            kind = name.removeprefix("_rebuild_").removesuffix("_tensor").replace("_", " ")
            raise StorageError(f"it pickles a tensor of a kind anomalib never saves ({kind}: {qualname})")
        if module == "torch" and name.endswith("Storage"):
            try:
                return torch.serialization.StorageType(name).dtype
            except (KeyError, AttributeError):
                raise StorageError(f"it names an unknown storage type torch.{name}") from None
        if qualname in (*DICT_ALIASES, "collections.OrderedDict"):
            return _Dict
        return self.inert.setdefault(qualname, type(name, (_Inert,), {}))

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise StorageError(f"it refers to an external object {str(pid)[:60]}, not a storage")
        _, dtype, key, _location, numel = pid
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or not _whole(numel):
            raise StorageError(f"it declares a storage as {str(pid)[:80]}")
        storage = _Storage(key, dtype, numel)
        known = self.storages.setdefault(key, storage)
        if known != storage:
            raise StorageError(f"storage {key} is declared twice, as {known.numel} and {numel} elements")
        return storage

    def _tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> object:
        if not isinstance(storage, _Storage):
            raise StorageError("a tensor is built without a storage")
        shape_ok = isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
        if not (shape_ok and _whole(offset) and all(map(_whole, (*size, *stride)))):
            raise StorageError(f"a tensor over storage {storage.key} has offset {offset!r}, size {size!r}, stride "
                               f"{stride!r}")  # fmt: skip
        numel = 1
        for side in size:
            numel *= side
        last = offset + sum((side - 1) * step for side, step in zip(size, stride, strict=True)) if numel else 0
        if numel and last >= storage.numel:
            raise StorageError(
                f"a tensor of shape {list(size)} reaches element {last} of storage {storage.key}, which holds "
                f"{storage.numel}"
            )
        if numel > storage.numel:
            raise StorageError(
                f"a tensor of shape {list(size)} ({numel} elements) repeats the {storage.numel} elements of storage "
                f"{storage.key} (zero or overlapping strides)"
            )
        return storage


def _parameter(data: Any, *_rest: Any) -> Any:
    return data


def check_storages(path: Path) -> None:
    """Every storage the pickle declares is one record of exactly its size, every record is used, and every tensor
    lies inside its storage without repeating it.

    Raises:
        StorageError: the first declaration that does not fit, in words.
    """
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in entries if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise StorageError(f"it holds {len(pickles)} top-level data.pkl entries, torch.save writes one")
        prefix = pickles[0][: -len("data.pkl")]
        scan = _Scan(archive.read(pickles[0]))
        try:
            scan.load()
        except StorageError:
            raise
        except Exception as exc:  # the scan builds inert records only, so any failure is the pickle's own
            raise StorageError(f"its pickle cannot be read ({type(exc).__name__}: {str(exc)[:80]})") from None
    for key, storage in scan.storages.items():
        entry = entries.get(f"{prefix}data/{key}")
        expected = storage.numel * storage.dtype.itemsize
        if entry is None:
            raise StorageError(f"storage {key} is declared but the archive has no record {prefix}data/{key}")
        if entry.file_size != expected:
            raise StorageError(
                f"storage {key} is declared as {storage.numel} {str(storage.dtype).removeprefix('torch.')} values "
                f"({expected} bytes) but its record holds {entry.file_size} bytes"
            )
    used = {f"{prefix}data/{key}" for key in scan.storages}
    unused = sorted(name for name in entries if name.startswith(f"{prefix}data/") and name not in used)
    if unused:
        raise StorageError(f"record {unused[0]} belongs to no tensor (torch.save writes only the storages it uses)")
