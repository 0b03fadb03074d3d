"""The benchmark matrix: backend x precision x search x input size x batch x copies, timed the same way for all.

Each row: build the system under test, warm it up, then time ``iters`` batches (rotating over distinct
input batches), synchronising the GPU after each, so one batch's latency is what a caller waits for.
Median, p90 and p99 latency, throughput (batch / median), peak GPU memory while timing
(``torch.cuda.max_memory_allocated``: weights, bank, graphs and activations; one-off cuDNN autotuning
workspaces of the warm-up are not counted) and the process's host RSS. "host" rows take uint8 images from host
memory and return the map to host memory; "device" rows start and end on the GPU.

Every row is also checked against the FP32 deploy model (model.PatchCoreDeploy, TF32 off) on the same
images: max |delta score|, max |delta map| (normalised), label and mask agreement (compare.py).
"""

from __future__ import annotations

import functools
import gc
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchcore_trt.bench.settings import DEFAULT_PRECISION, PEERS, BenchSettings
from patchcore_trt.bench.subjects import (
    Case,
    Subject,
    artifact_maker,
    as_float_nchw,
    make_subject,
    peer_unavailable,
)
from patchcore_trt.compare import compare
from patchcore_trt.demo.synthetic_model import texture_images
from patchcore_trt.errors import UserError
from patchcore_trt.gpu.knn import float32_matmul
from patchcore_trt.model import PatchCoreDeploy
from patchcore_trt.runtime.base import Prediction
from patchcore_trt.spec import PatchCoreSpec
from patchcore_trt.steps import Step, quiet

MIB = 1 << 20
INPUT_SEED = 4242  # distinct from every seed synthetic_spec uses: the inputs are fresh


