"""Hostile and broken inputs, as a user meets them: one error line or a per-image error row, the right exit code,
no traceback, every other result kept, no file replaced or half-written, and always valid JSON.

Special files and full disks are made inside the tests (a FIFO, a file-size limit), never the system's own.
"""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import error_line, peak_run, run_cli
from PIL import Image

from patchcore_trt.artifact import METADATA_KEY, read_onnx_metadata
from patchcore_trt.checkpoint import read_checkpoint, write_checkpoint
from patchcore_trt.errors import UserError
from patchcore_trt.export import export_onnx
from patchcore_trt.files import sha256_of
from patchcore_trt.runtime import open_backend


def _strict_loads(text: str) -> dict:
    """Parse as strict JSON: NaN or Infinity tokens are refused."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _strict_json(path: Path) -> dict:
    return _strict_loads(path.read_text())


def _rows(flag: str, text: str) -> list[dict]:
    """The result rows of a --json or --csv output."""
    if flag == "--json":
        return _strict_loads(text)["results"]
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.parametrize("flag", ["--json", "--csv"])
def test_results_to_a_fifo_are_written_into_it_not_renamed_over(flag, resnet18_onnx, dataset, tmp_path):
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = run_cli("predict", resnet18_onnx, dataset.test_good, flag, fifo)
    reader.join(timeout=60)
    assert result.returncode == 0, result.stderr
    assert fifo.is_fifo()  # still the pipe, not a regular file put in its place
    assert [row["status"] for row in _rows(flag, received[0].decode())] == ["ok"] * 3


def _stdout_link(tmp_path: Path) -> Path:
    """A private stand-in for /dev/stdout (the system's own is never touched): a link to /proc/self/fd/1."""
    link = tmp_path / "mystdout"
    link.symlink_to("/proc/self/fd/1")
    return link


def _run_with_stdout_to(path: Path, *args: object) -> subprocess.CompletedProcess[str]:
    """``patchcore-trt ARGS > path``, as a shell runs it: stdout is the regular file ``path``."""
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "patchcore_trt", *map(str, args)]
    with path.open("w") as stdout:
        return subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, timeout=600)


@pytest.mark.parametrize("flag", ["--json", "--csv"])
def test_results_to_stdout_redirected_to_a_file_land_in_that_file(flag, resnet18_onnx, dataset, tmp_path):
    link, captured = _stdout_link(tmp_path), tmp_path / "out.txt"
    result = _run_with_stdout_to(captured, "predict", resnet18_onnx, dataset.test_good, flag, link)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"  # never renamed over
    assert [row["status"] for row in _rows(flag, captured.read_text())] == ["ok"] * 3  # the file holds them alone
    assert "3 scored" in result.stderr  # the summary went to stderr, out of the results' way
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mystdout", "out.txt"]  # no .part left


def test_results_to_a_piped_stdout_are_alone_on_it(resnet18_onnx, dataset, tmp_path):
    link = _stdout_link(tmp_path)
    result = run_cli("predict", resnet18_onnx, dataset.test_good, "--json", link)  # stdout is a pipe: `| jq`
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert len(_strict_loads(result.stdout)["results"]) == 3
    assert "3 scored" in result.stderr and "most anomalous" in result.stderr
    assert link.is_symlink()


def test_verify_json_to_stdout_is_alone_on_it(resnet18_checkpoint, resnet18_onnx, dataset, tmp_path):
    link = _stdout_link(tmp_path)
    result = run_cli(
        "verify", resnet18_checkpoint, dataset.test_good, "--onnx", resnet18_onnx, "--backends", "onnxruntime",
        "--json", link,
    )  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    rows = [row for row in _strict_loads(result.stdout)["rows"] if row["checked"]]
    assert [row["name"] for row in rows] == ["onnxruntime"]
    assert "parity vs anomalib" in result.stderr and link.is_symlink()


def test_a_symlink_to_a_results_file_stays_a_link(resnet18_onnx, dataset, tmp_path):
    real = tmp_path / "kept" / "r.json"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(real)
    result = run_cli("predict", resnet18_onnx, dataset.test_good, "--json", link)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert len(_strict_json(real)["results"]) == 3
    assert not list(tmp_path.rglob("*.part"))


@pytest.mark.parametrize(("minor", "message"), [(3, None), (7, "No space left on device")], ids=["null", "full"])
def test_results_to_a_character_device_are_written_into_it(minor, message, resnet18_onnx, dataset, tmp_path):
    device = tmp_path / "device"
    try:  # a private /dev/null (1, 3) or /dev/full (1, 7); the system's own are never touched
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
        device.open("w").close()
    except OSError as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    result = run_cli("predict", resnet18_onnx, dataset.test_good, "--json", device)
    if message is None:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    else:
        assert error_line(result) == f"error: {device}: {message}"
    assert stat.S_ISCHR(device.lstat().st_mode)  # still the device, not a file put in its place
    assert [path.name for path in tmp_path.iterdir()] == ["device"]


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


