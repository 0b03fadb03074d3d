"""The seven golden checkpoints of five anomalib releases and what those releases computed on them, plus the tools the
tests use to derive files from them: re-pickling a release's own object tree after editing a value, and planting
a code-running object in one pickled slot.

The fixtures live in ../shared/fixtures/anomalib-versions (CI has /work/shared at the same relative place), or
wherever PATCHCORE_TRT_FIXTURES points. Image order is always forward.npz's own.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import types
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from conftest import unavailable

from patchcore_trt.images import load_image
from patchcore_trt.model import DeployOutput
from patchcore_trt.pickled import BoundMethod, Record, record_class, safe_load
from patchcore_trt.runtime import Prediction

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("PATCHCORE_TRT_FIXTURES", ROOT.parent / "shared" / "fixtures" / "anomalib-versions"))
RELEASES = ("2.0.0", "2.0.0-default", "2.2.0", "2.3.3", "2.6.2", "2.6.2-default", "1.2.0")
# More files in the same form (model.ckpt, forward.npz, info.json per folder; images named relative to FIXTURES),
# e.g. files trained with settings the shared ones leave at their defaults; only read where this is set.
EXTRA = Path(os.environ["PATCHCORE_TRT_EXTRA_FIXTURES"]) if os.environ.get("PATCHCORE_TRT_EXTRA_FIXTURES") else None


def extra_releases() -> list[str]:
    return sorted(path.parent.name for path in EXTRA.glob("*/model.ckpt")) if EXTRA else []


def checkpoint(release: str) -> Path:
    path = (EXTRA if release in extra_releases() else FIXTURES) / release / "model.ckpt"
    if not path.is_file():
        unavailable(f"golden checkpoint {path} is not here (set PATCHCORE_TRT_FIXTURES)")
    return path


def trained_with(release: str) -> tuple[int, int]:
    """(major, minor) of the anomalib release that trained the file, from its info.json."""
    info = json.loads((checkpoint(release).parent / "info.json").read_text())
    version = info["versions"]["anomalib"] if "versions" in info else info["anomalib"]
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


@dataclass(frozen=True)
class Golden:
    """One release's outputs on the test images and the probes, in forward.npz's order."""

    images: list[np.ndarray]
    expected: Prediction
    raw_score: np.ndarray
    raw_map: np.ndarray


def golden(release: str, *, probes: bool = False) -> Golden:
    """forward.npz of ``release``: the test images (or the probes) decoded as anomalib reads them."""
    outputs = np.load(checkpoint(release).parent / "forward.npz")
    prefix, files = ("probe_", "probe_files") if probes else ("", "files")
    score, label, anomaly_map = (outputs[prefix + key] for key in ("pred_score", "pred_label", "anomaly_map"))
    # forward.npz keeps no masks; compare() only reads them for the mask agreement figure.
    expected = Prediction.from_outputs([score, label, anomaly_map, np.zeros(anomaly_map.shape, bool)])
    raw = (outputs["raw_score"], outputs["raw_map"]) if not probes else (np.empty(0), np.empty(0))
    return Golden([load_image(FIXTURES / name) for name in outputs[files]], expected, *raw)


@torch.inference_mode()
def run(model: Any, images: list[np.ndarray]) -> Prediction:
    """``model`` (a torch batch -> DeployOutput or Prediction) on images of mixed sizes: one batch per size,
    results in input order."""
    shapes = sorted({image.shape for image in images})
    results: dict[int, Prediction] = {}
    for shape in shapes:
        indices = [i for i, image in enumerate(images) if image.shape == shape]
        out: DeployOutput | Prediction = model(torch.from_numpy(np.stack([images[i] for i in indices])))
        prediction = out if isinstance(out, Prediction) else Prediction.from_outputs(out)
        results.update({index: prediction[position] for position, index in enumerate(indices)})
    return Prediction.concat([results[i] for i in range(len(images))])


# ---- re-pickling a release's own object tree (pickled.Record) under its original global names


class _ReleasePickler(pickle._Pickler):  # the pure-Python pickler lets save() write opcodes itself
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, BoundMethod):
            return getattr, (obj.owner, obj.name)
        return NotImplemented

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        # A record class stands where the pickle named a class or function by reference.
        if isinstance(obj, type) and issubclass(obj, Record):
            module, name = obj.qualname.rsplit(".", 1)
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        elif isinstance(obj, Record) and id(obj) not in self.memo:
            # As the release wrote it: enums as cls(value) (REDUCE), objects as cls.__new__(cls, ...) + BUILD.
            self.save(type(obj))
            self.save(obj.args)
            self.write(pickle.REDUCE if obj.called else pickle.NEWOBJ)
            self.memoize(obj)
            if obj.state is not None:
                self.save(obj.state)
                self.write(pickle.BUILD)
        else:
            super().save(obj, save_persistent_id)


_RELEASE_PICKLE = types.ModuleType("release_pickle")
_RELEASE_PICKLE.Pickler = _ReleasePickler  # type: ignore[attr-defined]
_RELEASE_PICKLE.__name__ = "release_pickle"


def load_records(release: str) -> dict[str, Any]:
    """A golden checkpoint as pickled.safe_load reads it: plain data with inert records for pickled objects."""
    return safe_load(checkpoint(release))


def save_records(raw: dict[str, Any], path: Path) -> Path:
    """torch.save ``raw``, writing every record as the object of the class it stands in for."""
    torch.save(raw, path, pickle_module=_RELEASE_PICKLE, pickle_protocol=2)
    return path


def make_record(qualname: str, state: dict[str, Any]) -> Record:
    """A new pickled object of class ``qualname`` with instance dict ``state`` (written back as that class)."""
    made = record_class(qualname).__new__(record_class(qualname))
    made.__setstate__(state)
    return made


def module_of(raw: dict[str, Any]) -> Record:
    """The LightningModule a 2.0-2.6 file drags in through its pickled pre-processor's ``log`` method."""
    return raw["hyper_parameters"]["pre_processor"].get("log").owner


