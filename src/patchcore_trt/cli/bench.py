"""``patchcore-trt bench``: the benchmark matrix, printed as a comparison table with its result files."""

from __future__ import annotations

from pathlib import Path

import typer

from patchcore_trt.artifact import MAX_BATCH
from patchcore_trt.bench.settings import GPU_BACKENDS, MAX_BANK, MAX_IMAGES, PEERS, BenchSettings
from patchcore_trt.cli import app
from patchcore_trt.cli._common import check_output_dir, err, parse_size, print_table, program, step, trust_option, warn
from patchcore_trt.errors import UserError
from patchcore_trt.runtime.registry import OPTIONS

DEFAULTS = BenchSettings()
RUNS = Path("runs") / "bench"


def next_run_folder(parent: Path = RUNS) -> Path:
    """parent/expN for the first N not taken: every run gets a fresh folder and none overwrites another."""
    taken = {path.name for path in parent.glob("exp*")} if parent.is_dir() else set()
    return parent / next(f"exp{n}" for n in range(1, len(taken) + 2) if f"exp{n}" not in taken)


def _joined(values: tuple[object, ...]) -> str:
    return ",".join("x".join(map(str, value)) if isinstance(value, tuple) else str(value) for value in values)


def _names(text: str, option: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    if not values:
        raise UserError(f"{option} needs at least one value")
    bad = [value for value in values if allowed is not None and value not in allowed]
    if bad:
        raise UserError(f"{option}: {', '.join(bad)} not one of {', '.join(allowed or ())}")
    return values


def _numbers(text: str, option: str, largest: int) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in _names(text, option))
    except ValueError:
        raise UserError(f"{option} takes whole numbers separated by commas, got {text!r}") from None
    if min(values) < 1 or max(values) > largest:
        raise UserError(f"{option} values must be at least 1 and at most {largest:,}, got {text!r}")
    return values


def _require_gpu_for(backends: tuple[str, ...], synthetic: bool) -> None:
    """Fail at once, with the command that runs here, when every backend asked for needs a GPU this machine lacks."""
    if not set(backends) <= set(GPU_BACKENDS):
        return
    import torch

    if torch.cuda.is_available():
        return
    model = "--synthetic --backbone resnet18 --bank 4096" if synthetic else "MODEL.ckpt"
    raise UserError(
        f"--backends {','.join(backends)} needs an NVIDIA GPU and torch sees none; on this machine time the CPU "
        f"backends instead: {program()} bench {model} --backends onnxruntime,openvino,torch"
    )