def test_a_read_only_output_folder_is_refused_before_any_work(dataset, tmp_path):
    folder = _read_only_folder(tmp_path)
    damaged = tmp_path / "model.onnx"  # read before the outputs are checked, it would give its own error
    damaged.write_bytes(b"damaged: not a model")
    try:
        line = error_line(run_cli("predict", damaged, dataset.test_good, "--json", folder / "r.json"))
        assert f"{folder}: this folder is not writable" in line and ".part" not in line
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


WRITE_BLOCKED = [
    ("predict", "ONNX", "IMAGES", "--csv", "BLOCKED/r.csv"),
    ("predict", "ONNX", "IMAGES", "--report", "BLOCKED/r.html"),
    ("predict", "ONNX", "IMAGES", "--save-visuals", "BLOCKED/visuals"),
    ("verify", "CKPT", "IMAGES", "--onnx", "ONNX", "--backends", "onnxruntime", "--report", "BLOCKED/v.html"),
    ("export", "CKPT", "-o", "BLOCKED/out"),
    ("bench", "--synthetic", "--backbone", "resnet18", "--bank", "64", "--sizes", "64", "--backends", "onnxruntime",
     "-o", "BLOCKED/bench"),
    ("build", "ONNX", "--precision", "int8", "--calibration-cache", "BLOCKED/c.json"),
    ("build", "ONNX", "--timing-cache", "BLOCKED/timing.cache"),
    ("triton", "ONNX", "-o", "BLOCKED/repo"),
]  # fmt: skip


