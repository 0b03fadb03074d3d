"""Hostile and broken inputs, as a user meets them: one error line or a per-image error row, the right exit code,
no traceback, every other result kept, no file replaced or half-written, and always valid JSON.

Special files and full disks are made inside the tests (a FIFO, a file-size limit), never the system's own.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import error_line, run_cli
from PIL import Image

from patchcore_trt.artifact import METADATA_KEY, read_onnx_metadata
from patchcore_trt.checkpoint import read_checkpoint, write_checkpoint
from patchcore_trt.errors import UserError
from patchcore_trt.export import export_onnx
from patchcore_trt.runtime import open_backend


def _strict_json(path: Path) -> dict:
    """Parse as strict JSON: NaN or Infinity tokens are refused."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_results_to_a_fifo_are_written_into_it_not_renamed_over(resnet18_onnx, dataset, tmp_path):
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = run_cli("predict", resnet18_onnx, dataset.test_good, "--json", fifo)
    reader.join(timeout=60)
    assert result.returncode == 0, result.stderr
    assert fifo.is_fifo()  # still the pipe, not a regular file put in its place
    assert len(json.loads(received[0])["results"]) == 3


def test_nan_pixels_and_overflowing_models_are_errors_not_normal_parts(resnet18_checkpoint, dataset, tmp_path):
    nan_tiff = tmp_path / "nan.tif"
    values = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    values[5, 5] = np.nan
    Image.fromarray(values, mode="F").save(nan_tiff)
    json_path = tmp_path / "r.json"
    result = run_cli("predict", resnet18_checkpoint, nan_tiff, dataset.test_good, "--json", json_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    rows = {Path(row["file"]).name: row for row in _strict_json(json_path)["results"]}
    assert rows["nan.tif"]["status"] == "error" and "NaN" in rows["nan.tif"]["error"]
    assert sum(row["status"] == "ok" for row in rows.values()) == 3

    spec = read_checkpoint(resnet18_checkpoint)
    overflowing = write_checkpoint(replace(spec, memory_bank=spec.memory_bank * 1e30), tmp_path / "overflow.ckpt")
    result = run_cli("predict", overflowing, dataset.test_good, "--json", json_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    rows = _strict_json(json_path)["results"]
    assert [row["status"] for row in rows] == ["error"] * 3 and all(row["score"] is None for row in rows)
    assert "NaN or infinity" in rows[0]["error"]


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.full((1, 3, 64, 64), np.nan, dtype=np.float32), r"image\(s\) \[0\] of the batch hold NaN"),
        (np.zeros((1, 3, 64, 64), dtype=np.uint8), "expected float images in \\[0, 1\\], got dtype uint8"),
        (np.zeros((1, 3, 64, 64), dtype=bool), "got dtype bool"),
        (np.full((1, 3, 64, 64), 255.0, dtype=np.float32), "scale images to \\[0, 1\\]"),
        (np.zeros((1, 3, 0, 0), dtype=np.float32), "too small"),
    ],
    ids=["nan", "uint8", "bool", "0-255-floats", "0x0"],
)
@pytest.mark.parametrize("name", ["torch", "onnxruntime", "openvino"])
def test_every_backend_refuses_bad_arrays_the_same_way(name, images, message, resnet18_checkpoint, resnet18_onnx):
    artifact = resnet18_checkpoint if name == "torch" else resnet18_onnx
    with open_backend(artifact, name) as backend, pytest.raises(UserError, match=message):
        backend.predict(images)


def _tree_with_markup_names(root: Path, dataset) -> Path:
    folder = root / "in" / "[" / "x]" / "[bold]"
    folder.mkdir(parents=True)
    shutil.copy(next(dataset.test_good.glob("*.png")), folder / "part[red].png")
    (folder / "broken[/b].png".replace("/", "")).write_bytes(b"not an image")
    return root / "in"


def test_names_with_rich_markup_are_shown_literally(resnet18_onnx, dataset, tmp_path):
    inputs = _tree_with_markup_names(tmp_path, dataset)
    json_path = tmp_path / "r.json"
    result = run_cli("predict", resnet18_onnx, inputs, "--json", json_path, "--csv", tmp_path / "r.csv")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "[/x]/[bold]/part[red].png" in result.stdout and "[/x]/[bold]/broken[b].png" in result.stdout
    files = {row["file"] for row in _strict_json(json_path)["results"]}
    assert files == {"[/x]/[bold]/part[red].png", "[/x]/[bold]/broken[b].png"}
    missing = run_cli("predict", tmp_path / "[/x]" / "m[bold].onnx", inputs)
    assert "[/x]/m[bold].onnx: no such file" in error_line(missing)


