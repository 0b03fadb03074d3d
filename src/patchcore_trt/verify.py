"""Parity of every CPU backend against anomalib's own forward on the same checkpoint and images."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from patchcore_trt.artifact import read_onnx_metadata
from patchcore_trt.compare import PARITY_BAR, Parity, compare
from patchcore_trt.runtime import backend_info, open_backend
from patchcore_trt.runtime.base import Backend, Prediction

if TYPE_CHECKING:
    from patchcore_trt.reference import AnomalibReference

REFERENCE_ROW = "anomalib forward"
LIGHTNING_ROW = "anomalib predict*"
CPU_BACKENDS = ("torch", "onnxruntime", "openvino")


@dataclass(frozen=True)
class BackendParity:
    """One row of the parity table; ``checked`` rows must meet the bar, anomalib's own rows are context."""

    name: str
    figures: Parity
    ms_per_image: float | None = None
    checked: bool = True

    @property
    def passed(self) -> bool:
        return self.figures.within(PARITY_BAR)


def release_reference(
    checkpoint: Path, *, trust_pickled_code: bool = False, anomalib_version: str | None = None
) -> AnomalibReference:
    """anomalib's module reproducing the release that wrote ``checkpoint`` (see AnomalibReference.for_checkpoint)."""
    from patchcore_trt.checkpoint import read_checkpoint
    from patchcore_trt.reference import AnomalibReference

    spec = read_checkpoint(checkpoint, trust_pickled_code=trust_pickled_code, anomalib_version=anomalib_version)
    return AnomalibReference.for_checkpoint(checkpoint, spec, trust_pickled_code=trust_pickled_code)


def anomalib_predictions(
    checkpoint: Path,
    images: Sequence[np.ndarray],
    *,
    trust_pickled_code: bool = False,
    anomalib_version: str | None = None,
    reference: AnomalibReference | None = None,
) -> tuple[Prediction, Prediction, float]:
    """anomalib's forward (the parity reference), its Lightning predict path, and forward's median ms per image."""
    if reference is None:
        reference = release_reference(
            checkpoint, trust_pickled_code=trust_pickled_code, anomalib_version=anomalib_version
        )
    reference.forward(torch.from_numpy(images[0][None]))  # warm-up, as for every backend
    forward, lightning, times = [], [], []
    for image in images:
        batch = torch.from_numpy(image[None])
        start = time.perf_counter()
        forward.append(Prediction.from_outputs(reference.forward(batch)))
        times.append(1000 * (time.perf_counter() - start))
        lightning.append(Prediction.from_outputs(reference.lightning_predict(batch)))
    return Prediction.concat(forward), Prediction.concat(lightning), statistics.median(times)


def run_each(backend: Backend, images: Sequence[np.ndarray]) -> tuple[Prediction, float]:
    """Predict image by image (raw images may differ in size); return results and median ms per image."""
    parts, times = [], []
    for image in images:
        start = time.perf_counter()
        parts.append(backend.predict(image[None]))
        times.append(1000 * (time.perf_counter() - start))
    return Prediction.concat(parts), statistics.median(times)


def backend_parity(
    checkpoint: Path,
    onnx_path: Path,
    images: np.ndarray,
    backends: Sequence[str] = CPU_BACKENDS,
    *,
    trust_pickled_code: bool = False,
    anomalib_version: str | None = None,
    reference: AnomalibReference | None = None,
) -> tuple[list[BackendParity], Prediction]:
    """Run ``backends`` on ``images`` and compare each with anomalib's forward.

    The first rows are anomalib itself: its forward (the reference, timed like the backends) and its Lightning
    predict path (antialiased resize) measured against it, which shows how far anomalib's own paths are apart.
    ``reference``: the anomalib module to compare against (default: ``release_reference`` of the checkpoint).
    """
    reference, lightning, reference_ms = anomalib_predictions(
        checkpoint,
        images,
        trust_pickled_code=trust_pickled_code,
        anomalib_version=anomalib_version,
        reference=reference,
    )
    threshold = read_onnx_metadata(onnx_path).image_threshold
    rows = [
        BackendParity(REFERENCE_ROW, compare(reference, reference, threshold=threshold), reference_ms, checked=False),
        BackendParity(LIGHTNING_ROW, compare(lightning, reference, threshold=threshold), checked=False),
    ]
    for name in backends:
        reads_checkpoint = backend_info(name).suffixes == (".ckpt",)
        options: dict[str, object] = {}
        if reads_checkpoint and trust_pickled_code:
            options["trust_pickled_code"] = True
        if reads_checkpoint and anomalib_version is not None:
            options["anomalib_version"] = anomalib_version
        with open_backend(checkpoint if reads_checkpoint else onnx_path, name, **options) as backend:
            backend.predict(images[0][None])  # warm-up: first-call allocation and kernel selection
            prediction, ms = run_each(backend, images)
        rows.append(BackendParity(name, compare(prediction, reference, threshold=threshold), ms))
    return rows, reference


def table_rows(rows: Sequence[BackendParity]) -> list[dict[str, object]]:
    """Rows for the parity-and-speed table that ``demo`` and ``verify`` print."""
    shown = []
    for row in rows:
        line = row.figures.row(row.name)
        line["CPU ms/img"] = f"{row.ms_per_image:.0f}" if row.ms_per_image is not None else "-"
        line["bar"] = ("PASS" if row.passed else "FAIL") if row.checked else "-"
        shown.append(line)
    return shown


FOOTNOTE = (
    f"bar: {PARITY_BAR.describe()} (ties at the threshold excluded). * anomalib's Lightning predict path, which "
    "resizes with antialiasing; its forward and export do not."
)
