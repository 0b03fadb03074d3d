"""Parity of every CPU backend against anomalib's own forward on the same checkpoint and images.

The bar: identical labels against anomalib's FP32 forward (ties at the threshold excluded), and either both
errors from that forward within PARITY_BAR, or both errors from an FP64 evaluation of anomalib's own module within
NOISE_MULTIPLE x anomalib's own FP32 error from it (never tighter than PARITY_BAR). The second arm keeps FP32
rounding, which anomalib's forward has as much as any backend, from failing a correct backend on a large bank.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from patchcore_trt.artifact import read_onnx_metadata
from patchcore_trt.compare import NOISE_MULTIPLE, PARITY_BAR, Bar, Parity, compare, noise_bar
from patchcore_trt.runtime import backend_info, open_backend
from patchcore_trt.runtime.base import Backend, Prediction

if TYPE_CHECKING:
    from patchcore_trt.reference import AnomalibReference

REFERENCE_ROW = "anomalib forward"
EXACT = "FP64"
LIGHTNING_ROW = "anomalib predict*"
CPU_BACKENDS = ("torch", "onnxruntime", "openvino")


@dataclass(frozen=True)
class BackendParity:
    """One row of the parity table; ``checked`` rows must meet the bar, anomalib's own rows are context.

    figures: against anomalib's FP32 forward. exact: against the FP64 evaluation of anomalib's module, judged by
    ``bar`` (for anomalib's own forward row: its own FP32 error, the noise the bar is made of).
    """

    name: str
    figures: Parity
    ms_per_image: float | None = None
    checked: bool = True
    exact: Parity | None = None
    bar: Bar = PARITY_BAR

    @property
    def passed(self) -> bool:
        if not self.figures.labels_identical:
            return False
        if self.figures.errors_within(PARITY_BAR):
            return True
        return self.exact is not None and self.exact.errors_within(self.bar)


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


def exact_predictions(reference: AnomalibReference, images: Sequence[np.ndarray]) -> Prediction:
    """anomalib's own module, formula for formula, evaluated in FP64 (on a copy: the reference stays FP32).

    The results are rounded to float32 as a Prediction holds them: 6e-8 at most on scores and maps in [0, 1], far
    below any bar."""
    exact = copy.copy(reference)
    exact.module = copy.deepcopy(reference.module).double()
    return Prediction.concat(
        [Prediction.from_outputs(exact.forward(torch.from_numpy(image[None]).double())) for image in images]
    )


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

    The first rows are anomalib itself: its forward (the reference, timed like the backends, with its own error from
    the FP64 evaluation: the noise the bar scales with) and its Lightning predict path (antialiased resize) measured
    against it, which shows how far anomalib's own paths are apart.
    ``reference``: the anomalib module to compare against (default: ``release_reference`` of the checkpoint).
    """
    anomalib = reference or release_reference(
        checkpoint, trust_pickled_code=trust_pickled_code, anomalib_version=anomalib_version
    )
    reference, lightning, reference_ms = anomalib_predictions(checkpoint, images, reference=anomalib)
    threshold = read_onnx_metadata(onnx_path).image_threshold
    exact = exact_predictions(anomalib, images)
    noise = compare(reference, exact, threshold=threshold)
    bar = noise_bar(noise)
    rows = [
        BackendParity(
            REFERENCE_ROW,
            compare(reference, reference, threshold=threshold),
            reference_ms,
            checked=False,
            exact=noise,
            bar=bar,
        ),
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
        # Labels off a tie band as wide as the bar: a drift the bar accepts may flip a label that close.
        figures = compare(prediction, reference, threshold=threshold, bar=bar)
        rows.append(BackendParity(name, figures, ms, exact=compare(prediction, exact, threshold=threshold), bar=bar))
    return rows, reference


def worst_images(figures: Parity, names: Sequence[str]) -> dict[str, object]:
    """The images to look at in ``figures``, by name: the largest score error, the largest map error, and those
    whose labels differ."""

    def name(index: int | None) -> str | None:
        return None if index is None else names[index]

    return {
        "score": name(figures.worst_score_image),
        "map": name(figures.worst_map_image),
        "labels_differ": [names[index] for index in figures.labels_differ],
    }


def _worst_cell(figures: Parity, names: Sequence[str]) -> str:
    worst = worst_images(figures, names)
    score, where = worst["score"], worst["map"]
    shown = f"{score}" if score == where else f"score {score or '-'}, map {where or '-'}"
    return "-" if score is None and where is None else shown


def table_rows(rows: Sequence[BackendParity], names: Sequence[str] | None = None) -> list[dict[str, object]]:
    """Rows for the parity-and-speed table that ``demo`` and ``verify`` print: the figures against anomalib's FP32
    forward, then against its FP64 evaluation; with ``names`` (the images' names), the image each largest error
    against the FP32 forward is on."""
    shown = []
    for row in rows:
        line = row.figures.row(row.name)
        exact = row.exact
        line[f"{EXACT} |d score|"] = f"{exact.max_score_error:.1e}" if exact is not None else "-"
        line[f"{EXACT} |d map|"] = f"{exact.max_map_error:.1e}" if exact is not None else "-"
        line["CPU ms/img"] = f"{row.ms_per_image:.0f}" if row.ms_per_image is not None else "-"
        if names is not None:
            line["worst image"] = _worst_cell(row.figures, names)
        line["bar"] = ("PASS" if row.passed else "FAIL") if row.checked else "-"
        shown.append(line)
    return shown


def json_rows(rows: Sequence[BackendParity], names: Sequence[str]) -> list[dict[str, object]]:
    """The rows as ``verify --json`` writes them: every field, and the worst images by name beside the indices."""
    documents = []
    for row in rows:
        document: dict[str, object] = {**asdict(row), "worst_images": worst_images(row.figures, names)}
        if row.exact is not None:
            document["worst_images_fp64"] = worst_images(row.exact, names)
        documents.append(document)
    return documents


FOOTNOTE = (
    f"bar: identical labels (ties at the threshold excluded), and against anomalib's FP32 forward |d score| <= "
    f"{PARITY_BAR.score:g} and |d map| <= {PARITY_BAR.map:g}, or against an FP64 evaluation of anomalib's own module "
    f"at most {NOISE_MULTIPLE:g}x anomalib's own FP32 error from it (its row), never less than those. * anomalib's "
    "Lightning predict path, which resizes with antialiasing; its forward and export do not."
)