def test_undecodable_file_names_reach_csv_and_json(resnet18_onnx, dataset, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    odd = os.fsdecode(b"part\xff\xfe.png")
    shutil.copy(next(dataset.test_good.glob("*.png")), folder / odd)
    result = run_cli("predict", resnet18_onnx, folder, "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv")
    assert result.returncode == 0, result.stderr
    (row,) = _strict_json(tmp_path / "r.json")["results"]
    assert row["file"] == "part\\xff\\xfe.png" and row["status"] == "ok"
    assert next(csv.DictReader((tmp_path / "r.csv").open()))["file"] == "part\\xff\\xfe.png"


def test_a_glob_over_a_symlink_cycle_ends(resnet18_onnx, dataset, tmp_path):
    folder = tmp_path / "tree" / "a"
    folder.mkdir(parents=True)
    shutil.copy(next(dataset.test_good.glob("*.png")), folder / "x.png")
    (folder / "loop").symlink_to("..")
    result = run_cli("predict", resnet18_onnx, str(tmp_path / "tree" / "**" / "*.png"), "--json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert [row["file"] for row in _strict_json(tmp_path / "r.json")["results"]] == ["a/x.png"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--json", "MODEL"), "is also an input"),
        (("--csv", "IMAGE"), "is also an input"),
        (("--json", "same.out", "--csv", "same.out"), "given for two outputs"),
    ],
    ids=["json-is-the-model", "csv-is-an-input", "json-is-csv"],
)
def test_outputs_never_overwrite_the_model_an_input_or_each_other(args, fragment, resnet18_onnx, dataset, tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copy(resnet18_onnx, model)
    image = tmp_path / "image.png"
    shutil.copy(next(dataset.test_good.glob("*.png")), image)
    before = (model.read_bytes(), image.read_bytes())
    args = tuple({"MODEL": str(model), "IMAGE": str(image)}.get(arg, arg) for arg in args)
    assert fragment in error_line(run_cli("predict", model, image, *args, cwd=tmp_path))
    assert (model.read_bytes(), image.read_bytes()) == before


@pytest.mark.parametrize("name", ["../../x", "", ".hidden", "a/b"])
def test_export_names_stay_inside_the_output_folder(name, resnet18_checkpoint, tmp_path):
    assert "give a plain file name" in error_line(
        run_cli("export", resnet18_checkpoint, "-o", tmp_path, "--name", name)
    )
    assert list(tmp_path.iterdir()) == []


def _read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder
    # root writes through permission bits: a read-only tmpfs is the honest test there
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only folder here: {mounted.stderr.decode().strip()}")
    return folder


def test_a_read_only_output_folder_is_refused_before_any_work(resnet18_onnx, dataset, tmp_path):
    folder = _read_only_folder(tmp_path)
    try:
        started = time.perf_counter()
        line = error_line(run_cli("predict", resnet18_onnx, dataset.test_good, "--json", folder / "r.json"))
        assert f"{folder}: this folder is not writable" in line and ".part" not in line
        assert time.perf_counter() - started < 30  # answered before the model was loaded and the images scored
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def _run_with_file_size_limit(limit: int, *args: object) -> subprocess.CompletedProcess[str]:
    """A full disk, seen as the writer sees it: writes past ``limit`` bytes fail (EFBIG)."""

    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "patchcore_trt", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, preexec_fn=limit_writes)


