"""verify names the image each largest error is on, per backend and metric, so an image that misses the bar can
be found: in the printed table and in the JSON (beside every field it had)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from patchcore_trt.images import collect_images, load_image
from patchcore_trt.precision import write_fp16_onnx
from patchcore_trt.runtime import open_backend
from patchcore_trt.verify import anomalib_predictions, release_reference, run_each

pytest.importorskip("anomalib")


def test_verify_names_the_worst_image_of_a_backend_that_misses_the_bar(resnet18_checkpoint, resnet18_onnx, dataset,
                                                                       tmp_path):  # fmt: skip
    fp16 = write_fp16_onnx(resnet18_onnx, tmp_path / "fp16.onnx")
    json_path = tmp_path / "verify.json"
    folder = dataset.root / "test"
    result = run_cli("verify", resnet18_checkpoint, folder, "--onnx", fp16, "--backends", "onnxruntime",
                     "--json", json_path)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr

    paths, _ = collect_images([str(folder)])
    images = [load_image(path) for path in paths]
    anomalib = release_reference(resnet18_checkpoint)
    reference, _, _ = anomalib_predictions(resnet18_checkpoint, images, reference=anomalib)
    with open_backend(fp16, "onnxruntime") as backend:
        candidate, _ = run_each(backend, images)
    score_errors = np.abs(candidate.pred_score.astype(np.float64) - reference.pred_score)
    map_errors = np.abs(candidate.anomaly_map.astype(np.float64) - reference.anomaly_map).reshape(len(paths), -1)
    names = [str(path.relative_to(folder)) for path in paths]
    worst_score, worst_map = names[int(score_errors.argmax())], names[int(map_errors.max(axis=1).argmax())]
    differ = [name for name, a, b in zip(names, candidate.pred_label, reference.pred_label, strict=True) if a != b]

    document = json.loads(json_path.read_text())
    (row,) = [row for row in document["rows"] if row["name"] == "onnxruntime"]
    assert row["worst_images"] == {"score": worst_score, "map": worst_map, "labels_differ": differ}
    assert row["figures"]["worst_score_image"] == names.index(worst_score)  # the index into "images", too
    assert row["figures"]["max_score_error"] == pytest.approx(float(score_errors.max()), rel=1e-6)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("| onnxruntime")]
    cell = worst_score if worst_score == worst_map else f"score {worst_score}, map {worst_map}"
    assert f"| {cell} | FAIL |" in line
    (forward,) = [line for line in result.stdout.splitlines() if line.startswith("| anomalib forward")]
    assert "| - | - |" in forward  # anomalib against itself: no worst image