@app.command("bench")
def bench_command(
    model: Path | None = typer.Argument(None, help="An anomalib PatchCore .ckpt (or use --synthetic)."),
    synthetic: bool = typer.Option(False, "--synthetic", help="Random-weight WRN50 model, bank of --bank rows."),
    backends: str = typer.Option(
        _joined(DEFAULTS.backends),
        help="Comma list: cuda, torch, onnxruntime, openvino, tensorrt, and the peers anomalib (eager), "
        "anomalib-compile (torch.compile reduce-overhead), onnxruntime-cuda (ONNX Runtime's CUDA EP).",
    ),
    precision: str | None = typer.Option(
        None, help="Comma list of fp32, tf32, fp16, bf16. Default: each backend's own (cuda fp16, others fp32)."
    ),
    search: str = typer.Option(
        _joined(DEFAULTS.searches), help="Comma list of cuda searches. " + OPTIONS["search"].help_text()
    ),
    sizes: str = typer.Option(_joined(DEFAULTS.sizes), help="Input sizes, e.g. 256,512 or 320x256 (height x width)."),
    batch: str = typer.Option(_joined(DEFAULTS.batches), help="Batch sizes, e.g. 1,16."),
    bank: str = typer.Option(_joined(DEFAULTS.banks), help="--synthetic bank rows: one value, or one per size."),
    copies: str = typer.Option(
        _joined(DEFAULTS.copies),
        help="host: uint8 images from host memory; device: already on the GPU (cuda returns host results).",
    ),
    warmup: int = typer.Option(DEFAULTS.warmup, min=0, help="Untimed batches per row."),
    iters: int = typer.Option(DEFAULTS.iters, min=1, help="Timed batches per row (fewer if --max-seconds runs out)."),
    max_seconds: float = typer.Option(
        DEFAULTS.max_seconds, min=0.1, help="Time budget per row for warm-up and for timing."
    ),
    images: int = typer.Option(
        DEFAULTS.images, min=1, max=MAX_IMAGES, help="Distinct images per input size, rotated and checked."
    ),
    baseline: bool = typer.Option(
        DEFAULTS.baseline, help="Add anomalib's eager module as the baseline row when installed."
    ),
    graphs: bool = typer.Option(DEFAULTS.graphs, help="cuda: replay CUDA graphs (--no-graphs: eager launches)."),
    backbone: str = typer.Option(DEFAULTS.backbone, help="--synthetic backbone (a timm name)."),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="Folder for bench.json, .csv, .md and .png (default: a new runs/bench/expN)."
    ),
    trust_pickled_code: bool = trust_option(),
) -> None:
    """Time backends side by side and check each against the FP32 deploy model."""
    if (model is None) == (not synthetic):
        raise UserError("bench needs a MODEL checkpoint or --synthetic (not both)")
    if model is not None and (bank != _joined(DEFAULTS.banks) or backbone != DEFAULTS.backbone):
        raise UserError("--bank and --backbone shape the synthetic model; a checkpoint brings its own")
    # Every option is checked before torch is imported: a typo costs a fraction of a second.
    from patchcore_trt.runtime import backend_names

    options = {
        "backends": _names(backends, "--backends", (*backend_names(), *PEERS)),
        "precisions": _names(precision, "--precision", ("fp32", "tf32", "fp16", "bf16")) if precision else (),
        "searches": _names(search, "--search", OPTIONS["search"].choices),
        "sizes": tuple(parse_size(text) for text in _names(sizes, "--sizes")),
        "batches": _numbers(batch, "--batch", MAX_BATCH),
        "banks": _numbers(bank, "--bank", MAX_BANK),
        "copies": _names(copies, "--copies", ("host", "device")),
    }
    _require_gpu_for(options["backends"], synthetic)
    output = output or next_run_folder()
    check_output_dir(output)
    from patchcore_trt.bench.matrix import run_matrix
    from patchcore_trt.bench.report import display_row, environment, write_chart, write_results

    settings = BenchSettings(
        **options,
        warmup=warmup,
        iters=iters,
        max_seconds=max_seconds,
        images=images,
        baseline=baseline,
        graphs=graphs,
        backbone=backbone,
    )
    env = environment()
    rows: list[dict] = []
    notices: list[str] = []

    def on_row(row: dict) -> None:
        rows.append(row)
        shown = display_row(row)
        err.print(
            f"  {shown['backend']} {shown['precision']} {shown['search']} {shown['input']} batch {shown['batch']}"
            f" ({shown['copies']}): {shown['median ms']} ms, {shown['img/s']} img/s, Δscore {shown['max Δscore']}",
            highlight=False,
        )
        write_results(output, settings, env, rows, notices, checkpoint=model)

    def on_notice(text: str) -> None:
        notices.append(text)
        warn(text)

    with step(f"benchmark on {env.get('gpu', env['cpu'])}"):
        run_matrix(
            settings,
            checkpoint=model,
            trust_pickled_code=trust_pickled_code,
            on_row=on_row,
            on_notice=on_notice,
            step=step,
        )
    if not rows:
        raise UserError("bench: no row could run; see the notes above")
    chart = write_chart(output, rows)
    print_table([display_row(row) for row in rows], "patchcore-trt bench")
    written = ", ".join(str(output / name) for name in ("bench.md", "bench.csv", "bench.json"))
    err.print(f"wrote {written}, {chart}")
