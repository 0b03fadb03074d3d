"""Run a backend over image files: decode, batch images of equal size, infer, hand each result on as it is done.

A file that fails to decode, or scores NaN, is a result with its reason and the run goes on; results come out
in input order one by one, so callers write them as they come and memory does not grow with the number of
images.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchcore_trt.files import display_name
from patchcore_trt.images import ImageError, load_image
from patchcore_trt.runtime.base import Backend, NonFiniteOutputError, Prediction

# Columns of every result row (JSON records and CSV), in order.
RECORD_FIELDS = (
    "file",
    "status",
    "score",
    "label",
    "raw_score",
    "threshold",
    "map_max",
    "mask_fraction",
    "height",
    "width",
    "ms",
    "error",
)


@dataclass(frozen=True)
class ImageResult:
    """The outcome for one file: a Prediction (batch of one) or the reason it failed.

    ``ms`` is the file's share of its batch's inference time (decoding excluded).
    """

    path: Path
    name: str
    prediction: Prediction | None = None
    size: tuple[int, int] | None = None
    error: str | None = None
    ms: float | None = None

    def record(self, threshold: float, postprocess: dict[str, float] | None = None) -> dict[str, object]:
        """A flat row for JSON and CSV: numbers as numbers, None where there is no value.

        ``raw_score`` (the un-normalised distance) is recovered from the normalised score through the model's
        min-max statistics (``postprocess``); it is None where the score is clipped at 0 or 1.
        """
        row: dict[str, object] = dict.fromkeys(RECORD_FIELDS)
        row.update(file=self.name, status="error" if self.prediction is None else "ok", error=self.error)
        if self.prediction is None:
            return row
        score = float(self.prediction.pred_score[0])
        row.update(
            score=score,
            label="anomalous" if bool(self.prediction.pred_label[0]) else "normal",
            raw_score=raw_score(score, postprocess) if postprocess else None,
            threshold=threshold,
            map_max=float(self.prediction.anomaly_map.max()),
            mask_fraction=float(self.prediction.pred_mask.mean()),
            height=self.size[0] if self.size else None,
            width=self.size[1] if self.size else None,
            ms=self.ms,
        )
        return row


def raw_score(score: float, post: dict[str, float]) -> float | None:
    """Invert anomalib's min-max normalisation of an image score; None where it was clipped."""
    if not 0.0 < score < 1.0:
        return None
    return (score - 0.5) * (post["image_max"] - post["image_min"]) + post["image_threshold"]


def _batches(paths: list[Path], batch_size: int) -> Iterator[tuple[list[int], list[np.ndarray], list[tuple[int, str]]]]:
    """Runs of consecutive decodable images of one size (their indices and arrays), plus the failures met."""
    indices: list[int] = []
    pending: list[np.ndarray] = []
    failures: list[tuple[int, str]] = []
    for index, path in enumerate(paths):
        try:
            image = load_image(path)
        except ImageError as exc:
            failures.append((index, str(exc)))
            continue
        if pending and (image.shape != pending[0].shape or len(pending) == batch_size):
            yield indices, pending, failures
            indices, pending, failures = [], [], []
        indices.append(index)
        pending.append(image)
    if pending or failures:
        yield indices, pending, failures


def _infer(backend: Backend, images: list[np.ndarray]) -> tuple[Prediction, set[int], float]:
    """One batch: the prediction, the positions that scored NaN or infinity, and the milliseconds it took."""
    start = time.perf_counter()
    try:
        prediction, bad = backend.predict(np.stack(images)), set()
    except NonFiniteOutputError as exc:
        prediction, bad = exc.prediction, set(exc.bad)
    return prediction, bad, 1000 * (time.perf_counter() - start)


def _name(path: Path, names: dict[Path, str]) -> str:
    return names.get(path) or display_name(path)


def predict_files(
    backend: Backend, paths: list[Path], *, names: dict[Path, str] | None = None, batch_size: int = 8
) -> Iterator[tuple[ImageResult, np.ndarray | None]]:
    """Predict every file of ``paths``; yields ``(result, decoded image or None)`` in input order, file by file.

    The decoded [3, H, W] image comes along so callers can draw it without decoding again; it is not kept.
    """
    names = names or {}
    for indices, images, failures in _batches(paths, batch_size):
        done = [(index, ImageResult(paths[index], _name(paths[index], names), error=why), None)
                for index, why in failures]  # fmt: skip
        if images:
            prediction, bad, ms = _infer(backend, images)
            for position, index in enumerate(indices):
                path = paths[index]
                name = _name(path, names)
                if position in bad:
                    result = ImageResult(path, name, error="the model scored NaN or infinity (extreme pixel values?)")
                else:
                    size = images[position].shape[1:]
                    result = ImageResult(path, name, prediction[position], size, ms=ms / len(images))
                done.append((index, result, images[position]))
        for _, result, image in sorted(done, key=lambda item: item[0]):
            yield result, image
