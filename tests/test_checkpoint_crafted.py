"""Files crafted to look valid, derived from the golden checkpoints: each is refused with one error line that names
what is wrong, before any tensor is built or any output written, never read into a silently different score.

Each hostile edit comes with its positive control: plain torch.load reads the same file without complaint (and,
where it matters, into other values than anomalib saved), so the refusal is the reader's own check.
"""

from __future__ import annotations

import math
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import error_line, peak_run, run_cli
from golden import checkpoint, load_records, plant, records, save_records

from patchcore_trt.checkpoint import MEMORY_BANK_KEY, read_checkpoint
from patchcore_trt.errors import UserError

PLAIN = "2.0.0-default"  # a release file that pickles no objects: torch.load(weights_only=True) reads it


def _plain(folder: Path, name: str, edit) -> Path:
    raw = torch.load(checkpoint(PLAIN), map_location="cpu", weights_only=True)
    edit(raw)
    torch.save(raw, folder / name)
    return folder / name


def _record_of(path: Path, nbytes: int) -> str:
    """The archive record holding the storage of ``nbytes`` bytes (the memory bank's size is unique)."""
    with zipfile.ZipFile(path) as archive:
        (name,) = [info.filename for info in archive.infolist() if info.file_size == nbytes]
    return name


def _rewrite(source: Path, target: Path, name: str, data: bytes) -> Path:
    """A copy of ``source`` whose record ``name`` holds ``data``; every other entry as it was."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for info in original.infolist():
            out.writestr(info, data if info.filename == name else original.read(info.filename))
    return target


def _short_bank(folder: Path) -> Path:
    """The bank's record cut by 164 rows, its declared size unchanged: torch reads on into the next record."""
    source = checkpoint(PLAIN)
    bank = read_checkpoint(source).memory_bank
    name = _record_of(source, bank.numel() * 4)
    with zipfile.ZipFile(source) as archive:
        data = archive.read(name)
    return _rewrite(source, folder / "short.ckpt", name, data[: -164 * bank.shape[1] * 4])


def _error(path: Path) -> str:
    with pytest.raises(UserError) as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_storage_record_shorter_than_declared_is_refused_not_read_on(tmp_path):
    path = _short_bank(tmp_path)
    bank = read_checkpoint(checkpoint(PLAIN)).memory_bank
    # Positive control: torch reads the file without complaint, the last rows from the bytes that follow.
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"][MEMORY_BANK_KEY]
    assert loaded.shape == bank.shape and not torch.equal(loaded[-164:], bank[-164:])
    rows = bank.shape[0]
    message = _error(path)
    assert "refused before reading its tensors: storage " in message
    declared, held = rows * 384, (rows - 164) * 384 * 4
    assert (
        f"is declared as {declared} float32 values ({declared * 4} bytes) but its record holds {held} bytes" in message
    )


def test_a_copy_rewritten_unchanged_reads_as_the_original(tmp_path):
    """The rewriting above changes nothing else: the same record written back reads as the golden file."""
    source = checkpoint(PLAIN)
    bank = read_checkpoint(source).memory_bank
    name = _record_of(source, bank.numel() * 4)
    with zipfile.ZipFile(source) as archive:
        data = archive.read(name)
    same = read_checkpoint(_rewrite(source, tmp_path / "same.ckpt", name, data))
    assert torch.equal(same.memory_bank, bank)


def test_an_unused_record_is_refused(tmp_path):
    path = _plain(tmp_path, "base.ckpt", lambda raw: None)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_STORED) as archive:
        prefix = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{prefix}/data/999", bytes(16))
    assert f"record {prefix}/data/999 belongs to no tensor" in _error(path)


ROWS = 1 << 20


def test_a_bank_declaring_a_million_rows_over_one_is_refused_in_bounded_memory(tmp_path, baseline_kib):
    def one_row(raw):
        row = raw["state_dict"][MEMORY_BANK_KEY][:1].clone()
        raw["state_dict"][MEMORY_BANK_KEY] = row.expand(ROWS, row.shape[1])

    path = _plain(tmp_path, "expanded.ckpt", one_row)
    assert path.stat().st_size < 20 << 20
    # Positive control: torch builds the bank with a million rows (1.6 GB once copied) from one stored row.
    assert torch.load(path, map_location="cpu", weights_only=True)["state_dict"][MEMORY_BANK_KEY].shape[0] == ROWS
    result, peak_kib = peak_run("export", path, "-o", tmp_path / "out")
    line = error_line(result)
    assert f"a tensor of shape [{ROWS}, 384] ({ROWS * 384} elements) repeats the 384 elements of storage" in line
    # Beyond the tiny-file refusal, only the reader's imports and scan (about 200 MB); the bank would be 1.6 GB.
    assert (peak_kib - baseline_kib) * 1024 < ROWS * 384 * 4 // 4 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda bank: bank.to_sparse(), "a tensor of a kind anomalib never saves (sparse"),
        (lambda bank: torch.empty(bank.shape, device="meta"), "a tensor of a kind anomalib never saves (meta"),
    ],
    ids=["sparse", "meta"],
)
def test_tensors_of_other_kinds_are_refused(make, fragment, tmp_path):
    path = _plain(
        tmp_path,
        "kind.ckpt",
        lambda raw: raw["state_dict"].update({MEMORY_BANK_KEY: make(raw["state_dict"][MEMORY_BANK_KEY])}),
    )
    torch.load(path, map_location="cpu", weights_only=True)  # positive control: torch reads it
    assert fragment in _error(path)


