"""The command line as a user meets it: results, files, exit codes, and one-line errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "patchcore_trt"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_help_works():
    result = run("--help")
    assert result.returncode == 0
    for command in ("export", "predict", "demo"):
        assert command in result.stdout


def test_export_then_predict_with_files_and_a_broken_image(resnet18_checkpoint, dataset, tmp_path):
    exported = run("export", resnet18_checkpoint, "-o", tmp_path / "out")
    assert exported.returncode == 0, exported.stderr
    onnx_path = tmp_path / "out" / "model.onnx"
    assert onnx_path.is_file() and "self-check" in exported.stdout

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    json_path, csv_path, visuals = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "vis"
    result = run(
        "predict", onnx_path, dataset.test_defect, broken, "--json", json_path, "--csv", csv_path,
        "--save-visuals", visuals,
    )  # fmt: skip
    assert result.returncode == 1  # one input failed ...
    records = json.loads(json_path.read_text())["results"]
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 3 and all(0 <= r["score"] <= 1 and r["label"] for r in ok)  # ... the others are all there
    (failed,) = [r for r in records if r["status"] == "error"]
    assert failed["file"] == str(broken) and "corrupt" in failed["error"]
    assert len(list(csv.DictReader(csv_path.open()))) == 4
    assert len(list(visuals.glob("*.overlay.png"))) == 3
    assert "broken.png" in result.stdout


def test_predict_checkpoint_with_openvino_is_refused(resnet18_checkpoint, dataset):
    assert_one_line_error(
        run("predict", resnet18_checkpoint, dataset.test_good, "--backend", "openvino"), "runs .onnx files"
    )


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("predict", "missing.onnx", "."), ("no such file",)),
        (("predict", "model.xyz", "."), ("don't know how to run",)),
        (("predict", "m.onnx", ".", "--backend", "nope"), ("unknown backend 'nope'",)),
        (("export", "notes.txt", "-o", "x"), ("expected an anomalib .ckpt",)),
    ],
)
def test_bad_input_is_one_line(args, fragments, tmp_path):
    (tmp_path / "model.xyz").write_text("?")
    (tmp_path / "m.onnx").write_text("?")
    result = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"}, timeout=300
    )
    assert_one_line_error(result, *fragments)


def test_predict_with_no_images(resnet18_onnx, tmp_path):
    assert_one_line_error(run("predict", resnet18_onnx, tmp_path), "no input images found")
