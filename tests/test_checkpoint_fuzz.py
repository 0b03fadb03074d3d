"""Mutated golden checkpoints (seeded): every one is read into exactly what its bytes hold or refused with one
UserError line; never another exception, never values other than the file's.

Three kinds of mutation of 2.0.0-default's archive (each written back as a valid zip, so the archive's checksums
hold and only the reader's own checks stand between a mutation and a result):
- bytes of the pickle overwritten: structure, keys, shapes, storage ids, hyper-parameters;
- bytes of a storage overwritten: the values change and the file says so; the memory bank's values are checked
  against the record's bytes decoded independently of torch;
- a storage record cut or extended: refused, since its size no longer fits what the pickle declares.
A result is compared with what torch's own loader finds in the mutated file (the memory bank also with the record's
raw float32 bytes), and classified as the original's result or one the file's new bytes say.
"""

from __future__ import annotations

import math
import random
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from golden import checkpoint

from patchcore_trt.checkpoint import BACKBONE_PREFIX, MEMORY_BANK_KEY, read_checkpoint
from patchcore_trt.errors import UserError
from patchcore_trt.pickled import safe_load
from patchcore_trt.spec import PatchCoreSpec

SEED = 24
CASES = {"pickle": 200, "storage": 40, "length": 20}
BUDGET_S = 240  # a bound for a stuck case; the whole run takes about 90 s on 2 cores
SOURCE = "2.0.0-default"
STATS = ("image_min", "image_max", "pixel_min", "pixel_max")


def _entries(path: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as archive:
        return [(info, archive.read(info.filename)) for info in archive.infolist()]


def _write(entries: list[tuple[zipfile.ZipInfo, bytes]], target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for info, data in entries:
            out.writestr(info, data)
    return target


def _mutations(entries: list[tuple[zipfile.ZipInfo, bytes]], bank_record: str):
    """(kind, description, mutated entries) for every case, from one seeded generator."""
    rng = random.Random(SEED)
    pickle_index = next(i for i, (info, _) in enumerate(entries) if info.filename.endswith("/data.pkl"))
    storages = [i for i, (info, data) in enumerate(entries) if "/data/" in info.filename and data]
    bank_index = next(i for i, (info, _) in enumerate(entries) if info.filename == bank_record)
    for kind, count in CASES.items():
        for _ in range(count):
            mutated = list(entries)
            if kind == "pickle":
                index = pickle_index
            elif rng.random() < 0.5:
                index = bank_index
            else:
                index = rng.choice(storages)
            info, data = mutated[index]
            buffer = bytearray(data)
            if kind == "length":
                change = rng.randint(1, 64) * rng.choice((-1, 1))
                buffer = buffer[:change] if change < 0 else buffer + bytes(rng.randrange(256) for _ in range(change))
                what = f"{info.filename} {'cut' if change < 0 else 'extended'} by {abs(change)} bytes"
            else:
                spots = [rng.randrange(len(buffer)) for _ in range(rng.randint(1, 3))]
                for spot in spots:
                    buffer[spot] = rng.randrange(256)
                what = f"{info.filename} bytes {spots}"
            mutated[index] = (info, bytes(buffer))
            yield kind, what, mutated


def _as_file_says(spec: PatchCoreSpec, path: Path, bank_bytes: bytes | None) -> None:
    """``spec`` holds exactly what torch's loader finds in ``path`` (and the bank's raw bytes, when given)."""
    raw = safe_load(path)
    state, hyper = raw["state_dict"], raw["hyper_parameters"]
    bank = state[MEMORY_BANK_KEY]
    assert torch.equal(spec.memory_bank, bank.float())
    if bank_bytes is not None and bank.dtype == torch.float32 and bank.is_contiguous():
        decoded = np.frombuffer(bank_bytes, np.float32)
        if decoded.size == bank.numel():
            np.testing.assert_array_equal(spec.memory_bank.numpy().reshape(-1), decoded)
    for key, value in spec.backbone_state.items():
        assert torch.equal(value, state[BACKBONE_PREFIX + key].float()), key
    assert spec.num_neighbors == hyper.get("num_neighbors", 9)
    assert spec.backbone == hyper["backbone"] and list(spec.layers) == list(hyper.get("layers", spec.layers))
    post = spec.postprocess
    for name in STATS:
        stored = float(state[f"post_processor.{name}"])
        assert getattr(post, name) == stored or (math.isnan(stored) and not post.normalize), name
    kernel = state["model.anomaly_map_generator.blur.kernel"].double().reshape(-1)
    outer = torch.outer(spec.blur_kernel.double(), spec.blur_kernel.double()).reshape(-1)
    assert torch.allclose(outer, kernel, atol=1e-6)


def _same(spec: PatchCoreSpec, original: PatchCoreSpec) -> bool:
    tensors = [(spec.memory_bank, original.memory_bank), (spec.blur_kernel, original.blur_kernel)]
    tensors += [(value, original.backbone_state[key]) for key, value in spec.backbone_state.items()]
    plain = ("backbone", "layers", "num_neighbors", "preprocess", "postprocess")
    return (
        spec.backbone_state.keys() == original.backbone_state.keys()
        and all(torch.equal(a, b) for a, b in tensors)
        and all(getattr(spec, name) == getattr(original, name) for name in plain)
    )


def test_mutated_checkpoints_read_as_their_bytes_say_or_are_one_error_line(tmp_path):
    source = checkpoint(SOURCE)
    original = read_checkpoint(source)
    entries = _entries(source)
    bank_record = next(info.filename for info, data in entries if len(data) == original.memory_bank.numel() * 4)
    outcomes: Counter[str] = Counter()
    failures = []
    started = time.monotonic()
    for number, (kind, what, mutated) in enumerate(_mutations(entries, bank_record)):
        assert time.monotonic() - started < BUDGET_S, f"stopped at case {number}: {dict(outcomes)}"
        path = _write(mutated, tmp_path / f"case-{number % 2}.ckpt")
        try:
            spec = read_checkpoint(path)
        except UserError as exc:
            if "\n" in str(exc):
                failures.append(f"{kind} {what}: a multi-line error")
            outcomes[f"{kind}: refused"] += 1
            continue
        except Exception as exc:  # any other exception is what this test looks for
            failures.append(f"{kind} {what}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        if kind == "length":
            failures.append(f"{kind} {what}: read although a record no longer fits its declaration")
            continue
        bank_bytes = dict((info.filename, data) for info, data in mutated)[bank_record]
        try:
            _as_file_says(spec, path, bank_bytes)
        except (AssertionError, KeyError) as exc:
            failures.append(f"{kind} {what}: read values the file does not hold ({exc!r:.120})")
            continue
        outcomes[f"{kind}: {'same as the original' if _same(spec, original) else 'what the new bytes say'}"] += 1
    print(dict(outcomes), f"{time.monotonic() - started:.0f} s")
    assert failures == []
    assert sum(outcomes.values()) == sum(CASES.values())
    # The fuzz reaches both ends: refusals and reads of each mutated part.
    assert outcomes["pickle: refused"] and outcomes["storage: what the new bytes say"], outcomes
