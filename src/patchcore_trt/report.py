"""What users read: rich and Markdown tables, result files (JSON/CSV) and heatmap PNGs."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.table import Table

from patchcore_trt.files import atomic_path, write_text_atomic


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
