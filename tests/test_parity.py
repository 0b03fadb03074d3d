"""The parity bar: every CPU backend against anomalib's own AnomalibModule.forward on real checkpoints.

|d pred_score| <= 1e-5, max |d anomaly_map| <= 1e-4, identical labels; for WRN50 and ResNet18, at the
default 256 and at 320, on raw images of another size (300 x 340), one by one and batched.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import RESNET18, WRN50

from patchcore_trt.compare import PARITY_BAR, compare
from patchcore_trt.runtime import open_backend
from patchcore_trt.verify import LIGHTNING_ROW, REFERENCE_ROW, anomalib_predictions, backend_parity

SCORE_TOLERANCE, MAP_TOLERANCE = PARITY_BAR.score, PARITY_BAR.map

CASES = [(RESNET18, 256), (RESNET18, 320), (WRN50, 256), (WRN50, 320)]


@pytest.mark.parametrize(("backbone", "size"), CASES, ids=[f"{b}-{s}" for b, s in CASES])
def test_every_backend_matches_anomalib_forward(backbone, size, trained, exported, test_images):
    _, images = test_images
    rows, reference = backend_parity(trained(backbone, size), exported(backbone, size), images)
    assert reference.anomaly_map.shape == (len(images), 1, size, size)
    by_name = {row.name: row for row in rows}
    assert set(by_name) == {REFERENCE_ROW, LIGHTNING_ROW, "torch", "onnxruntime", "openvino"}
    assert [row.name for row in rows if row.checked] == ["torch", "onnxruntime", "openvino"]
    for name in ("torch", "onnxruntime", "openvino"):
        figures = by_name[name].figures
        assert figures.max_score_error <= SCORE_TOLERANCE, (name, figures)
        assert figures.max_map_error <= MAP_TOLERANCE, (name, figures)
        assert figures.labels_identical, (name, figures)
        assert figures.labels_compared >= len(images) - 1, "more than one score sits on the threshold"
    # The scores are not degenerate: the generated defects (test/defect sorts first) outscore the normal parts.
    assert reference.pred_score[:3].mean() > reference.pred_score[3:].mean()


def test_batched_inference_matches_one_by_one(resnet18_checkpoint, resnet18_onnx, test_images):
    _, images = test_images
    reference, _, _ = anomalib_predictions(resnet18_checkpoint, images)
    for name, artifact in (("torch", resnet18_checkpoint), ("onnxruntime", resnet18_onnx), ("openvino", resnet18_onnx)):
        with open_backend(artifact, name) as backend:
            figures = compare(backend.predict(images), reference, threshold=backend.image_threshold)
        assert figures.within(PARITY_BAR), (name, figures)


def test_lightning_predict_path_differs_and_is_measured(resnet18_checkpoint, test_images):
    """anomalib's own two paths disagree when images are downscaled: antialiasing changes the input."""
    _, images = test_images
    forward, lightning, _ = anomalib_predictions(resnet18_checkpoint, images)
    assert np.abs(forward.anomaly_map - lightning.anomaly_map).max() > 1e-3


def test_map_at_input_size(resnet18_checkpoint, test_images):
    _, images = test_images
    with open_backend(resnet18_checkpoint, "torch", map_at_input_size=True) as backend:
        prediction = backend.predict(images[:2])
    assert prediction.anomaly_map.shape == (2, 1, *images.shape[-2:])
    assert prediction.pred_mask.shape == prediction.anomaly_map.shape


def test_bank_chunking_does_not_change_results(resnet18_checkpoint, test_images):
    from patchcore_trt.checkpoint import read_checkpoint
    from patchcore_trt.model import PatchCoreDeploy

    spec = read_checkpoint(resnet18_checkpoint)
    batch = torch.from_numpy(test_images[1][:2])
    with torch.inference_mode():
        whole = PatchCoreDeploy(spec, bank_chunk=spec.bank_size).eval()(batch)
        chunked = PatchCoreDeploy(spec, bank_chunk=97).eval()(batch)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_zero_range_normalisation_matches_anomalib():
    from anomalib.post_processing import PostProcessor

    from patchcore_trt.model import normalize

    values = torch.tensor([0.9, 1.0, 1.1])
    one = torch.tensor(1.0)
    expected = PostProcessor._normalize(values, one, one, one)
    torch.testing.assert_close(normalize(values, 1.0, 1.0, 1.0), expected)
    torch.testing.assert_close(expected, torch.tensor([0.0, 0.5, 1.0]))