def test_a_full_visuals_disk_keeps_every_result(resnet18_onnx, dataset, tmp_path):
    json_path = tmp_path / "r.json"
    result = _run_with_file_size_limit(
        64_000, "predict", resnet18_onnx, dataset.test_good, "--json", json_path, "--save-visuals", tmp_path / "v"
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "stopped writing visuals" in result.stderr and ".part" not in result.stderr
    assert len(_strict_json(json_path)["results"]) == 3
    assert not list(tmp_path.rglob("*.part"))


def test_a_full_results_disk_is_one_line_and_leaves_no_half_file(resnet18_onnx, dataset, tmp_path):
    json_path = tmp_path / "r.json"
    result = _run_with_file_size_limit(1_000, "predict", resnet18_onnx, dataset.test_good, "--json", json_path)
    assert error_line(result) == f"error: {json_path}: File too large"
    assert not json_path.exists() and not list(tmp_path.rglob("*.part"))


def _interrupt_when(process: subprocess.Popen, ready: callable, limit: float = 120) -> tuple[str, str]:
    deadline = time.monotonic() + limit
    while not ready() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    return process.communicate(timeout=limit)


def _popen(*args: object) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "patchcore_trt", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_ctrl_c_during_predict_keeps_what_was_scored(resnet18_checkpoint, dataset, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    source = next(dataset.test_good.glob("*.png"))
    for index in range(200):
        shutil.copy(source, folder / f"{index:03d}.png")
    json_path = tmp_path / "r.json"
    process = _popen("predict", resnet18_checkpoint, folder, "--json", json_path, "--batch-size", "1")
    staged = lambda: any(path.stat().st_size > 2000 for path in tmp_path.glob(".r.json.*.part"))  # noqa: E731
    _, stderr = _interrupt_when(process, staged)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert "interrupted: stopped by Ctrl-C" in stderr
    saved = _strict_json(json_path)
    assert saved["summary"]["interrupted"] is True and 0 < len(saved["results"]) < 200
    assert all(row["status"] == "ok" for row in saved["results"])


def test_ctrl_c_during_export_leaves_nothing_under_the_final_name(resnet18_checkpoint, tmp_path):
    process = _popen("export", resnet18_checkpoint, "-o", tmp_path)
    started = lambda: any(tmp_path.glob(".model.onnx.*"))  # noqa: E731
    _, stderr = _interrupt_when(process, started)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert not (tmp_path / "model.onnx").exists() and list(tmp_path.iterdir()) == []


def test_float_and_gif_images_decode_as_anomalib_reads_them(resnet18_onnx, dataset, tmp_path):
    rgb = np.asarray(Image.open(next(dataset.test_good.glob("*.png"))).convert("L"), dtype=np.float32)
    Image.fromarray(rgb, mode="F").save(tmp_path / "float255.tif")  # 0..255 floats: 8-bit values
    Image.fromarray(rgb / 255, mode="F").save(tmp_path / "float1.tif")  # the same picture in [0, 1]
    Image.fromarray(rgb.astype(np.uint8)).save(tmp_path / "frame.gif")
    json_path = tmp_path / "r.json"
    assert run_cli("predict", resnet18_onnx, tmp_path, "--json", json_path).returncode == 0
    scores = {row["file"]: row["score"] for row in _strict_json(json_path)["results"]}
    assert scores["float255.tif"] == pytest.approx(scores["float1.tif"], abs=1e-6)
    assert scores["frame.gif"] == pytest.approx(scores["float1.tif"], abs=1e-5)


def _with_metadata(source: Path, path: Path, value: str) -> Path:
    model = onnx.load(str(source))
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = value
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ("{}", "metadata format None comes from an unknown writer"),
        ('{"format": 99}', "metadata format 99 comes from a newer patchcore-trt"),
        ("MODEL_SIZE", "model_size"),
    ],
    ids=["not-json", "list", "empty", "format-99", "model-size-text"],
)
def test_damaged_onnx_metadata_is_one_line(value, fragment, resnet18_onnx, dataset, tmp_path):
    if value == "MODEL_SIZE":
        document = json.loads(read_onnx_metadata(resnet18_onnx).to_json())
        value = json.dumps({**document, "model_size": "large"})
    damaged = _with_metadata(resnet18_onnx, tmp_path / "damaged.onnx", value)
    assert fragment in error_line(run_cli("predict", damaged, dataset.test_good))


def test_an_empty_onnx_is_called_empty(dataset, tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "the file is empty" in error_line(run_cli("predict", tmp_path / "empty.onnx", dataset.test_good))


def test_reexport_with_external_data_replaces_it_and_a_missing_one_is_named(
    resnet18_checkpoint, dataset, tmp_path, monkeypatch
):
    from patchcore_trt import artifact

    monkeypatch.setattr(artifact, "EXTERNAL_DATA_THRESHOLD", 1000)
    spec = read_checkpoint(resnet18_checkpoint)
    path = tmp_path / "big.onnx"
    sizes = []
    for _ in range(2):
        export_onnx(spec, path, check=False)
        sizes.append((tmp_path / "big.onnx.data").stat().st_size)
    assert sizes[0] == sizes[1]  # rewritten, never appended to
    assert (tmp_path / "big.onnx.data").stat().st_mode & 0o044  # readable by others, as a plain write would be
    (tmp_path / "big.onnx.data").unlink()
    assert "external data big.onnx.data is missing" in error_line(run_cli("predict", path, dataset.test_good))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("build", "MODEL", "--workspace", "nan"), "--workspace must be a number of GiB"),
        (("build", "MODEL", "--workspace", "1e30"), "--workspace must be a number of GiB"),
        (("export", "CKPT", "-o", "out", "--opset", "99"), "opset 99 is not supported"),
        (("export", "CKPT", "-o", "out", "--image-size", "100000"), "at least 32 and at most 8192"),
        (("bench", "--synthetic", "--sizes", "100000", "-o", "b"), "at least 32 and at most 8192"),
    ],
    ids=["workspace-nan", "workspace-huge", "opset-99", "image-size-huge", "bench-size-huge"],
)
def test_out_of_range_options_are_one_line(args, fragment, resnet18_onnx, resnet18_checkpoint, tmp_path):
    args = tuple({"MODEL": str(resnet18_onnx), "CKPT": str(resnet18_checkpoint)}.get(arg, arg) for arg in args)
    assert fragment in error_line(run_cli(*args, cwd=tmp_path))


def test_usage_errors_are_one_line():
    result = run_cli("predict", "--no-such-option", "a", "b")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line == "error: No such option: --no-such-option (see: patchcore-trt predict --help)"


def test_a_hub_backbone_says_the_hub_is_offline(resnet18_checkpoint, dataset, tmp_path):
    spec = read_checkpoint(resnet18_checkpoint)
    hub = write_checkpoint(replace(spec, backbone="hf-hub:timm/resnet18.a1_in1k"), tmp_path / "hub.ckpt")
    line = error_line(run_cli("predict", hub, dataset.test_good))
    assert "defined on the Hugging Face Hub" in line and "HF_HUB_OFFLINE is set" in line
