"""The CUDA backend on a GPU against anomalib's own outputs: the exact mode (the default) meets the parity bar on
real checkpoints, on raw images of other sizes, one at a time and batched; the fast mode stays in its budget.

Skipped without a CUDA GPU; run on the GPU machine (benchmarks/run_gpu_matrix.sh, stage tests). The golden files
are checkpoints that anomalib itself trained and the outputs that anomalib itself computed on them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import unavailable

from patchcore_trt.compare import PARITY_BAR, Bar, compare
from patchcore_trt.gpu.executor import chunks
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
    threads sharing one executor get the answers they get alone (the lock covers only the enqueueing)."""
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


@pytest.fixture(scope="module")
def small_executor(resnet18_checkpoint):
    from patchcore_trt.checkpoint import read_checkpoint
    from patchcore_trt.gpu.executor import CudaPatchCore

    executor = CudaPatchCore(read_checkpoint(resnet18_checkpoint), backbone_dtype="fp32", max_batch=4)
    yield executor
    executor.close()


def assert_same(got: Prediction, want: Prediction) -> None:
    for field in Prediction.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)


def test_every_batch_size_has_its_graph_and_larger_batches_run_in_chunks(small_executor):
    """max_batch 4: batches of 1..4 are one graph each, captured ahead; 6 and 9 replay those graphs in chunks
    (4 + 2, 4 + 4 + 1), with the results of those chunks run alone, from host arrays or GPU tensors."""
    images = np.random.default_rng(11).integers(0, 256, (9, 200, 240, 3), dtype=np.uint8)
    small_executor.capture(range(1, 5))
    assert small_executor.captures == 4
    for count in (6, 9):
        runs = [small_executor.run_host(images[start:stop]) for start, stop in chunks(count, 4)]
        assert_same(small_executor.run_host(images[:count]), Prediction.concat(runs))
        on_device = torch.from_numpy(images[:count]).cuda()
        assert_same(Prediction.from_outputs(small_executor.run(on_device)), Prediction.concat(runs))
    assert small_executor.captures == 4


def test_the_host_path_returns_the_gpu_labels_by_the_postprocess_rule_and_owns_them(small_executor):
    """Labels and masks come down from the graph: they are Postprocess's rule on the scores and maps returned;
    a Prediction held while later batches run (through the same slots and graphs) does not change."""
    post = small_executor.model.post
    rng = np.random.default_rng(12)
    batches = [rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8) for n in (3, 3, 1, 4, 2, 3)]
    first = small_executor.run_host(batches[0])
    kept = Prediction.concat([first])  # a copy, to compare the held views with later
    pending = [small_executor.submit(batch) for batch in batches[1:]]
    results = [item.result() for item in pending]
    assert_same(first, kept)
    for batch, result in zip(batches[1:], results, strict=True):
        np.testing.assert_array_equal(result.pred_label, post.label(result.pred_score))
        np.testing.assert_array_equal(result.pred_mask, post.mask(result.anomaly_map))
        assert_same(result, small_executor.run_host(batch))


def test_a_lent_slot_and_threads_give_the_answers_of_one_call_at_a_time(resnet18_checkpoint):
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(13)
    batches = [rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8) for _ in range(4)]
    with open_backend(resnet18_checkpoint, "cuda") as backend:
        alone = [backend.predict(batch) for batch in batches]
        slot = backend.slot(2, 256, 256)
        slot[...] = batches[1]
        assert_same(backend.predict(slot), alone[1])
        device = backend.predict(torch.from_numpy(batches[2]).cuda())
        assert_same(device, alone[2])
        with ThreadPoolExecutor(4) as pool:
            shared = list(pool.map(backend.predict, batches * 6))
    for index, prediction in enumerate(shared):
        assert_same(prediction, alone[index % 4])


def test_predict_stacks_its_batches_into_the_backends_pinned_slots(resnet18_checkpoint, test_images, tmp_path):
    """predict's decoded 8-bit batches go into the cuda backend's slots (no copy on the way up): the results are
    those of the same batches predicted from plain arrays, and every slot lent came back to the ring."""
    from PIL import Image

    from patchcore_trt.gpu.staging import RING_SLOTS
    from patchcore_trt.predict import header, run_predict
    from patchcore_trt.report import JsonResults

    paths, _ = test_images
    decoded = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])
    with open_backend(resnet18_checkpoint, "cuda") as backend:
        expected = Prediction.concat([backend.predict(decoded[i : i + 4]) for i in range(0, len(decoded), 4)])
        json_path = tmp_path / "r.json"
        summary = run_predict(backend, paths, sinks=[JsonResults(json_path, header(backend))], batch_size=4)
        assert len(backend.executor.ring) == RING_SLOTS
    assert summary.scored == len(paths)
    rows = json.loads(json_path.read_text())["results"]
    assert [row["score"] for row in rows] == [float(score) for score in expected.pred_score]


def test_outputs_downloaded_from_a_device_copy_are_the_direct_downloads(small_executor, monkeypatch):
    """Large outputs are copied on the device and downloaded off the compute stream (executor.STAGED_DOWNLOAD);
    forced on for every size and off for every size, the results are the same bits."""
    from patchcore_trt.gpu import executor as module

    images = np.random.default_rng(14).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    monkeypatch.setattr(module, "STAGED_DOWNLOAD", 1 << 62)
    direct = [small_executor.run_host(images[:count]) for count in (1, 3)]
    monkeypatch.setattr(module, "STAGED_DOWNLOAD", 0)
    staged = [small_executor.submit(images[:count]) for count in (1, 3)]
    for want, got in zip(direct, staged, strict=True):
        assert_same(got.result(), want)