def input_pool(size: tuple[int, int], count: int) -> np.ndarray:
    """uint8 [count, H, W, 3] fresh inputs: half defect-free textures, half with a defect."""
    normal = texture_images(count - count // 2, size, seed=INPUT_SEED)
    defect = texture_images(count // 2, size, seed=INPUT_SEED + 1, defects=True)
    return torch.cat([normal, defect]).numpy()


@torch.no_grad()
def reference_predictions(spec: PatchCoreSpec, images: np.ndarray, chunk: int = 8) -> Prediction:
    """The FP32 deploy model's outputs (GPU when there is one, TF32 off), the yardstick of every row."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PatchCoreDeploy(spec).eval().to(device)
    floats = as_float_nchw(images)
    with float32_matmul():
        parts = [
            Prediction.from_outputs(model(torch.from_numpy(floats[i : i + chunk]).to(device)))
            for i in range(0, len(floats), chunk)
        ]
    del model
    return Prediction.concat(parts)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def host_rss_mib() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError, IndexError):  # not Linux: the peak is the best we have
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_subject(subject: Subject, rotation: int, settings: BenchSettings) -> list[float]:
    """Per-batch latencies in ms: warm-up, then up to ``iters`` timed batches within ``max_seconds``."""
    sync = torch.cuda.synchronize if subject.uses_cuda else (lambda: None)
    deadline = time.perf_counter() + settings.max_seconds
    for i in range(settings.warmup):
        subject.run(i % rotation)
        if time.perf_counter() > deadline:
            break
    sync()
    times: list[float] = []
    deadline = time.perf_counter() + settings.max_seconds
    for i in range(settings.iters):
        start = time.perf_counter()
        subject.run(i % rotation)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
        if time.perf_counter() > deadline and len(times) >= 10:
            break
    return times


def measure(
    make_subject: Callable[[], Subject],
    images: np.ndarray,
    batch: int,
    reference: Prediction,
    threshold: float,
    settings: BenchSettings,
) -> dict[str, Any]:
    """Build, check against ``reference`` and time one row; returns the row's figures."""
    cuda = torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    subject = make_subject()
    try:
        rotation = len(images) // batch
        outputs = Prediction.concat([subject.outputs(i) for i in range(rotation)])
        figures = compare(outputs, reference, threshold=threshold)
        if cuda:  # steady state: weights, bank, graphs and activations, not one-off cuDNN autotuning workspaces
            torch.cuda.reset_peak_memory_stats()
        times = time_subject(subject, rotation, settings)
        peak = torch.cuda.max_memory_allocated() / MIB if cuda else float("nan")
        extra = dict(subject.extra)
    finally:
        subject.close()
    median = percentile(times, 50)
    return {
        "median_ms": median,
        "p90_ms": percentile(times, 90),
        "p99_ms": percentile(times, 99),
        "img_per_s": batch * 1e3 / median,
        "peak_gpu_mib": peak,
        "host_rss_mib": host_rss_mib(),
        "iters": len(times),
        "max_score_error": figures.max_score_error,
        "max_map_error": figures.max_map_error,
        "labels_equal": figures.labels_equal,
        "labels_compared": figures.labels_compared,
        "mask_agreement": figures.mask_agreement,
        **extra,
    }


def batches_of(images: np.ndarray, batch: int) -> list[np.ndarray]:
    if len(images) < batch:
        raise UserError(f"bench: {len(images)} images cannot fill a batch of {batch}")
    return [np.ascontiguousarray(images[i : i + batch]) for i in range(0, len(images) - batch + 1, batch)]


def matrix_cases(settings: BenchSettings, batch: int) -> tuple[list[Case], list[str]]:
    """The rows for one batch size, and a notice for each combination a backend cannot run."""
    from patchcore_trt.gpu.fast_model import BACKBONE_DTYPES
    from patchcore_trt.reference import anomalib_available
    from patchcore_trt.runtime import backend_names

    backends = list(settings.backends)
    known = [*backend_names(), *PEERS]
    unknown = [name for name in backends if name not in known]
    if unknown:
        raise UserError(f"bench: unknown backend(s) {unknown}; choose from: {', '.join(known)}")
    notices: list[str] = []
    if settings.baseline and "anomalib" not in backends:
        if anomalib_available():
            backends.insert(0, "anomalib")
        else:
            notices.append("anomalib is not installed: no baseline row (pip install 'patchcore-trt[anomalib]')")
    gpu = torch.cuda.is_available()
    if "cuda" in backends and not gpu:
        backends.remove("cuda")
        notices.append("cuda: not benchmarked (torch sees no CUDA GPU here)")
    for peer in PEERS:
        reason = peer_unavailable(peer) if peer in backends else None
        if reason is not None:
            backends.remove(peer)
            notices.append(f"{peer}: not benchmarked ({reason})")
    runs_precision = {
        "cuda": tuple(BACKBONE_DTYPES),
        "anomalib": ("fp32", "tf32", "fp16"),
        "anomalib-compile": ("fp32", "tf32"),
        "onnxruntime-cuda": ("fp32", "tf32"),
    }
    device_rows = ("cuda", "anomalib", "anomalib-compile")  # the others take host arrays only
    cases = []
    for backend in backends:
        for precision in settings.precisions or (DEFAULT_PRECISION.get(backend, "fp32"),):
            # Registry backends run the fp32 artifact; converted artifacts are benchmarked by path.
            if precision not in runs_precision.get(backend, ("fp32",)):
                notices.append(
                    f"{backend} {precision}: not benchmarked (this bench runs {backend} in "
                    f"{', '.join(runs_precision.get(backend, ('fp32',)))})"
                )
                continue
            searches = settings.searches if backend == "cuda" else ("-",)
            # Host and device rows differ only where a GPU holds the inputs.
            copies = settings.copies if backend in device_rows and gpu else ("host",)
            cases += [Case(backend, precision, s, c, batch) for s in searches for c in copies]
    return cases, notices


def workloads(settings: BenchSettings) -> list[tuple[tuple[int, int], int]]:
    """(input size, bank rows) pairs: ``banks`` pairs with ``sizes`` or applies to all."""
    if len(settings.banks) not in (1, len(settings.sizes)):
        raise UserError(
            f"bench: give one bank size or one per input size ({len(settings.sizes)}), got {len(settings.banks)}"
        )
    banks = settings.banks * len(settings.sizes) if len(settings.banks) == 1 else settings.banks
    return list(zip(settings.sizes, banks, strict=True))


def run_matrix(
    settings: BenchSettings,
    *,
    checkpoint: Path | None = None,
    trust_pickled_code: bool = False,
    on_row: Callable[[dict[str, Any]], None] = lambda row: None,
    on_notice: Callable[[str], None] = lambda text: None,
    step: Step = quiet,
) -> list[dict[str, Any]]:
    """Run every row of the matrix; ``on_row`` sees each finished row (to write results as they come).

    What the backends run (a checkpoint of a synthetic model, ONNX exports, engines) is made in a temporary
    folder and removed at the end: the results are the only files a benchmark leaves.
    """
    with tempfile.TemporaryDirectory(prefix="patchcore-trt-bench-") as work_dir:
        return _run_matrix(settings, Path(work_dir), checkpoint, trust_pickled_code, on_row, on_notice, step)


def _run_matrix(
    settings: BenchSettings,
    work_dir: Path,
    checkpoint: Path | None,
    trust_pickled_code: bool,
    on_row: Callable[[dict[str, Any]], None],
    on_notice: Callable[[str], None],
    step: Step,
) -> list[dict[str, Any]]:
    from patchcore_trt.checkpoint import read_checkpoint
    from patchcore_trt.demo.synthetic_model import synthetic_spec

    rows: list[dict[str, Any]] = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seen: set[str] = set()

    def notice(text: str) -> None:
        if text not in seen:
            seen.add(text)
            on_notice(text)

    fitted = read_checkpoint(checkpoint, trust_pickled_code=trust_pickled_code) if checkpoint is not None else None
    for size, bank in workloads(settings):
        if fitted is None:
            with step(f"making a synthetic {settings.backbone} model, bank {bank:,} rows, {size[0]}x{size[1]}"):
                spec = synthetic_spec(bank, size, backbone=settings.backbone, device=device)
        else:
            spec = fitted
        images = input_pool(size, max(settings.images, 2 * max(settings.batches)))
        with step(f"FP32 reference outputs on {len(images)} images of {size[0]}x{size[1]}"):
            reference = reference_predictions(spec, images)
        artifact = artifact_maker(spec, checkpoint, work_dir)
        for batch in settings.batches:
            cases, notices = matrix_cases(settings, batch)
            for text in notices:
                notice(text)
            chunks = batches_of(images, batch)
            used = len(chunks) * batch
            expected = reference[:used]
            for case in cases:
                try:
                    figures = measure(
                        functools.partial(make_subject, case, spec, chunks, settings.graphs, artifact),
                        images[:used],
                        batch,
                        expected,
                        spec.postprocess.normalized_image_threshold,
                        settings,
                    )
                except UserError as exc:
                    notice(f"{case.backend} {case.precision}: skipped ({exc})")
                    continue
                row = {
                    **case.__dict__,
                    "height": size[0],
                    "width": size[1],
                    "backbone": spec.backbone,
                    "bank": spec.bank_size,
                    **figures,
                }
                rows.append(row)
                on_row(row)
    return rows