def test_contradictory_release_markers_are_refused_by_name(tmp_path):
    raw = load_records("2.6.2")
    raw["anomalib_pre_processor_config"] = {"transform": None}
    message = _error(save_records(raw, tmp_path / "mixed.ckpt"))
    assert "markers of two anomalib layouts that no release writes together" in message
    assert "(anomalib 2.7+)" in message and "a pickled PreProcessor / PostProcessor in hyper_parameters" in message


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("post_processor.image_max", math.inf, "post_processor.image_max is inf, expected a finite number"),
        ("post_processor._image_threshold", -math.inf, "post_processor._image_threshold is -inf, expected a finite"),
        ("post_processor.pixel_min", math.nan, "post_processor.pixel_min is NaN while the other statistics are set"),
    ],
    ids=["image-max-inf", "threshold-minus-inf", "one-stat-nan"],
)
def test_non_finite_statistics_are_refused_at_read_time(key, value, fragment, tmp_path):
    path = _plain(tmp_path, "stat.ckpt", lambda raw: raw["state_dict"].update({key: torch.tensor(value)}))
    assert fragment in _error(path)


def test_non_finite_weights_and_normalisation_are_refused_at_read_time(tmp_path):
    weight = "model.feature_extractor.feature_extractor.layer3.1.bn2.weight"

    message = _error(_plain(tmp_path, "weights.ckpt", lambda raw: raw["state_dict"][weight].__setitem__(3, math.nan)))
    assert "the backbone weights hold NaN or infinite values (layer3.1.bn2.weight)" in message
    raw = load_records("2.2.0")
    for normalize in _records(raw, "Normalize"):
        normalize.state["std"] = [0.229, math.inf, 0.225]
    message = _error(save_records(raw, tmp_path / "normalize.ckpt"))
    assert (
        "the pre-processor's Normalize has mean" in message and "std [0.229, inf, 0.225]: expected 3 numbers" in message
    )


def _nested(depth: int) -> bytes:
    """A list nested ``depth`` deep, as pickle opcodes."""
    return b"]" * depth + b"a" * (depth - 1)


@pytest.mark.parametrize(
    ("slot", "payload", "fragment"),
    [
        ("num_neighbors", _nested(200_000), "hyper_parameters.num_neighbors is list [[[[[[[...]]]]]]]"),
        ("backbone", b"ccollections\nOrderedDict\n(K\x01K\x02K\x03tR", "its pickle cannot be read (TypeError"),
        (
            "model.memory_bank",
            b"ctorch._utils\n_rebuild_tensor_v2\n(K\x00K\x00(K\x01t(K\x01t\x89}tR",
            "a tensor is built without a storage",
        ),
    ],
    ids=["recursion-bomb", "allowlisted-bad-arguments", "tensor-without-storage"],
)
def test_crafted_pickles_are_one_error_line(slot, payload, fragment, tmp_path):
    path = plant(
        _plain(tmp_path, "base.ckpt", lambda raw: None), tmp_path / "crafted.ckpt", ("after_key", slot), payload
    )
    assert fragment in _error(path)


def test_a_huge_resize_is_refused(tmp_path):
    raw = load_records("2.2.0")
    for resize in _records(raw, "Resize"):
        resize.state["size"] = [1 << 20, 1 << 20]
    message = _error(save_records(raw, tmp_path / "huge.ckpt"))
    assert "the pre-processor's Resize size [1048576, 1048576] is outside 32..8192" in message


def _records(raw, short_name: str):
    return list(records(raw["hyper_parameters"]["pre_processor"], short_name))


# ---- what the user sees: one error line, exit 1, nothing written


@pytest.fixture(scope="module")
def crafted_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crafted")
    files = {
        "short": _short_bank(folder),
        "inf": _plain(
            folder,
            "inf.ckpt",
            lambda raw: raw["state_dict"].update({"post_processor.image_max": torch.tensor(math.inf)}),
        ),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = pool.map(lambda name: run_cli("export", files[name], "-o", folder / name), files)
        return folder, dict(zip(files, runs, strict=True))


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("short", "but its record holds"), ("inf", "post_processor.image_max is inf, expected a finite number")],
)
def test_export_of_a_crafted_file_is_one_line_and_writes_nothing(name, fragment, crafted_runs):
    folder, runs = crafted_runs
    assert fragment in error_line(runs[name])
    assert not (folder / name).exists()
