"""Run a backend over image files: decode, batch images of equal size, infer, keep per-file results.

A file that fails to decode is recorded with its reason and the run goes on; nothing already computed
is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchcore_trt.images import ImageError, load_image
from patchcore_trt.runtime.base import Backend, Prediction


@dataclass(frozen=True)
class ImageResult:
    """The outcome for one file: a Prediction (batch of one) or the reason it failed."""

    path: Path
    prediction: Prediction | None = None
    size: tuple[int, int] | None = None
    error: str | None = None

    def record(self) -> dict[str, object]:
        """A flat row for tables, JSON and CSV."""
        if self.prediction is None:
            return {"file": str(self.path), "status": "error", "score": "", "label": "", "error": self.error or ""}
        anomaly_map = self.prediction.anomaly_map[0, 0]
        return {
            "file": str(self.path),
            "status": "ok",
            "score": round(float(self.prediction.pred_score[0]), 6),
            "label": "anomalous" if bool(self.prediction.pred_label[0]) else "normal",
            "map_max": round(float(anomaly_map.max()), 6),
            "mask_fraction": round(float(self.prediction.pred_mask.mean()), 6),
            "height": self.size[0] if self.size else "",
            "width": self.size[1] if self.size else "",
            "error": "",
        }


def _batches(paths: list[Path], batch_size: int) -> Iterator[tuple[list[Path], list[np.ndarray], list[ImageResult]]]:
    """Yield runs of consecutive decodable images of one size, plus the failures met on the way."""
    pending_paths: list[Path] = []
    pending: list[np.ndarray] = []
    failures: list[ImageResult] = []
    for path in paths:
        try:
            image = load_image(path)
        except ImageError as exc:
            failures.append(ImageResult(path=path, error=str(exc)))
            continue
        if pending and (image.shape != pending[0].shape or len(pending) == batch_size):
            yield pending_paths, pending, failures
            pending_paths, pending, failures = [], [], []
        pending_paths.append(path)
        pending.append(image)
    if pending or failures:
        yield pending_paths, pending, failures


def predict_files(
    backend: Backend,
    paths: list[Path],
    *,
    batch_size: int = 8,
    on_result: Callable[[ImageResult, np.ndarray | None], None] | None = None,
) -> list[ImageResult]:
    """Predict every file in ``paths`` with ``backend``; results come back in input order.

    ``on_result(result, image)`` is called once per file as soon as it is done (``image`` is the decoded
    [3, H, W] array, None for a failure), so callers can report progress or write per-image files without
    holding every decoded image until the end.
    """
    results: dict[Path, ImageResult] = {}
    for batch_paths, images, failures in _batches(paths, batch_size):
        done: list[tuple[ImageResult, np.ndarray | None]] = [(failure, None) for failure in failures]
        if images:
            prediction = backend.predict(np.stack(images))
            done += [
                (ImageResult(path=path, prediction=prediction[index], size=images[index].shape[1:]), images[index])
                for index, path in enumerate(batch_paths)
            ]
        for result, image in done:
            results[result.path] = result
            if on_result is not None:
                on_result(result, image)
    return [results[path] for path in paths]
