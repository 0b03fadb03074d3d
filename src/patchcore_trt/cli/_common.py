"""Pieces every command shares: the console, step logging, progress bars and option parsing."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from patchcore_trt.errors import UserError

out = Console()
err = Console(stderr=True)


def human_size(path: Path) -> str:
    size = float(path.stat().st_size) if path.exists() else 0.0
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    """Log one start line and one done line with the elapsed time."""
    err.print(f"[cyan]>[/] {title} ...", highlight=False)
    start = time.perf_counter()
    yield
    err.print(f"[green]✓[/] {title} ({time.perf_counter() - start:.1f} s)", highlight=False)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'320' or '320x256' (height x width) -> (h, w)."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise UserError(f"image size {text!r} is not N or HxW (e.g. 256 or 320x256)") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 32:
        raise UserError(f"image size {text!r} must be N or HxW with both sides at least 32")
    return values[0], values[1]


def check_output_file(path: Path | None) -> None:
    """Fail before the work, not after it, when an output file cannot be written where the user asked."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name")
    check_output_dir(path.parent)


def check_output_dir(path: Path | None) -> None:
    if path is None:
        return
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"{folder}: is a file, not a folder")
            return
