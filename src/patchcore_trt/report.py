"""Parity figures between two Predictions, result files (JSON/CSV), heatmap PNGs and rich tables."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.table import Table

from patchcore_trt.files import atomic_path, write_text_atomic
from patchcore_trt.runtime.base import Prediction

# anomalib labels a score strictly above 0.5 (normalised). A score this close to 0.5 is a tie that
# float rounding may break either way, so label agreement is judged only outside this margin.
LABEL_TIE_MARGIN = 1e-5
NORMALIZED_THRESHOLD = 0.5


@dataclass(frozen=True)
class Parity:
    """How far one backend's outputs are from a reference's, on the same images."""

    images: int
    max_score_error: float
    max_map_error: float
    labels_equal: int
    labels_compared: int
    mask_agreement: float

    @property
    def labels_identical(self) -> bool:
        return self.labels_equal == self.labels_compared

    def within(self, score_tol: float, map_tol: float) -> bool:
        return self.max_score_error <= score_tol and self.max_map_error <= map_tol and self.labels_identical


def parity(candidate: Prediction, reference: Prediction) -> Parity:
    """Compare ``candidate`` against ``reference`` (maps must have the same shape)."""
    if candidate.anomaly_map.shape != reference.anomaly_map.shape:
        raise ValueError(f"map shapes differ: {candidate.anomaly_map.shape} vs {reference.anomaly_map.shape}")
    decided = np.abs(reference.pred_score - NORMALIZED_THRESHOLD) > LABEL_TIE_MARGIN
    return Parity(
        images=len(reference),
        max_score_error=float(np.abs(candidate.pred_score - reference.pred_score).max()),
        max_map_error=float(np.abs(candidate.anomaly_map - reference.anomaly_map).max()),
        labels_equal=int((candidate.pred_label == reference.pred_label)[decided].sum()),
        labels_compared=int(decided.sum()),
        mask_agreement=float((candidate.pred_mask == reference.pred_mask).mean()),
    )


def parity_row(name: str, figures: Parity) -> dict[str, Any]:
    return {
        "backend": name,
        "images": figures.images,
        "max|d score|": f"{figures.max_score_error:.1e}",
        "max|d map|": f"{figures.max_map_error:.1e}",
        "labels": f"{figures.labels_equal}/{figures.labels_compared}",
        "mask px": f"{100 * figures.mask_agreement:.2f}%",
    }


def rich_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for column in rows[0] if rows else []:
        table.add_column(str(column), justify="left" if column in ("backend", "file", "status") else "right")
    for row in rows:
        table.add_row(*(str(value) for value in row.values()))
    return table


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    header = list(rows[0])
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_json(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    if rows:
        # Failed files have fewer fields than scored ones: the columns are every field seen, in order.
        fieldnames = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(buffer, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def _png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _colorize(anomaly_map: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(anomaly_map, 0, 1))[..., :3] * 255).astype(np.uint8)


def _resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    if array.shape[:2] == (height, width):
        return array
    return np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR))


def save_visuals(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, stem: Path) -> list[Path]:
    """Write ``stem``.heatmap.png, .overlay.png and .mask.png for one image.

    Args:
        image: [3, H, W] float RGB in [0, 1]. anomaly_map: [h, w] normalised. mask: [h, w] bool.
    """
    height, width = image.shape[1:]
    rgb = (np.clip(image.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
    heat = _resize(_colorize(anomaly_map), height, width)
    overlay = (0.55 * rgb + 0.45 * heat).astype(np.uint8)
    mask_png = _resize(mask.astype(np.uint8) * 255, height, width)
    paths = [stem.with_name(stem.name + suffix) for suffix in (".heatmap.png", ".overlay.png", ".mask.png")]
    for array, path in zip((heat, overlay, mask_png), paths, strict=True):
        _png(array, path)
    return paths