@pytest.mark.parametrize(
    "args",
    WRITE_BLOCKED,
    ids=["csv", "report", "visuals", "verify-report", "export", "bench", "build-calibration", "build-timing", "triton"],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(args, dataset, tmp_path):
    # Tests may run as root, whom permission bits do not stop: a path under a regular file cannot be made by anyone.
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    # The order is the test: the models are damaged files, so a command that read its model (or ran anything that
    # does) before checking its outputs would answer with the model's error instead.
    models = tmp_path / "models"
    models.mkdir()
    names = {"ONNX": models / "model.onnx", "CKPT": models / "model.ckpt", "IMAGES": dataset.test_good}
    for name in ("ONNX", "CKPT"):
        names[name].write_bytes(b"damaged: not a model")
    args = tuple(str(names.get(arg, arg)).replace("BLOCKED", str(blocker)) for arg in args)
    line = error_line(run_cli(*args, cwd=tmp_path))
    assert line == f"error: {blocker}: is a file, not a folder"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file.txt", "models"]
    assert blocker.read_text() == "a file, not a folder"


def _read_only_folder_holding(tmp_path: Path, source: Path) -> Path:
    """A read-only folder that holds a copy of ``source`` (a tmpfs remounted read-only where we are root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        shutil.copy(source, folder / source.name)
        folder.chmod(0o555)
        return folder
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only folder here: {mounted.stderr.decode().strip()}")
    shutil.copy(source, folder / source.name)
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
    return folder


def test_build_beside_a_read_only_model_is_refused_before_any_work(tmp_path):
    damaged = tmp_path / "model.onnx"  # read before the output folder is checked, it would give its own error
    damaged.write_bytes(b"damaged: not a model")
    folder = _read_only_folder_holding(tmp_path, damaged)
    try:
        line = error_line(run_cli("build", folder / damaged.name, "--precision", "fp16"))
        assert line == f"error: {folder}: this folder is not writable; choose another output location"
        assert [path.name for path in folder.iterdir()] == [damaged.name]
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.mark.parametrize(
    ("command", "fragment", "never"),
    [
        ("triton", "is a folder holding no .ckpt checkpoint; expected a model file", "> writing"),
        ("predict", "is a folder; expected a model file", ">"),
        ("verify", "give the exported graph with --onnx", "exporting"),
    ],
    ids=["triton-folder", "predict-folder", "verify-onnx"],
)
def test_the_wrong_kind_of_model_is_one_line_before_anything_starts(
    command, fragment, never, resnet18_onnx, dataset, tmp_path
):
    folder = tmp_path / "mdl"
    folder.mkdir()
    args = {
        "triton": ("triton", folder, "-o", tmp_path / "repo"),
        "predict": ("predict", folder, dataset.test_good),
        "verify": ("verify", resnet18_onnx, dataset.test_good),
    }[command]
    result = run_cli(*args)
    assert fragment in error_line(result)
    assert never not in result.stderr and result.stdout == ""
    assert [path.name for path in tmp_path.iterdir()] == ["mdl"]


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
    """The command as a user's terminal starts it: Ctrl-C (SIGINT) delivered, even when this suite runs as a
    background job (a shell starts those with SIGINT ignored, and Python then never raises KeyboardInterrupt)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "patchcore_trt", *map(str, args)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def test_predict_memory_stays_flat_over_many_images(resnet18_onnx, dataset, tmp_path):
    """Results stream to the JSON and CSV as they come, so 10x the images costs about the same memory; keeping
    each map and mask to the end cost ~0.29 MB per image at this size.

    Measured as the resident memory when the command returns (after the JSON and CSV are closed): the peak
    itself is a ~1.2 GB start-up transient that would hide the growth. A kept list of results shows here as
    ~0.07 MB per image (it first fills the pages that transient freed); streaming, as ~0.
    """
    source = sorted(dataset.test_good.iterdir())[0]  # a generated 300 x 340 test image, scored at 256 x 256
    peaks = {}
    for count in (40, 400):
        folder = tmp_path / f"images_{count}"
        folder.mkdir()
        for index in range(count):
            os.link(source, folder / f"img_{index}.png")
        outputs = tmp_path / f"results_{count}.json", tmp_path / f"results_{count}.csv"
        result, peaks[count] = peak_run(
            "predict", resnet18_onnx, folder, "--json", outputs[0], "--csv", outputs[1], final=True
        )
        assert result.returncode == 0, result.stderr
        document = json.loads(outputs[0].read_text())
        assert len(document["results"]) == document["summary"]["scored"] == count
        assert len(list(csv.DictReader(outputs[1].open(newline="")))) == count
    growth_mb_per_image = (peaks[400] - peaks[40]) / 1024 / 360
    assert growth_mb_per_image < 0.29 / 10, f"peak {peaks[40] / 1024:.0f} MB -> {peaks[400] / 1024:.0f} MB"


def _many_images(dataset, tmp_path: Path, count: int = 200) -> Path:
    """A folder of ``count`` copies of one test image: a run long enough to interrupt."""
    folder = tmp_path / "many"
    folder.mkdir()
    source = next(dataset.test_good.glob("*.png"))
    for index in range(count):
        shutil.copy(source, folder / f"{index:03d}.png")
    return folder


def test_ctrl_c_during_predict_keeps_what_was_scored(resnet18_checkpoint, dataset, tmp_path):
    folder = _many_images(dataset, tmp_path)
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
    assert stderr.strip().splitlines()[-1] == "interrupted: stopped by Ctrl-C; finished results were kept"
    assert not (tmp_path / "model.onnx").exists() and list(tmp_path.iterdir()) == []


def test_ctrl_c_during_a_reexport_keeps_the_previous_model(resnet18_checkpoint, tmp_path):
    assert run_cli("export", resnet18_checkpoint, "-o", tmp_path).returncode == 0
    before = sha256_of(tmp_path / "model.onnx")
    # A different graph (maps at the input size): had it replaced the first, the hash would differ.
    process = _popen("export", resnet18_checkpoint, "-o", tmp_path, "--map-at-input-size")
    written = lambda: any(path.stat().st_size > 0 for path in tmp_path.glob(".model.onnx.*.part/model.onnx"))  # noqa: E731
    _, stderr = _interrupt_when(process, written)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: stopped by Ctrl-C; finished results were kept"
    assert "self-check" not in stderr and "wrote" not in stderr  # stopped before the graph was checked and named
    assert sha256_of(tmp_path / "model.onnx") == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]  # no staged folder left


def _interrupt_at_line(process: subprocess.Popen, fragment: str, limit: float = 300) -> str:
    """SIGINT once ``fragment`` appears on the process's stderr; the whole stderr."""
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in process.stderr:
            lines.append(line)
            if fragment in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen.wait(timeout=limit)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=limit)
    reader.join(timeout=limit)
    return "".join(lines)


def test_ctrl_c_during_an_engine_build_names_nothing_half_built(resnet18_onnx, tmp_path):
    onnx_path = tmp_path / "model.onnx"
    shutil.copy(resnet18_onnx, onnx_path)
    process = _popen("build", onnx_path, "--shapes", "1x256x256", "1x256x256", "2x256x256")
    stderr = _interrupt_at_line(process, "> building model.fp32.engine")
    assert "> building model.fp32.engine" in stderr, stderr  # interrupted while the builder ran
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: stopped by Ctrl-C; finished results were kept"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]


