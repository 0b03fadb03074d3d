"""What users read: rich and Markdown tables, result files (JSON/CSV) and heatmap PNGs."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text

from patchcore_trt.files import (
    display_name,
    is_special,
    naming,
    open_special,
    staged_beside,
    staging_target,
    write_text_atomic,
)


def rich_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> Table:
    """A rich table whose cells are plain text: file names like ``[bold].png`` are shown, never taken as markup."""
    table = Table(title=None if title is None else Text(title), title_justify="left")
    for column in rows[0] if rows else []:
        justify = "left" if column in ("backend", "file", "status") else "right"
        table.add_column(Text(str(column)), justify=justify, overflow="fold")
    for row in rows:
        table.add_row(*(Text(str(value)) for value in row.values()))
    return table


def format_score(score: float, threshold: float, digits: int = 4) -> str:
    """``score`` rounded to ``digits`` decimals, or more where rounding would put it on the other side of (or onto)
    the threshold: 0.4999996 under a 0.5 threshold prints as 0.4999996, not 0.5000."""
    for places in range(digits, 10):
        text = f"{score:.{places}f}"
        if (float(text) > threshold) == (score > threshold) and float(text) != threshold:
            return text
    return repr(score)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    header = list(rows[0])
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def json_ready(value: Any) -> Any:
    """``value`` with only what strict JSON holds: NaN and infinities become null, paths and bytes-y names text."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if hasattr(value, "__dataclass_fields__"):
        return json_ready(asdict(value))
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return display_name(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def to_json(payload: Any, indent: int | None = 2) -> str:
    return json.dumps(json_ready(payload), indent=indent, allow_nan=False)


def write_json(path: Path, payload: Any) -> None:
    write_text_atomic(path, to_json(payload) + "\n")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    if rows:
        # Failed files have fewer fields than scored ones: the columns are every field seen, in order.
        fieldnames = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(buffer, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows([_csv_row(row) for row in rows])
    write_text_atomic(path, buffer.getvalue())


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    return {key: "" if value is None else value for key, value in json_ready(row).items()}


class StreamedFile:
    """A text file written piece by piece to a temporary file beside ``path`` and renamed onto it by ``commit``.

    A special target (``/dev/stdout``, a FIFO) is written to directly, never renamed over; a symlink to a regular
    file stays a link (the file it points to is replaced).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._staged: Path | None = None
        self._target = staging_target(self.path)
        if is_special(self.path):
            with naming(self.path):
                self.handle = open_special(self.path, "w")
            return
        with naming(self.path):
            fd, self._staged = staged_beside(self._target)
        self.handle = os.fdopen(fd, "w", encoding="utf-8", newline="")

    def write(self, text: str) -> None:
        with naming(self.path):
            self.handle.write(text)

    def commit(self) -> None:
        try:
            self.handle.close()
            if self._staged is not None:
                os.replace(self._staged, self._target)
        except OSError as exc:
            self.discard()
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()
        if self._staged is not None:
            self._staged.unlink(missing_ok=True)


class JsonResults:
    """A predict sink: ``{header..., "results": [...], footer...}`` written one row at a time (memory stays flat)."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.file = StreamedFile(path)
        self.count = 0
        self.file.write(to_json(header)[:-2] + ',\n  "results": [')

    def add(self, result: Any, row: dict[str, Any], image: Any) -> None:
        del result, image  # the row says it all
        self.file.write(("," if self.count else "") + "\n    " + to_json(row, indent=None))
        self.count += 1

    def notes(self) -> list[str]:
        return []

    def close(self, summary: Any) -> None:
        self.file.write("\n  ],\n" + to_json(summary.footer())[2:] + "\n")
        self.file.commit()


class CsvResults:
    """A predict sink: a CSV of fixed columns (``predict.RECORD_FIELDS``) written one row at a time."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.file = StreamedFile(path)
        self.writer = csv.DictWriter(self.file, fieldnames=list(columns), restval="", extrasaction="ignore")
        self.writer.writeheader()

    def add(self, result: Any, row: dict[str, Any], image: Any) -> None:
        del result, image
        self.writer.writerow(_csv_row(row))

    def notes(self) -> list[str]:
        return []

    def close(self, summary: Any) -> None:
        del summary  # a CSV holds rows only
        self.file.commit()
