"""Hostile and malformed checkpoints: no pickled code runs, memory stays bounded, and every malformed value ends in
one error line that names it, never a traceback.

Code is planted where each layout pickles an object (golden.plant: ``os.system("touch MARKER")`` built in that
slot); plain ``torch.load`` runs it (the positive control, in a subprocess), the reader must not.
"""

from __future__ import annotations

import fractions
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import error_line, peak_run, run_cli
from golden import (
    FIXTURES,
    checkpoint,
    load_records,
    payload_bound_call,
    payload_stand_in_reduce,
    payload_system,
    plant,
    save_records,
)

from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.errors import UserError
from patchcore_trt.pickled import safe_load

# One pickled slot per layout: (file, what sits there, the op that builds it)
SLOTS = {
    "1.x transform": ("1.2.0", ("global", "torchvision.transforms.v2._container Compose")),
    "2.0 module behind log": ("2.0.0", ("global", "anomalib.models.image.patchcore.lightning_model Patchcore")),
    "2.0-2.2 plain flag": ("2.0.0-default", ("after_key", "pre_processor")),
    "2.3-2.6 precision": ("2.6.2-default", ("global", "anomalib PrecisionType")),
    "2.7 precision": ("trained-2.7", ("global", "anomalib PrecisionType")),
}
_PLAIN_LOAD = """
import sys, torch
for path in sys.argv[1:]:
    try:
        torch.load(path, weights_only=False)
    except Exception:  # the payload ran where its slot was built; what follows no longer fits
        pass
"""
# Names the reader does stand in, abused to reach os.system: a recorded bound method called, or a stood-in class
# (functools.partial) wrapping it and called. Both run the command under plain torch.load (the positive control).
FAMILIES = {"stand-in called": payload_stand_in_reduce, "bound method called": payload_bound_call}


