"""The ``patchcore-trt`` command line: a thin layer over the Python API, one module per subcommand.

User mistakes (``UserError``) print as one red line and exit 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from patchcore_trt.errors import UserError

app = typer.Typer(
    name="patchcore-trt",
    help="anomalib PatchCore -> faithful ONNX -> TensorRT, verified against anomalib and benchmarked.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    _state["debug"] = debug


def _register_commands() -> None:
    # Each module adds its command to ``app``; importing them is cheap (heavy imports happen inside commands).
    from patchcore_trt.cli import bench, build, demo, export, predict, verify  # noqa: F401


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _register_commands()
    try:
        # Outside standalone mode click returns a command's exit code instead of exiting.
        exit_code = app(standalone_mode=False)
    except UserError as exc:
        if _state["debug"]:
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except OSError as exc:  # an output path that is a folder, a full disk, a permission: the user's to fix
        if _state["debug"]:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        console.print(f"[bold red]error:[/] {where}{exc.strerror or exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors, in click's own words (typer ships its own click)
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(exit_code if isinstance(exit_code, int) else 0)