def records(root: Any, short_name: str) -> Iterator[Record]:
    """Every record named ``...short_name`` reachable from ``root`` (each once)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Record):
            if item.qualname.rsplit(".", 1)[-1] == short_name:
                yield item
            stack.append(item.state)
        elif isinstance(item, BoundMethod):
            stack.append(item.owner)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


# ---- planting a code-running object in one pickled slot

_SKIP = {"BINPUT", "LONG_BINPUT", "MEMOIZE"}


def _text_op(text: str) -> bytes:
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def payload_system(command: str) -> bytes:
    """``os.system(command)``, as pickle opcodes."""
    return b"cposix\nsystem\n(" + _text_op(command) + b"tR"


# A function of a package the reader stands in whose module imports os (timm/models/_hub.py): when really unpickled,
# getattr reaches os.system through its __globals__ with no name outside the reader's stand-ins.
_OS_HOLDER = b"timm.models._hub\nget_cache_dir\n"


def _getattr(target: bytes, name: str) -> bytes:
    return b"cbuiltins\ngetattr\n(" + target + _text_op(name) + b"tR"


def _os_system() -> bytes:
    """``getattr(getattr(get_cache_dir, "__globals__"), "get")("os").system``, as pickle opcodes."""
    globals_get = _getattr(_getattr(b"c" + _OS_HOLDER, "__globals__"), "get")
    return _getattr(globals_get + b"(" + _text_op("os") + b"tR", "system")


def payload_bound_call(command: str) -> bytes:
    """os.system(command) reached through recorded bound methods (builtins.getattr) of a stood-in function."""
    return _os_system() + b"(" + _text_op(command) + b"tR"


def payload_stand_in_reduce(command: str) -> bytes:
    """functools.partial (a stood-in class) over the same os.system and command, then called."""
    return b"cfunctools\npartial\n(" + _os_system() + _text_op(command) + b"tR)R"


def _op_span(data: bytes, slot: tuple[str, str]) -> tuple[int, int]:
    """Byte range of the op that builds the slot's value: ("global", "module name") or ("after_key", "key")."""
    ops = list(pickletools.genops(data))
    kind, target = slot
    for index, (op, arg, position) in enumerate(ops):
        if kind == "global" and op.name == "GLOBAL" and arg == target:
            return position, ops[index + 1][2]
        if kind == "after_key" and op.name in ("BINUNICODE", "SHORT_BINUNICODE") and arg == target:
            following = index + 1
            while ops[following][0].name in _SKIP:
                following += 1
            return ops[following][2], ops[following + 1][2]
    raise LookupError(slot)


def plant(source: Path, target: Path, slot: tuple[str, str], payload: bytes) -> Path:
    """A copy of ``source`` whose pickle builds ``payload`` where ``slot``'s value was."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as planted:
        for info in original.infolist():
            data = original.read(info.filename)
            if info.filename.endswith("data.pkl"):
                start, end = _op_span(data, slot)
                data = data[:start] + payload + data[end:]
            planted.writestr(info, data)
    return target