def _source(release: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("resnet18_checkpoint") if release == "trained-2.7" else checkpoint(release)


def _plant_every_slot(folder: Path, request: pytest.FixtureRequest) -> dict[str, tuple[Path, Path]]:
    """slot -> (planted file, its marker); the marker appears only if the planted command ran."""
    made = {}
    for index, (name, (release, slot)) in enumerate(SLOTS.items()):
        marker = folder / f"ran-{index}"
        payload = payload_system(f"touch {marker}")
        made[name] = plant(_source(release, request), folder / f"{index}.ckpt", slot, payload), marker
    return made


@pytest.fixture(scope="module")
def planted(request, tmp_path_factory):
    return _plant_every_slot(tmp_path_factory.mktemp("planted"), request)


@pytest.mark.parametrize("slot", SLOTS)
def test_code_planted_in_a_pickled_slot_is_refused_and_never_runs(slot, planted):
    path, marker = planted[slot]
    with pytest.raises(UserError) as info:
        read_checkpoint(path)
    assert "(posix.system)" in str(info.value) and "--trust-pickled-code" in str(info.value)
    assert not marker.exists()


def test_the_planted_code_is_real_plain_torch_load_runs_it(tmp_path, request):
    pytest.importorskip("anomalib")  # plain torch.load imports the release's classes on its way to the payload
    planted = _plant_every_slot(tmp_path, request)
    paths = [str(path) for path, _ in planted.values()]
    subprocess.run([sys.executable, "-c", _PLAIN_LOAD, *paths], capture_output=True, timeout=600, check=False)
    assert [slot for slot, (_, marker) in planted.items() if not marker.exists()] == []


ABUSED_SLOTS = ["2.0 module behind log", "1.x transform", "2.3-2.6 precision"]


def _abuse(family: str, slot: str, folder: Path, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    release, where = SLOTS[slot]
    marker = folder / f"ran-{family.replace(' ', '-')}-{slot.replace(' ', '-')}"
    payload = FAMILIES[family](f"touch {marker}")
    return plant(_source(release, request), marker.with_suffix(".ckpt"), where, payload), marker


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("slot", ABUSED_SLOTS)
def test_names_the_reader_stands_in_run_nothing_when_abused(family, slot, tmp_path, request):
    path, marker = _abuse(family, slot, tmp_path, request)
    with pytest.raises(UserError) as info:
        read_checkpoint(path)
    # Every name is stood in, so the pickle is opened; the storage scan meets a recorded getattr called.
    assert str(info.value) == (
        f"{path}: refused before reading its tensors: its pickle cannot be read (TypeError: 'getattr' object is not "
        "callable); torch.save does not write that, so the file was damaged or crafted: use the .ckpt file anomalib "
        "saved"
    )
    # Without that scan the stand-ins alone hold: torch refuses to call a recorded bound method.
    with pytest.raises(pickle.UnpicklingError, match="Trying to call reduce for unrecognized function BoundMethod"):
        safe_load(path)
    assert not marker.exists()


def test_the_abused_stand_in_payloads_are_real_plain_torch_load_runs_them(tmp_path, request):
    pytest.importorskip("anomalib")
    made = [_abuse(family, slot, tmp_path, request) for family in FAMILIES for slot in ABUSED_SLOTS]
    paths = [str(path) for path, _ in made]
    subprocess.run([sys.executable, "-c", _PLAIN_LOAD, *paths], capture_output=True, timeout=600, check=False)
    assert [path.name for path, marker in made if not marker.exists()] == []


def test_export_of_a_planted_file_is_one_error_line(planted, tmp_path):
    path, marker = planted["2.0 module behind log"]
    line = error_line(run_cli("export", path, "-o", tmp_path))
    assert "pickles objects patchcore-trt does not know (posix.system)" in line
    assert not marker.exists()


# ---- memory: refused from the zip directory or the first bytes, before anything is unpacked or read whole

CLAIMED = 2 << 30  # what the hostile files would cost if unpacked or read whole


class _Storage:
    pass


class _Tensor:
    def __init__(self, numel: int) -> None:
        self.numel = numel

    def __reduce__(self) -> tuple:
        return torch._utils._rebuild_tensor_v2, (_Storage(), 0, (self.numel,), (1,), False, OrderedDict())


def _zip_bomb(path: Path) -> Path:
    """A torch.save layout whose one storage (a memory bank of CLAIMED bytes of zeros) is deflated to ~2 MB."""
    numel = CLAIMED // 4

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(obj, _Storage) else None

    with (path.parent / "data.pkl").open("wb") as handle:
        Pickler(handle, protocol=2).dump({"state_dict": {"model.memory_bank": _Tensor(numel)}})
    with zipfile.ZipFile(path, "w", compresslevel=1) as archive:
        archive.writestr("bomb/data.pkl", (path.parent / "data.pkl").read_bytes())
        archive.writestr("bomb/byteorder", "little")
        info = zipfile.ZipInfo("bomb/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        chunk = bytes(16 << 20)
        with archive.open(info, "w", force_zip64=True) as entry:
            for _ in range(CLAIMED // len(chunk)):
                entry.write(chunk)
        archive.writestr("bomb/version", "3\n")
    return path


def test_a_zip_bomb_is_refused_from_its_directory(tmp_path, baseline_kib):
    bomb = _zip_bomb(tmp_path / "bomb.ckpt")
    assert bomb.stat().st_size < CLAIMED // 100
    result, peak_kib = peak_run("export", bomb, "-o", tmp_path / "out")
    line = error_line(result)
    assert "refused before unpacking: entry bomb/data/0 is compressed" in line and "torch.save stores" in line
    assert (peak_kib - baseline_kib) * 1024 < CLAIMED // 8


def test_a_large_file_that_is_no_zip_is_refused_from_its_first_bytes(tmp_path, baseline_kib):
    big = tmp_path / "big.ckpt"
    with big.open("wb") as handle:
        handle.write(b"NOTAZIP")
        handle.truncate(CLAIMED)  # sparse: no disk used
    result, peak_kib = peak_run("export", big, "-o", tmp_path / "out")
    assert "not a PyTorch checkpoint" in error_line(result)
    assert (peak_kib - baseline_kib) * 1024 < CLAIMED // 8


# ---- malformed but loadable: every problem named in one line

BACKBONE = "model.feature_extractor.feature_extractor."
KERNEL = "model.anomaly_map_generator.blur.kernel"


def _transform(size: object) -> dict:
    leaves = [
        {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": size}},
        {"class_path": "torchvision.transforms.v2.Normalize", "init_args": {"mean": [0.5] * 3, "std": [0.25] * 3}},
    ]
    return {"transform": {"class_path": "torchvision.transforms.v2.Compose", "init_args": {"transforms": leaves}}}


def _state(**values):
    return lambda raw: raw["state_dict"].update(values)


def _hyper(**values):
    return lambda raw: raw["hyper_parameters"].update(values)


# name -> (edit of 2.0.0-default's checkpoint dict, fragments of the one error line)
MALFORMED = {
    "bank-width": (
        lambda raw: raw["state_dict"].update({"model.memory_bank": raw["state_dict"]["model.memory_bank"][:, :100]}),
        ["the memory bank is [1254, 100], but resnet18's layers give 384 features per patch"],
    ),
    "backbone-weight-shape": (
        _state(**{BACKBONE + "layer2.0.conv1.weight": torch.zeros(64, 64, 3, 3)}),
        ["layer2.0.conv1.weight is [64, 64, 3, 3] here, [128, 64, 3, 3] in timm", "another timm version"],
    ),
    "num-neighbors-0": (_hyper(num_neighbors=0), ["num_neighbors is int 0, expected a whole number of at least 1"]),
    "num-neighbors-negative": (_hyper(num_neighbors=-3), ["num_neighbors is int -3, expected a whole number"]),
    "num-neighbors-string": (_hyper(num_neighbors="9"), ["num_neighbors is str '9', expected a whole number"]),
    "layers-int": (_hyper(layers=3), ["hyper_parameters.layers is int 3, expected a list of layer names"]),
    "hyper-parameters-list": (
        lambda raw: raw.update(hyper_parameters=["resnet18", 9]),
        ["hyper_parameters is list ['resnet18', 9], expected a dict"],
    ),
    "blur-kernel-1d": (
        lambda raw: raw["state_dict"].update({KERNEL: raw["state_dict"][KERNEL].reshape(-1)[:33]}),
        ["the anomaly-map blur kernel has shape [33], expected [1, 1, k, k]"],
    ),
    "post-tensor-empty": (
        _state(**{"post_processor.image_min": torch.tensor([])}),
        ["post_processor.image_min is a tensor of shape [0], expected one floating-point number"],
    ),
    "resize-zero": (
        lambda raw: raw.update(anomalib_pre_processor_config=_transform([0, 0])),
        ["the pre-processor's Resize size [0, 0] is not positive"],
    ),
    "resize-negative": (
        lambda raw: raw.update(anomalib_pre_processor_config=_transform([-5, 256])),
        ["the pre-processor's Resize size [-5, 256] is not positive"],
    ),
    "pre-processor-config-string": (
        lambda raw: raw.update(anomalib_pre_processor_config="Resize(256)"),
        ["anomalib_pre_processor_config is str 'Resize(256)', expected a dict"],
    ),
    "three-at-once": (
        lambda raw: (
            _hyper(num_neighbors=0)(raw),
            _state(**{"post_processor.image_max": torch.tensor([])})(raw),
            raw["state_dict"].update({KERNEL: raw["state_dict"][KERNEL].reshape(-1)[:33]}),
        ),
        ["the checkpoint has 3 problems: ", "num_neighbors is int 0", "post_processor.image_max is a tensor", "[33]"],
    ),
    "bank-1d-not-empty": (
        lambda raw: raw["state_dict"].update({"model.memory_bank": raw["state_dict"]["model.memory_bank"].flatten()}),
        ["the PatchCore memory bank has shape [481536], expected [rows, features]"],
    ),
}


@pytest.fixture(scope="module")
def malformed_runs(tmp_path_factory):
    """name -> what ``patchcore-trt export`` did with that malformed file (run side by side: each is a process)."""
    folder = tmp_path_factory.mktemp("malformed")
    paths = {}
    for name, (edit, _) in MALFORMED.items():
        raw = torch.load(checkpoint("2.0.0-default"), map_location="cpu", weights_only=True)
        edit(raw)
        torch.save(raw, folder / f"{name}.ckpt")
        paths[name] = folder / f"{name}.ckpt"
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = pool.map(lambda name: run_cli("export", paths[name], "-o", folder / name), paths)
        return dict(zip(paths, runs, strict=True))


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_checkpoint_is_one_line_naming_the_problem(name, malformed_runs):
    line = error_line(malformed_runs[name])
    assert all(fragment in line for fragment in MALFORMED[name][1]), line
    if name != "bank-1d-not-empty":
        assert "; the file was changed after anomalib saved it" in line
    assert "never fitted" not in line


# ---- verify on a checkpoint that pickles code: one line, or (trusted) no anomalib loader at all


@pytest.fixture(scope="module")
def unknown_object(tmp_path_factory):
    """2.0.0's golden file plus an object patchcore-trt does not know, and an ONNX of the same model."""
    from patchcore_trt.export import export_onnx

    folder = tmp_path_factory.mktemp("unknown")
    raw = load_records("2.0.0")
    raw["extra"] = fractions.Fraction(1, 3)
    onnx_path, _ = export_onnx(read_checkpoint(checkpoint("2.0.0")), folder / "model.onnx", check=False)
    return save_records(raw, folder / "model.ckpt"), onnx_path


def test_verify_of_a_pickled_code_checkpoint_is_one_line(unknown_object):
    ckpt, onnx_path = unknown_object
    line = error_line(run_cli("verify", ckpt, FIXTURES / "data" / "test", "--onnx", onnx_path))
    assert "pickles objects patchcore-trt does not know (fractions.Fraction)" in line


def test_verify_of_a_trusted_checkpoint_builds_anomalib_from_what_was_read(unknown_object):
    pytest.importorskip("anomalib")
    ckpt, onnx_path = unknown_object
    images = FIXTURES / "data" / "test"
    result = run_cli("verify", ckpt, images, "--onnx", onnx_path, "--backends", "onnxruntime", "--trust-pickled-code")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("reference: ")]
    assert "'s PatchCore built from the checkpoint as read (written by anomalib 2.0.x" in line
