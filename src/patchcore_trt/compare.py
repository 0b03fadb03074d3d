"""One comparator: how far a candidate's outputs are from a reference's, and the bars they are held to.

Every comparison in patchcore-trt goes through ``compare``: the export's self-check, ``verify`` against anomalib,
the accuracy gate of reduced-precision graphs, and every benchmark row.

The tie rule: a label is only compared where the reference score is farther from the model's own threshold
than the score drift the bar allows. Within that band a drift the bar accepts can flip the label, and the two
requirements would contradict each other. anomalib's adaptive threshold is one validation image's own score, so
one image usually sits exactly on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patchcore_trt.runtime.base import Prediction


@dataclass(frozen=True)
class Bar:
    """Largest allowed max |d score| and max |d map| (normalised outputs), with identical labels off the tie band."""

    score: float
    map: float

    def describe(self) -> str:
        return f"|d score| <= {self.score:g}, |d map| <= {self.map:g}, identical labels"


# anomalib's FP32 forward against any faithful FP32 implementation of it: the floor of the parity bar.
PARITY_BAR = Bar(score=1e-5, map=1e-4)

# A faithful FP32 backend sums in another order than anomalib (other convolution algorithms, the bank searched in
# chunks), so its rounding error is of the size of anomalib's own and not below it: on a large bank anomalib's FP32
# forward is itself 8e-6 (M=16k) to 2.2e-5 (M=1M) from an FP64 evaluation of its formula, at or past the floor.
# Judged against the FP64 evaluation, a backend may be this many times anomalib's own FP32 error from it
# (measured on CPU: ONNX Runtime and OpenVINO 2.3x to 3.4x anomalib's error, on WRN50 with banks of 3,072 rows).
NOISE_MULTIPLE = 5.0


def noise_bar(noise: Parity, floor: Bar = PARITY_BAR, multiple: float = NOISE_MULTIPLE) -> Bar:
    """The bar against an FP64 evaluation: ``multiple`` x anomalib's own FP32 error from it (``noise``), never
    tighter than ``floor``."""
    return Bar(
        score=max(floor.score, multiple * noise.max_score_error), map=max(floor.map, multiple * noise.max_map_error)
    )


@dataclass(frozen=True)
class Parity:
    """How far one set of outputs is from a reference's, on the same images."""

    images: int
    max_score_error: float
    max_map_error: float
    labels_equal: int
    labels_compared: int
    mask_agreement: float
    # Which image (its index in the set) has the largest score and map error, and where labels differ: the maxima
    # alone cannot say which image to look at when a bar is missed. None where nothing differs.
    worst_score_image: int | None = None
    worst_map_image: int | None = None
    labels_differ: tuple[int, ...] = ()

    @property
    def labels_identical(self) -> bool:
        return self.labels_equal == self.labels_compared

    def within(self, bar: Bar) -> bool:
        return self.errors_within(bar) and self.labels_identical

    def errors_within(self, bar: Bar) -> bool:
        """Score and map errors inside ``bar`` (a NaN error never is)."""
        return self.max_score_error <= bar.score and self.max_map_error <= bar.map

    def row(self, name: str) -> dict[str, object]:
        """A table row: the figures as short strings."""
        return {
            "backend": name,
            "images": self.images,
            "max|d score|": f"{self.max_score_error:.1e}",
            "max|d map|": f"{self.max_map_error:.1e}",
            "labels": f"{self.labels_equal}/{self.labels_compared}",
            "mask px": f"{100 * self.mask_agreement:.2f}%",
        }


def off_threshold(scores: np.ndarray, threshold: float, band: float) -> np.ndarray:
    """Which reference scores are far enough from ``threshold`` for their label to be compared."""
    return np.abs(np.asarray(scores, dtype=np.float64) - threshold) > band


def compare(candidate: Prediction, reference: Prediction, *, threshold: float, bar: Bar = PARITY_BAR) -> Parity:
    """Compare ``candidate`` with ``reference`` (maps of the same shape); ``threshold`` is the model's own
    normalised image threshold, and labels are compared off the tie band ``bar.score`` around it."""
    if candidate.anomaly_map.shape != reference.anomaly_map.shape:
        raise ValueError(f"map shapes differ: {candidate.anomaly_map.shape} vs {reference.anomaly_map.shape}")
    decided = off_threshold(reference.pred_score, threshold, bar.score)
    differ = (candidate.pred_label != reference.pred_label) & decided
    score_error, worst_score = _max_abs(candidate.pred_score, reference.pred_score)
    map_error, worst_map = _max_abs(candidate.anomaly_map, reference.anomaly_map)
    return Parity(
        images=len(reference),
        max_score_error=score_error,
        max_map_error=map_error,
        labels_equal=int((candidate.pred_label == reference.pred_label)[decided].sum()),
        labels_compared=int(decided.sum()),
        mask_agreement=float((candidate.pred_mask == reference.pred_mask).mean()),
        worst_score_image=worst_score,
        worst_map_image=worst_map,
        labels_differ=tuple(int(index) for index in np.flatnonzero(differ)),
    )


def _max_abs(a: np.ndarray, b: np.ndarray) -> tuple[float, int | None]:
    """max |a - b| over images (the first axis) and the image it is on (None when every difference is 0). NaN, on
    the first image holding one, when either side holds a NaN: numpy's max would hide it behind a larger finite
    value."""
    difference = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    if difference.size == 0:
        return 0.0, None
    per_image = difference.reshape(len(difference), -1)
    nan = np.isnan(per_image).any(axis=1)
    if nan.any():
        return float("nan"), int(np.argmax(nan))
    largest = per_image.max(axis=1)
    worst = int(np.argmax(largest))
    return float(largest[worst]), worst if largest[worst] > 0 else None
