"""Parity of every CPU backend against anomalib's own forward on the same checkpoint and images."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from patchcore_trt.report import Parity, parity, parity_row
from patchcore_trt.runtime import open_backend
from patchcore_trt.runtime.base import Backend, Prediction

# The parity bar against anomalib's AnomalibModule.forward.
SCORE_TOLERANCE = 1e-5
MAP_TOLERANCE = 1e-4
LIGHTNING_ROW = "anomalib predict*"


@dataclass(frozen=True)
class BackendParity:
    name: str
    figures: Parity
    ms_per_image: float | None = None

    @property
    def passed(self) -> bool:
        return self.figures.within(SCORE_TOLERANCE, MAP_TOLERANCE)


def anomalib_predictions(checkpoint: Path, images: Sequence[np.ndarray]) -> tuple[Prediction, Prediction]:
    """anomalib's forward (the parity reference) and its Lightning predict path, one image at a time."""
    from patchcore_trt.reference import AnomalibReference

    reference = AnomalibReference(checkpoint)
    forward, lightning = [], []
    for image in images:
        batch = torch.from_numpy(image[None])
        forward.append(_to_prediction(reference.forward(batch)))
        lightning.append(_to_prediction(reference.lightning_predict(batch)))
    return Prediction.concat(forward), Prediction.concat(lightning)


def _to_prediction(outputs: tuple[torch.Tensor, ...]) -> Prediction:
    score, label, anomaly_map, mask = (tensor.detach().numpy() for tensor in outputs)
    return Prediction(score.reshape(-1), label.reshape(-1), anomaly_map, mask)


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
    backends: tuple[str, ...] = ("torch", "onnxruntime", "openvino"),
) -> tuple[list[BackendParity], Prediction]:
    """Run ``backends`` on ``images`` and compare each with anomalib's forward.

    The first row is anomalib's Lightning predict path (antialiased resize), measured against the same
    reference: it shows how far anomalib's two own paths are apart.
    """
    reference, lightning = anomalib_predictions(checkpoint, images)
    rows = [BackendParity(LIGHTNING_ROW, parity(lightning, reference))]
    for name in backends:
        artifact = checkpoint if name == "torch" else onnx_path
        with open_backend(artifact, name) as backend:
            backend.predict(images[0][None])  # warm-up: first-call allocation and kernel selection
            prediction, ms = run_each(backend, images)
        rows.append(BackendParity(name, parity(prediction, reference), ms))
    return rows, reference


def table_rows(rows: Sequence[BackendParity]) -> list[dict[str, object]]:
    """Rows for the parity-and-speed table that ``demo`` and ``verify`` print."""
    shown = []
    for row in rows:
        line = parity_row(row.name, row.figures)
        line["CPU ms/img"] = f"{row.ms_per_image:.0f}" if row.ms_per_image is not None else "-"
        line["bar"] = "-" if row.ms_per_image is None else ("PASS" if row.passed else "FAIL")
        shown.append(line)
    return shown


FOOTNOTE = (
    f"bar: |d score| <= {SCORE_TOLERANCE:g}, |d map| <= {MAP_TOLERANCE:g}, identical labels (ties at the threshold "
    "excluded). * anomalib's Lightning predict path, which resizes with antialiasing; its forward and export do not."
)
