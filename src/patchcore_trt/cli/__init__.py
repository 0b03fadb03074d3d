"""The ``patchcore-trt`` command line: a thin layer over the Python API, one module per subcommand.

Every mistake ends in one line starting with ``error:``: exit code 1 for a ``UserError`` or an OS error, 2 for
a command line the parser cannot read; ``--debug`` shows the traceback instead. Ctrl-C prints one line and
exits 130, after the command has kept what it finished.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer
from rich.console import Console
from rich.text import Text
from typer._click.exceptions import NoArgsIsHelpError, UsageError

from patchcore_trt.errors import UserError

app = typer.Typer(
    name="patchcore-trt",
    help="anomalib PatchCore -> faithful ONNX -> TensorRT, verified against anomalib and benchmarked.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# No markup anywhere: file names and messages may contain "[...]", which rich would take as markup.
console = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
_state = {"debug": False}
INTERRUPTED = 130


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    _state["debug"] = debug


def _register_commands() -> None:
    # Each module adds its command to ``app``; importing them is cheap (heavy imports happen inside commands).
    from patchcore_trt.cli import bench, build, demo, export, predict, serve, triton, verify  # noqa: F401


def _error(message: str, exit_code: int) -> None:
    console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    sys.exit(exit_code)


# Libraries warn about their own deprecations and internals on import and use; nothing a user can act on.
_QUIET_LIBRARIES = (
    r"(anomalib|timm|lightning|lightning_fabric|torch|torchvision|kornia|onnxscript|huggingface_hub)(\.|$)"
)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=_QUIET_LIBRARIES)
    _register_commands()
    try:
        # Outside standalone mode typer returns a command's exit code (130 after Ctrl-C) instead of exiting.
        exit_code = app(standalone_mode=False)
    except UserError as exc:
        if _state["debug"]:
            raise
        _error(str(exc), 1)
    except OSError as exc:  # a full disk, a permission, a path that is a folder: the user's to fix
        if _state["debug"]:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"{where}{exc.strerror or exc}", 1)
    except NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UsageError as exc:  # the parser's own wording, on one line, with the way to more help
        command = f" {exc.ctx.info_name}" if exc.ctx is not None and exc.ctx.parent is not None else ""
        _error(f"{exc.format_message()} (see: patchcore-trt{command} --help)", exc.exit_code)
    if exit_code == INTERRUPTED:
        console.print("interrupted: stopped by Ctrl-C; finished results were kept")
    sys.exit(exit_code if isinstance(exit_code, int) else 0)