def test_ctrl_c_while_saving_visuals_keeps_whole_pictures_only(resnet18_onnx, dataset, tmp_path):
    folder = _many_images(dataset, tmp_path)
    visuals = tmp_path / "visuals"
    process = _popen("predict", resnet18_onnx, folder, "--save-visuals", visuals, "--batch-size", "1")
    _, stderr = _interrupt_when(process, lambda: len(list(visuals.glob("*.png"))) >= 8)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert "interrupted: stopped by Ctrl-C" in stderr
    pictures = list(visuals.glob("*.png"))
    assert 8 <= len(pictures) < 4 * 200 and not list(visuals.rglob("*.part"))
    for picture in pictures:  # every file under its final name is a whole PNG
        with Image.open(picture) as image:
            image.load()


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


def test_reexport_with_external_data_replaces_it_and_a_missing_or_truncated_one_is_named(
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
    data = tmp_path / "big.onnx.data"
    whole = data.read_bytes()

    def one_line(*command: object) -> str:
        result = run_cli(*command)
        line = error_line(result)
        others = [row for row in result.stderr.splitlines() if row.strip() and row != line]
        assert all(row.startswith((">", "✓")) for row in others), result.stderr  # the steps; no runtime's own log
        return line

    data.write_bytes(whole[: len(whole) // 2])  # cut mid-tensor: every backend and verify say so in one line
    for command in (
        ("predict", path, dataset.test_good),
        ("predict", path, dataset.test_good, "--backend", "openvino"),
        ("verify", resnet18_checkpoint, dataset.test_good, "--onnx", path, "--backends", "onnxruntime,openvino"),
    ):
        assert "external data big.onnx.data is truncated" in one_line(*command)
    data.write_bytes(b"")
    assert "external data big.onnx.data is truncated (0 of" in one_line("predict", path, dataset.test_good)
    data.unlink()
    assert "external data big.onnx.data is missing" in one_line("predict", path, dataset.test_good)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("build", "MODEL", "--workspace", "nan"), "--workspace must be a number of GiB"),
        (("build", "MODEL", "--workspace", "1e30"), "--workspace must be a number of GiB"),
        (("build", "MODEL", "--workspace", "inf"), "--workspace must be a number of GiB"),
        (("bench", "--synthetic", "--batch", "1e9", "-o", "b"), "--batch takes whole numbers"),
        (("bench", "--synthetic", "--bank", "1e9", "-o", "b"), "--bank takes whole numbers"),
        (("export", "CKPT", "-o", "out", "--opset", "99"), "opset 99 is not supported"),
        (("export", "CKPT", "-o", "out", "--image-size", "100000"), "at least 32 and at most 8192"),
        (("bench", "--synthetic", "--sizes", "100000", "-o", "b"), "at least 32 and at most 8192"),
    ],
    ids=[
        "workspace-nan",
        "workspace-huge",
        "workspace-inf",
        "bench-batch-1e9",
        "bench-bank-1e9",
        "opset-99",
        "image-size-huge",
        "bench-size-huge",
    ],
)
def test_out_of_range_options_are_one_line(args, fragment, resnet18_onnx, resnet18_checkpoint, tmp_path):
    args = tuple({"MODEL": str(resnet18_onnx), "CKPT": str(resnet18_checkpoint)}.get(arg, arg) for arg in args)
    assert fragment in error_line(run_cli(*args, cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_synthetic_bank_larger_than_the_memory_is_refused_before_it_is_built(tmp_path):
    from patchcore_trt.bench.settings import MAX_BANK
    from patchcore_trt.demo.synthetic_model import BANK_BUILD_COPIES, available_memory

    # The largest bank the option takes, with the default backbone (1536 features): about 350 GB to build.
    needed = BANK_BUILD_COPIES * MAX_BANK * 1536 * 4
    if (available_memory() or 0) >= needed:
        pytest.skip("this machine has the memory to build the largest bank")
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "patchcore_trt", "bench", "--synthetic", "--bank", str(MAX_BANK), "--sizes",
               "64", "--backends", "onnxruntime", "-o", "b"]  # fmt: skip
    try:  # a regression starts the build: the timeout stops it long before it fills the memory
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("bench started building a bank larger than the memory instead of refusing it")
    line = error_line(result)
    assert f"a synthetic bank of {MAX_BANK:,} rows x 1536 features needs about {needed / 2**30:.0f} GiB" in line
    assert "GiB available; use a smaller --bank" in line
    assert list(tmp_path.iterdir()) == []


def test_cuda_n_is_taken_as_a_device_and_answered_in_one_line(resnet18_onnx, dataset):
    import torch

    if torch.cuda.device_count() > 1:
        pytest.skip("GPU 1 exists here: cuda:1 runs")
    line = error_line(run_cli("predict", resnet18_onnx, dataset.test_good, "--device", "cuda:1"))
    assert "runs on" not in line  # admitted as a device; refused for what this machine lacks (a provider, a GPU)
    assert "CUDA" in line or "cuda:1" in line


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
