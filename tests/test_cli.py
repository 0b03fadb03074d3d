"""The command line as a user meets it: results, files, exit codes, and one-line errors."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import error_line, run_cli


def test_help_works():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("export", "predict", "demo"):
        assert command in result.stdout


def test_export_then_predict_with_files_and_a_broken_image(resnet18_checkpoint, dataset, tmp_path):
    exported = run_cli("export", resnet18_checkpoint, "-o", tmp_path / "out")
    assert exported.returncode == 0, exported.stderr
    onnx_path = tmp_path / "out" / "model.onnx"
    assert onnx_path.is_file() and "self-check" in exported.stdout

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    json_path, csv_path, visuals = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "vis"
    page = tmp_path / "report.html"
    result = run_cli(
        "predict", onnx_path, dataset.test_defect, broken, "--json", json_path, "--csv", csv_path,
        "--save-visuals", visuals, "--report", page,
    )  # fmt: skip
    assert result.returncode == 1  # one input failed ...
    records = json.loads(json_path.read_text())["results"]
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 3 and all(0 <= r["score"] <= 1 and r["label"] for r in ok)  # ... the others are all there
    (failed,) = [r for r in records if r["status"] == "error"]
    assert failed["file"] == str(broken) and "corrupt" in failed["error"]
    assert len(list(csv.DictReader(csv_path.open()))) == 4
    assert len(list(visuals.glob("*.overlay.png"))) == len(list(visuals.glob("*.panel.png"))) == 3
    assert "broken.png" in result.stdout
    html = page.read_text(encoding="utf-8")  # the page's contents are tested in test_html_report.py
    assert html.count("<figure ") == 3 and "broken.png" in html
    assert '<div class="value">3</div><div class="key">scored</div>' in html


def test_predict_checkpoint_with_openvino_is_refused(resnet18_checkpoint, dataset):
    result = run_cli("predict", resnet18_checkpoint, dataset.test_good, "--backend", "openvino")
    assert "runs .onnx files" in error_line(result)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("predict", "missing.onnx", "."), "no such file"),
        (("predict", "model.xyz", "."), "don't know how to run"),
        (("predict", "m.onnx", ".", "--backend", "nope"), "unknown backend 'nope'"),
        (("predict", "m.onnx", ".", "--device", "tpu"), "runs on cpu, cuda, not 'tpu'"),
        (("export", "notes.txt", "-o", "x"), "expected an anomalib .ckpt"),
        (("predict", "m.onnx", ".", "--backbone-dtype", "fp16"), "apply to --backend cuda"),
        (("predict", "m.onnx", ".", "--csv", "."), "is a folder; give a file name"),
        (("predict", "m.onnx", ".", "--json", "model.xyz/r.json"), "is a file, not a folder"),
        (("export", "a.ckpt", "-o", "model.xyz"), "is a file, not a folder"),
    ],
)
def test_bad_input_is_one_line(args, fragment, tmp_path):
    (tmp_path / "model.xyz").write_text("?")
    (tmp_path / "m.onnx").write_text("?")
    assert fragment in error_line(run_cli(*args, cwd=tmp_path))


def test_predict_with_no_images(resnet18_onnx, tmp_path):
    assert "no input images found" in error_line(run_cli("predict", resnet18_onnx, tmp_path))


def test_csv_keeps_every_column_when_the_first_file_failed(resnet18_onnx, dataset, tmp_path):
    broken = tmp_path / "0_broken.png"
    broken.write_text("not an image")
    csv_path = tmp_path / "r.csv"
    result = run_cli("predict", resnet18_onnx, broken, dataset.test_good, "--csv", csv_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["status"] for row in rows] == ["error", "ok", "ok", "ok"]
    assert rows[0]["score"] == "" and rows[1]["map_max"] != ""
