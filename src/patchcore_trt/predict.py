"""Predict over image files as a library call: ``run_predict(backend, paths, sinks=...)`` -> PredictSummary.

Files are decoded, images of equal size run together as one batch, and each result is handed to every sink
(JSON, CSV, visuals, the HTML report) as it is done, in input order, so memory does not grow with the number of
images and a run stopped half-way keeps what it scored. A file that fails to decode, scores NaN, or whose batch
the backend could not run (a server that went away) is an error row with its reason, and the run goes on; after
``MAX_FAILED_BATCHES`` batches in a row fail, the rest are error rows at once rather than each waiting in turn.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from patchcore_trt.errors import UserError
from patchcore_trt.files import display_name
from patchcore_trt.images import decode_files, default_workers, natural_key
from patchcore_trt.outputs import NonFiniteOutputError, Postprocess, Prediction
from patchcore_trt.runtime.base import Backend

MAX_FAILED_BATCHES = 3

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

    def record(self, post: Postprocess) -> dict[str, object]:
        """A flat row for JSON and CSV: numbers as numbers, None where there is no value.

        ``raw_score`` (anomalib's un-normalised distance) is the backend's own where it computes one (the torch
        backend), else recovered from the normalised score through the model's min-max statistics: None there
        where the score is clipped at 0 or 1. ``map_max`` and ``mask_fraction`` are None when the maps were not
        asked for (a served model asked for scores only).
        """
        row: dict[str, object] = dict.fromkeys(RECORD_FIELDS)
        row.update(file=self.name, status="error" if self.prediction is None else "ok", error=self.error)
        if self.prediction is None:
            return row
        score = float(self.prediction.pred_score[0])
        row.update(
            score=score,
            label="anomalous" if bool(self.prediction.pred_label[0]) else "normal",
            raw_score=self.prediction.raw_score_of(0, post),
            threshold=post.normalized_image_threshold,
            map_max=float(self.prediction.anomaly_map.max()) if self.prediction.has_maps else None,
            mask_fraction=float(self.prediction.pred_mask.mean()) if self.prediction.has_maps else None,
            height=self.size[0] if self.size else None,
            width=self.size[1] if self.size else None,
            ms=self.ms,
        )
        return row


def _batches(
    paths: list[Path], batch_size: int, workers: int
) -> Iterator[tuple[list[int], list[np.ndarray], list[tuple[int, str]]]]:
    """Runs of consecutive decodable images of one size and kind (their indices and arrays), plus the failures
    met. 8-bit images stay uint8 [H, W, 3]; the backend converts them where it needs floats."""
    indices: list[int] = []
    pending: list[np.ndarray] = []
    failures: list[tuple[int, str]] = []
    for index, image, why in decode_files(paths, workers):
        if image is None:
            failures.append((index, why or "failed"))
            continue
        same = pending and image.shape == pending[0].shape and image.dtype == pending[0].dtype
        if pending and (not same or len(pending) == batch_size):
            yield indices, pending, failures
            indices, pending, failures = [], [], []
        indices.append(index)
        pending.append(image)
    if pending or failures:
        yield indices, pending, failures


def image_size(image: np.ndarray) -> tuple[int, int]:
    """(height, width) of a decoded image: uint8 [H, W, 3] or float32 [3, H, W]."""
    return image.shape[:2] if image.dtype == np.uint8 else image.shape[1:]


def _infer(backend: Backend, images: list[np.ndarray]) -> tuple[Prediction | None, set[int], float, str | None]:
    """One batch: the prediction (None if the backend could not run it), the positions that scored NaN or infinity,
    the milliseconds it took, and why the batch failed."""
    start = time.perf_counter()
    try:
        # 8-bit images are stacked straight into the backend's staging memory (the cuda backend's pinned slots).
        out = backend.slot(len(images), *images[0].shape[:2]) if images[0].dtype == np.uint8 else None
        prediction, bad, why = backend.predict(np.stack(images, out=out)), set(), None
    except NonFiniteOutputError as exc:
        prediction, bad, why = exc.prediction, set(exc.bad), None
    except UserError as exc:  # the batch could not run (a server gone away, out of memory): its images fail
        prediction, bad, why = None, set(), str(exc)
    return prediction, bad, 1000 * (time.perf_counter() - start), why


def _name(path: Path, names: dict[Path, str]) -> str:
    return names.get(path) or display_name(path)


def predict_files(
    backend: Backend,
    paths: list[Path],
    *,
    names: dict[Path, str] | None = None,
    batch_size: int = 8,
    workers: int = 1,
) -> Iterator[tuple[ImageResult, np.ndarray | None]]:
    """Predict every file of ``paths``; yields ``(result, decoded image or None)`` in input order, file by file.

    The decoded image (``images.decode_image``'s uint8 [H, W, 3] or float32 [3, H, W]) comes along so callers can
    draw it without decoding again; it is not kept. ``workers`` threads decode ahead while a batch runs.
    """
    names = names or {}
    failed_in_a_row, last_failure = 0, ""
    for indices, images, failures in _batches(paths, batch_size, workers):
        done = [(index, ImageResult(paths[index], _name(paths[index], names), error=why), None)
                for index, why in failures]  # fmt: skip
        if images and failed_in_a_row >= MAX_FAILED_BATCHES:
            why = f"not run: {MAX_FAILED_BATCHES} batches in a row failed (last: {last_failure})"
            done += [(index, ImageResult(paths[index], _name(paths[index], names), error=why), None)
                     for index in indices]  # fmt: skip
        elif images:
            prediction, bad, ms, batch_error = _infer(backend, images)
            failed_in_a_row = failed_in_a_row + 1 if prediction is None else 0
            last_failure = batch_error or last_failure
            for position, index in enumerate(indices):
                path = paths[index]
                name = _name(path, names)
                if prediction is None:
                    result = ImageResult(path, name, error=batch_error)
                elif position in bad:
                    result = ImageResult(path, name, error="the model scored NaN or infinity (extreme pixel values?)")
                else:
                    size = image_size(images[position])
                    result = ImageResult(path, name, prediction[position], size, ms=ms / len(images))
                done.append((index, result, images[position]))
        for _, result, image in sorted(done, key=lambda item: item[0]):
            yield result, image


class ResultSink(Protocol):
    """Where results go as they come (report.JsonResults, report.CsvResults, visuals.VisualsSink,
    html_report.ReportSink): ``add`` per image in input order, ``notes`` for the summary, ``close`` once."""

    def add(self, result: ImageResult, row: dict[str, object], image: np.ndarray | None) -> None: ...

    def notes(self) -> list[str]: ...

    def close(self, summary: PredictSummary) -> None: ...


@dataclass
class PredictSummary:
    """What a run did: counts, time, the most anomalous images, the failures and notes for the user.

    ``top`` holds (score, name, label, raw score or None) of the ``top`` highest scores, highest first (equal
    scores by their raw score where there is one, else in the inputs' natural order); ``interrupted`` is True
    when Ctrl-C stopped the run (every sink still holds what was scored).
    """

    images: int
    scored: int = 0
    anomalous: int = 0
    failed: int = 0
    downscaled: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    top: list[tuple[float, str, bool, float | None]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.scored + self.failed

    @property
    def images_per_second(self) -> float | None:
        return self.scored / self.seconds if self.seconds > 0 else None

    def footer(self) -> dict[str, object]:
        """The JSON file's closing section."""
        counts = {key: getattr(self, key) for key in ("scored", "anomalous", "failed", "downscaled")}
        return {
            "summary": {
                **counts,
                "images": self.images,
                "seconds": self.seconds,
                "images_per_second": self.images_per_second,
                "interrupted": self.interrupted,
            }
        }


def _rank_key(item: tuple[float, str, bool, float | None]) -> tuple[float, float, list[object]]:
    """Highest score first; among equal (clipped) scores the higher raw score, where the backend gives one."""
    score, name, _, raw = item
    return -score, -raw if raw is not None else 0.0, natural_key(Path(name))


def header(backend: Backend) -> dict[str, object]:
    """What a results file says about the run: the tool, library versions, the model (``backend.describe()``)."""
    import importlib.metadata
    import platform

    import patchcore_trt

    versions = {}
    for package in ("numpy", "onnxruntime", "openvino", "torch", "tensorrt", "tensorrt_rtx"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "tool": {"name": "patchcore-trt", "version": patchcore_trt.__version__, "python": platform.python_version()},
        "versions": versions,
        "model": backend.describe(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_predict(
    backend: Backend,
    paths: Sequence[Path],
    *,
    sinks: Sequence[ResultSink] = (),
    names: dict[Path, str] | None = None,
    batch_size: int = 8,
    top: int = 10,
    unmatched: Sequence[str] = (),
    on_progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> PredictSummary:
    """Predict every file of ``paths`` into ``sinks``; returns the summary. Every sink is closed, also on Ctrl-C.

    Three things overlap: ``workers`` threads decode the next images, the backend runs the current batch, and one
    writer thread hands finished results to the sinks (panels and files), in input order.

    Args:
        backend: Any backend (``runtime.open_backend``), local or a server.
        paths: Image files, in the order the results should come.
        sinks: Where each result goes (see ResultSink); e.g. ``report.JsonResults(path, header(backend))``.
        names: How to show each path (``images.short_names``); by default the path itself.
        batch_size: Images of equal size run together, up to this many.
        top: How many of the most anomalous images the summary keeps.
        unmatched: Inputs that matched no file; each becomes an error row after the images.
        on_progress: Called with the number of images done after each one.
        workers: Decoding threads (``default_workers()`` when None; 1 decodes on the calling thread).
    """
    from patchcore_trt.visuals import DOWNSCALE_LIMIT, downscale_warning

    post = backend.postprocess
    summary = PredictSummary(images=len(paths) + len(unmatched))
    writer = _Writer(sinks)
    workers = default_workers() if workers is None else workers
    started = time.perf_counter()
    try:
        for result, image in predict_files(backend, list(paths), names=names, batch_size=batch_size, workers=workers):
            _add(summary, writer, post, result, image, top)
            if result.prediction is not None:
                maps = result.prediction.anomaly_map
                map_size = maps.shape[-2:] if maps is not None else backend.map_size
                summary.downscaled += map_size is not None and downscale_warning(result.size, map_size) is not None
            if on_progress is not None:
                on_progress(summary.done)
        for item in unmatched:
            _add(summary, writer, post, ImageResult(Path(item), item, error="no image files found"), None, top)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        writer.finish()  # every result produced reaches the sinks, also after Ctrl-C
    summary.seconds = time.perf_counter() - started
    summary.top.sort(key=_rank_key)
    del summary.top[top:]
    if summary.downscaled:
        summary.notes.append(
            f"{summary.downscaled} image(s) are over {DOWNSCALE_LIMIT:g}x the model's resolution and were downscaled "
            "to it: small defects may vanish (crop or tile the images, or train at a larger size)"
        )
    summary.notes += backend.notes() + [note for sink in sinks for note in sink.notes()]
    for sink in sinks:
        sink.close(summary)
    return summary


class _Writer:
    """Hands results to the sinks on a thread of its own, in order, so panels and file writes overlap inference.

    The queue is bounded (memory stays flat); an error in a sink (a full disk) is raised in the caller's thread at
    the next result or at ``finish``.
    """

    def __init__(self, sinks: Sequence[ResultSink], depth: int = 32) -> None:
        self.sinks = sinks
        self.queue: queue.Queue[tuple[ImageResult, dict[str, object], np.ndarray | None] | None] = queue.Queue(depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="sinks", daemon=True)
        self.thread.start()

    def put(self, result: ImageResult, row: dict[str, object], image: np.ndarray | None) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((result, row, image))

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the caller raises the first error
            try:
                for sink in self.sinks:
                    sink.add(*item)
            except BaseException as exc:  # re-raised in the caller's thread
                self.error = exc

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _add(
    summary: PredictSummary,
    writer: _Writer,
    post: Postprocess,
    result: ImageResult,
    image: np.ndarray | None,
    top: int,
) -> None:
    row = result.record(post)
    writer.put(result, row, image)
    if result.prediction is None:
        summary.failed += 1
        summary.failures.append((result.name, result.error or "failed"))
        return
    summary.scored += 1
    label = row["label"] == "anomalous"
    summary.anomalous += label
    summary.top.append((float(row["score"]), result.name, label, row["raw_score"]))
    if len(summary.top) > 2 * max(top, 8):  # trimmed now and then: ranking stays O(n log top), not O(n^2)
        summary.top.sort(key=_rank_key)
        del summary.top[top:]
