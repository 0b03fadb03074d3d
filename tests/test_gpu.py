"""The CUDA backend on a GPU against anomalib's own outputs: the exact mode (the default) meets the parity bar on
real checkpoints, on raw images of other sizes, one at a time and batched; the fast mode stays in its budget.

Skipped without a CUDA GPU; run on the GPU machine (benchmarks/run_gpu_matrix.sh, stage tests). The golden files
are checkpoints that anomalib itself trained and the outputs that anomalib itself computed on them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import unavailable

from patchcore_trt.compare import PARITY_BAR, Bar, compare
from patchcore_trt.images import load_image
from patchcore_trt.runtime import Prediction, open_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("PATCHCORE_TRT_FIXTURES", ROOT.parent / "shared" / "fixtures" / "anomalib-versions"))
FAST_BAR = Bar(score=1e-3, map=1e-2)


def golden(release: str) -> tuple[Path, list[np.ndarray], Prediction]:
    folder = FIXTURES / release
    if not (folder / "model.ckpt").is_file():
        unavailable(f"golden checkpoint {folder / 'model.ckpt'} is not here (set PATCHCORE_TRT_FIXTURES)")
    outputs = np.load(folder / "forward.npz")
    images = [load_image(FIXTURES / name) for name in outputs["files"]]
    reference = Prediction.from_outputs(
        [outputs[key] for key in ("pred_score", "pred_label", "anomaly_map")] + [outputs["anomaly_map"] > 0.5]
    )
    return folder / "model.ckpt", images, reference


@pytest.mark.parametrize("release", ["2.6.2-default", "1.2.0"])
def test_exact_mode_reproduces_anomalibs_own_outputs(release):
    checkpoint, images, reference = golden(release)
    with open_backend(checkpoint, "cuda") as backend:
        one_by_one = Prediction.concat([backend.predict(image[None]) for image in images])
        batched = backend.predict(np.stack(images))
    for prediction in (one_by_one, batched):
        figures = compare(prediction, reference, threshold=backend.image_threshold)
        assert figures.within(PARITY_BAR), figures


def test_exact_mode_matches_anomalib_forward_on_a_trained_wrn50(trained, exported, test_images):
    pytest.importorskip("anomalib")
    from patchcore_trt.verify import backend_parity

    _, images = test_images
    rows, _ = backend_parity(trained("wide_resnet50_2", 256), exported("wide_resnet50_2", 256), images, ["cuda"])
    (cuda,) = [row for row in rows if row.name == "cuda"]
    assert cuda.passed, cuda.figures


def test_exact_mode_batched_on_odd_sizes_and_uint8(resnet18_checkpoint):
    rng = np.random.default_rng(3)
    images = rng.random((3, 3, 333, 250), dtype=np.float32)
    with open_backend(resnet18_checkpoint, "torch") as reference_backend:
        reference = reference_backend.predict(images)
    with open_backend(resnet18_checkpoint, "cuda") as backend:
        floats = backend.predict(images)
        uint8 = np.round(images * 255).astype(np.uint8)
        from_uint8 = backend.predict(np.ascontiguousarray(uint8.transpose(0, 2, 3, 1)))
        with open_backend(resnet18_checkpoint, "torch") as again:
            reference_uint8 = again.predict(uint8.astype(np.float32) / 255)
    assert compare(floats, reference, threshold=backend.image_threshold).within(PARITY_BAR)
    assert compare(from_uint8, reference_uint8, threshold=backend.image_threshold).within(PARITY_BAR)


def test_fast_mode_stays_in_its_budget(resnet18_checkpoint, test_images):
    _, images = test_images
    with open_backend(resnet18_checkpoint, "torch") as reference_backend:
        reference = reference_backend.predict(images)
    with open_backend(resnet18_checkpoint, "cuda", mode="fast") as backend:
        figures = compare(backend.predict(images), reference, threshold=backend.image_threshold, bar=FAST_BAR)
    assert figures.within(FAST_BAR), figures


def test_graphs_are_keyed_by_batch_size_and_shared_across_threads(resnet18_checkpoint):
    """Two camera resolutions interleaved replay one graph per batch size (the resize runs before the graph), and
    threads sharing one executor get the answers they get alone."""
    from concurrent.futures import ThreadPoolExecutor

    from patchcore_trt.checkpoint import read_checkpoint
    from patchcore_trt.gpu.executor import CudaPatchCore

    executor = CudaPatchCore(read_checkpoint(resnet18_checkpoint), backbone_dtype="fp32")
    rng = np.random.default_rng(5)
    small, large = (rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8) for h, w in ((240, 320), (480, 640)))
    alone = [executor.run_host(images) for images in (small, large, small, large)]
    assert executor.captures == 1
    for again, first in zip(alone[2:], alone[:2], strict=True):
        np.testing.assert_array_equal(again.pred_score, first.pred_score)
        np.testing.assert_array_equal(again.anomaly_map, first.anomaly_map)
    executor.run_host(small[:1])
    assert executor.captures == 2
    with ThreadPoolExecutor(4) as pool:
        shared = list(pool.map(executor.run_host, [small, large] * 8))
    for index, output in enumerate(shared):
        np.testing.assert_array_equal(output.pred_score, alone[index % 2].pred_score)
        np.testing.assert_array_equal(output.anomaly_map, alone[index % 2].anomaly_map)
    assert executor.captures == 2
