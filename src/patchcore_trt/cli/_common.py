"""Pieces every command shares: the consoles, step logging, progress bars, option parsing and output checks.

The consoles take no markup: user text (file names, messages) may contain ``[...]``, which rich would read as
markup, fail on or silently drop. Colour comes from ``Text`` styles only.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from patchcore_trt.artifact import MAX_SIDE, MIN_SIDE
from patchcore_trt.errors import UserError
from patchcore_trt.files import is_special, std_stream

# soft_wrap: long lines (paths) are left to the terminal to wrap, never cut or broken into the middle of a name.
out = Console(markup=False, highlight=False, soft_wrap=True)
err = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)


TRUST_HELP = (
    "DANGER: unpickle objects patchcore-trt does not know (it names them), running their code. Only for "
    "checkpoints you trust; no anomalib release's own layout needs it."
)
VERSION_HELP = (
    "The anomalib release that trained the checkpoint (e.g. 2.0.0); needed only for 2.0-2.2 files saved with the "
    "default pre-processor when the file cannot tell; checked against the file otherwise."
)


def trust_option() -> typer.models.OptionInfo:
    """``--trust-pickled-code``: the one opt-in to running a checkpoint's pickled code, the same on every command."""
    return typer.Option(False, "--trust-pickled-code", help=TRUST_HELP)


def version_option() -> typer.models.OptionInfo:
    """``--anomalib-version``: the release that trained a checkpoint, where the file cannot tell."""
    return typer.Option(None, "--anomalib-version", help=VERSION_HELP, callback=_release)


def _release(text: str | None) -> str | None:
    """A malformed release is answered while the command line is parsed, before any checkpoint is read."""
    if text is not None:
        from patchcore_trt.layouts import parse_version

        parse_version(text)
    return text


def summary_console(*outputs: Path | None) -> Console:
    """Where a command prints its summary: stdout, or stderr when a results file is stdout itself
    (``--json /dev/stdout | jq`` must get the JSON alone)."""
    return err if any(path is not None and std_stream(path) == 1 for path in outputs) else out


def print_table(rows: list[dict[str, object]], title: str, console: Console | None = None) -> None:
    """A rich table on a terminal; a Markdown table otherwise (a log or a pipe has no width to fit)."""
    from patchcore_trt.report import markdown_table, rich_table

    console = out if console is None else console
    if console.is_terminal:
        console.print(rich_table(rows, title=title))
    else:
        console.print(f"{title}\n\n{markdown_table(rows)}")


def human_size(path: Path) -> str:
    size = float(path.stat().st_size) if path.exists() else 0.0
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def program() -> str:
    """How the user started patchcore-trt, so the commands we suggest run as printed (``.venv/bin/patchcore-trt``)."""
    invoked = sys.argv[0] if sys.argv else ""
    return invoked if Path(invoked).name == "patchcore-trt" else "patchcore-trt"


def warn(text: str) -> None:
    err.print(Text.assemble(("warning:", "yellow"), " ", text), soft_wrap=True)


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    """Log one start line and one done line with the elapsed time."""
    err.print(Text.assemble((">", "cyan"), f" {title} ..."), soft_wrap=True)
    start = time.perf_counter()
    yield
    err.print(Text.assemble(("✓", "green"), f" {title} ({time.perf_counter() - start:.1f} s)"), soft_wrap=True)


def progress(rate: bool = False) -> Progress:
    """A progress bar on stderr; ``rate`` adds images per second (the task's ``rate`` field)."""
    columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn()]
    if rate:
        columns.append(TextColumn("{task.fields[rate]}", markup=False))
    return Progress(*columns, TimeElapsedColumn(), console=err, transient=True)


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
    if len(values) != 2 or min(values) < MIN_SIDE or max(values) > MAX_SIDE:
        raise UserError(
            f"image size {text!r} must be N or HxW with both sides at least {MIN_SIDE} and at most {MAX_SIDE}"
        )
    return values[0], values[1]


def _writable_folder(path: Path) -> None:
    """The nearest existing folder at or above ``path`` must be a folder we may create files in."""
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"{folder}: is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise UserError(f"{folder}: this folder is not writable; choose another output location")
            # Permission bits are not the whole story (root passes os.access, and /sys or /proc refuse anyway):
            # one real, empty folder made and removed at once answers before the work.
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".patchcore-trt-probe.", dir=folder))
            except OSError as exc:
                raise UserError(
                    f"{folder}: cannot create files here ({exc.strerror}); choose another output location"
                ) from None
            return


def check_output_dir(path: Path | None) -> None:
    """Fail before the work, not after it, when an output folder cannot be made or written to."""
    if path is not None:
        _writable_folder(path)


def check_output_file(path: Path | None, *, protected: Iterable[Path] = ()) -> None:
    """Fail before the work when an output file cannot be written, or would overwrite a model or an input."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name")
    if is_special(path):  # /dev/null, /dev/stdout, a FIFO: written to directly
        return
    _writable_folder(path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{path}: the file is not writable; choose another output file")
    target = path.resolve()
    for other in protected:
        if other.exists() and target == other.resolve():
            raise UserError(f"{path}: is also an input ({other}); writing results there would destroy it")


def _destination(path: Path) -> object:
    """What writing to ``path`` writes into: the open file behind a descriptor link (``/dev/stdout``,
    ``/proc/self/fd/1``), the file an existing path or link leads to, else the path itself. None for the null
    device, which may take any number of outputs."""
    fd = std_stream(path)
    try:
        info = os.fstat(fd) if fd is not None else os.stat(path)
    except OSError:
        return path.resolve()
    if stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(1, 3):
        return None
    return info.st_dev, info.st_ino


def check_distinct(*paths: Path | None) -> None:
    """Refuse two outputs that are one file, however spelled (the second would overwrite the first, or both would
    interleave into one unreadable stream on ``/dev/stdout`` or a FIFO)."""
    seen: dict[object, Path] = {}
    for path in paths:
        if path is None:
            continue
        key = _destination(path)
        if key is None:
            continue
        if key in seen:
            raise UserError(f"{path}: given for two outputs ({seen[key]} and {path}); give each its own file")
        seen[key] = path


def backend_option(name: str, backend: str) -> typer.models.OptionInfo:
    """A command-line option for one of ``backend``'s options, its help and choices from the registry."""
    from patchcore_trt.runtime.registry import OPTIONS, flag

    return typer.Option(None, flag(name), help=f"(--backend {backend}) {OPTIONS[name].help_text()}")
