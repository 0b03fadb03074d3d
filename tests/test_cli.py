"""The command line as a user meets it: results, files, exit codes, and one-line errors."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import error_line, run_cli

import patchcore_trt
from patchcore_trt.artifact import read_onnx_metadata
from patchcore_trt.files import sha256_of
from patchcore_trt.report import format_score


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


def _run_narrow(*args: object, columns: int) -> subprocess.CompletedProcess[str]:
    """``patchcore-trt ARGS`` in a pipe (no terminal) that says it is ``columns`` wide."""
    env = {**os.environ, "COLUMNS": str(columns), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "patchcore_trt", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def _strict(text: str) -> dict:
    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def readable_run(resnet18_onnx, dataset, tmp_path_factory):
    """One predict run as a user reads it: equal images named img_1, img_2, img_10 in a long folder name, a broken
    file, --top 2, JSON and CSV, in a 40-column pipe."""
    root = tmp_path_factory.mktemp("readable")
    folder = root / "in" / "a_rather_long_folder_name_of_parts_from_line_seven"
    folder.mkdir(parents=True)
    source = next(dataset.test_defect.glob("*.png"))
    for number in (10, 2, 1):
        shutil.copy(source, folder / f"img_{number}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    json_path, csv_path = root / "r.json", root / "r.csv"
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    result = _run_narrow(
        "predict",
        resnet18_onnx,
        root / "in",
        "--top",
        "2",
        "--batch-size",
        "1",
        "--json",
        json_path,
        "--csv",
        csv_path,
        columns=40,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr  # one input failed
    prefix = folder.name
    return result, _strict(json_path.read_text()), list(csv.DictReader(csv_path.open())), prefix, started


def test_json_header_names_the_model_the_run_and_the_versions(readable_run, resnet18_onnx):
    _, saved, _, _, started = readable_run
    model = saved["model"]
    assert model["file"] == str(resnet18_onnx) and model["sha256"] == sha256_of(resnet18_onnx)
    assert model["backend"] == "onnxruntime" and model["device"] == "cpu"
    metadata = read_onnx_metadata(resnet18_onnx)
    assert (
        model["image_threshold"] == metadata.image_threshold and model["postprocess"] == metadata.postprocess.to_dict()
    )
    assert saved["tool"]["name"] == "patchcore-trt" and saved["tool"]["version"] == patchcore_trt.__version__
    for package in ("numpy", "onnxruntime", "torch"):
        assert saved["versions"][package] == importlib.metadata.version(package)
    when = datetime.datetime.fromisoformat(saved["started"])
    assert started <= when <= datetime.datetime.now(datetime.timezone.utc)


def test_rows_come_in_natural_order_with_numbers_as_numbers_or_null(readable_run):
    _, saved, rows, prefix, _ = readable_run
    records = saved["results"]
    assert [record["file"] for record in records] == [
        f"{prefix}/{name}.png" for name in ("broken", "img_1", "img_2", "img_10")
    ]
    post, threshold = saved["model"]["postprocess"], saved["model"]["image_threshold"]
    for record in records[1:]:
        assert record["status"] == "ok" and record["label"] in ("normal", "anomalous")
        for key in ("score", "threshold", "map_max", "mask_fraction", "ms"):
            assert isinstance(record[key], float), (key, record[key])
        assert isinstance(record["height"], int) and isinstance(record["width"], int)
        assert record["threshold"] == threshold
        assert record["label"] == ("anomalous" if record["score"] > threshold else "normal")
        if 0 < record["score"] < 1:  # the un-normalised distance, from the model's own min-max statistics
            expected = (record["score"] - 0.5) * (post["image_max"] - post["image_min"]) + post["image_threshold"]
            assert record["raw_score"] == pytest.approx(expected, rel=1e-6)
        else:
            assert record["raw_score"] is None  # clipped: the distance cannot be recovered
    failed = records[0]
    assert failed["status"] == "error" and failed["error"]
    assert all(failed[key] is None for key in ("score", "label", "raw_score", "threshold", "height", "ms"))
    # The CSV holds the same rows: the same order, raw_score and threshold columns, empty cells for null.
    assert [row["file"] for row in rows] == [record["file"] for record in records]
    for row, record in zip(rows, records, strict=True):
        for key in ("score", "raw_score", "threshold"):
            assert row[key] == ("" if record[key] is None else repr(record[key]))


def test_summary_shows_top_n_timings_and_whole_names_in_a_narrow_pipe(readable_run):
    result, saved, _, prefix, _ = readable_run
    lines = result.stdout.splitlines()
    summary = saved["summary"]
    assert summary["scored"] == 3 and summary["failed"] == 1
    head = re.fullmatch(
        r"model\.onnx \(onnxruntime\): 3 scored, (\d+) anomalous, 1 failed in ([\d.]+) s "
        r"\(([\d.]+) ms per image\), ([\d.]+) images/s; threshold ([\d.]+)",
        lines[0],
    )
    assert head is not None, lines[0]
    assert int(head.group(1)) == summary["anomalous"]
    assert float(head.group(3)) == pytest.approx(1000 * summary["seconds"] / 4, abs=0.051)
    assert float(head.group(4)) == pytest.approx(summary["images_per_second"], abs=0.051)
    assert float(head.group(5)) == saved["model"]["image_threshold"]
    # --top 2: two ranked lines, the equal scores in natural order; names whole though the pipe is 40 wide.
    start = lines.index(next(line for line in lines if line.startswith("most anomalous")))
    ranked = lines[start + 1 : lines.index(next(line for line in lines if line.startswith("failed (1)")))]
    assert [line.split()[-1] for line in ranked] == [f"{prefix}/img_1.png", f"{prefix}/img_2.png"]
    assert f"  {prefix}/broken.png: " in result.stdout


@pytest.mark.parametrize(
    ("score", "threshold"),
    [(0.4999996, 0.5), (0.50000004, 0.5), (0.12345, 0.1235), (0.9999999, 1.0), (0.7, 0.5), (0.5, 0.5)],
)
def test_a_shown_score_is_never_rounded_across_or_onto_the_threshold(score, threshold):
    text = format_score(score, threshold)
    assert (float(text) > threshold) == (score > threshold)
    if score != threshold:
        assert float(text) != threshold and len(text.split(".")[1]) >= 4
    else:
        assert float(text) == score


def test_a_score_just_under_the_threshold_keeps_its_digits():
    assert format_score(0.4999996, 0.5) == "0.4999996"  # just under the threshold: not "0.5000 normal"
    assert format_score(0.61234, 0.5) == "0.6123"  # far from it: four decimals


def test_a_checkpoint_gives_the_raw_score_of_every_image_clipped_or_not(resnet18_checkpoint, resnet18_onnx, dataset,
                                                                        tmp_path):  # fmt: skip
    # The torch backend computes the un-normalised score itself: a clipped score (0 or 1) keeps it, so the worst
    # defects and the calmest parts can still be ranked.
    json_path, onnx_json = tmp_path / "torch.json", tmp_path / "onnx.json"
    torch_run = run_cli("predict", resnet18_checkpoint, dataset.root / "test", "--json", json_path, "--top", "6")
    assert torch_run.returncode == 0, torch_run.stderr
    assert run_cli("predict", resnet18_onnx, dataset.root / "test", "--json", onnx_json).returncode == 0
    saved = _strict(json_path.read_text())
    post = saved["model"]["postprocess"]
    half_range = 0.5 * (post["image_max"] - post["image_min"])
    records = saved["results"]
    assert any(record["score"] in (0.0, 1.0) for record in records), "the set has no clipped score to test"
    for record, onnx_record in zip(records, _strict(onnx_json.read_text())["results"], strict=True):
        raw = record["raw_score"]
        assert isinstance(raw, float), record
        if record["score"] == 0.0:
            assert raw <= post["image_threshold"] - half_range and onnx_record["raw_score"] is None
        elif record["score"] == 1.0:
            assert raw >= post["image_threshold"] + half_range and onnx_record["raw_score"] is None
        else:  # where the normalisation can be undone, both agree with it
            assert raw == pytest.approx(onnx_record["raw_score"], rel=1e-5)
    # The summary ranks equal (clipped) scores by their raw score: the worst of them first.
    ranked = sorted(records, key=lambda record: (-record["score"], -record["raw_score"]))
    shown = torch_run.stdout.split("most anomalous")[1].splitlines()[1:]
    assert [line.split()[-1] for line in shown] == [record["file"] for record in ranked]
