"""``patchcore-trt export``: checkpoint -> verified dynamic ONNX."""

from __future__ import annotations

from pathlib import Path

import typer

from patchcore_trt.cli import app
from patchcore_trt.cli._common import (
    check_output_dir,
    err,
    human_size,
    out,
    parse_size,
    print_table,
    program,
    step,
    trust_option,
    version_option,
)
from patchcore_trt.errors import UserError


@app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="anomalib PatchCore Lightning checkpoint (.ckpt)."),
    output_dir: Path = typer.Option(..., "--output", "-o", help="Folder for the ONNX file."),
    name: str = typer.Option("model", help="File name stem: writes NAME.onnx."),
    map_at_input_size: bool = typer.Option(
        False, "--map-at-input-size", help="Return the anomaly map at the input's resolution, not the model's."
    ),
    opset: int = typer.Option(18, help="ONNX opset (17 or newer)."),
    image_size: str | None = typer.Option(
        None, help="Model resolution N or HxW, only for checkpoints that do not record their transform."
    ),
    check: bool = typer.Option(
        True, help="Check the graph (checker, ONNX Runtime vs the deploy model) before naming it."
    ),
    trust_pickled_code: bool = trust_option(),
    anomalib_version: str | None = version_option(),
) -> None:
    """Export an anomalib PatchCore checkpoint to ONNX with dynamic batch, height and width."""
    if not name or name.startswith(".") or Path(name).name != name or "\\" in name:
        raise UserError(f"--name {name!r}: give a plain file name without folders (it writes NAME.onnx in -o)")
    if checkpoint.suffix.lower() != ".ckpt":
        raise UserError(f"{checkpoint}: expected an anomalib .ckpt checkpoint")
    check_output_dir(output_dir)
    if not checkpoint.is_file():
        raise UserError(f"{checkpoint}: {'is a folder' if checkpoint.is_dir() else 'no such file'}")
    size = parse_size(image_size)
    from patchcore_trt.archive import check_checkpoint_file
    from patchcore_trt.artifact import check_opset

    check_opset(opset)
    check_checkpoint_file(checkpoint)
    # torch loads only once the cheap checks have passed.
    from patchcore_trt.checkpoint import read_checkpoint
    from patchcore_trt.export import export_onnx

    with step(f"reading {checkpoint}"):
        spec = read_checkpoint(
            checkpoint, trust_pickled_code=trust_pickled_code, image_size=size, anomalib_version=anomalib_version
        )
    err.print(f"  written by {spec.written_by} ({spec.written_by_evidence})")
    err.print(
        f"  {spec.backbone} {list(spec.layers)}, bank {spec.bank_size} x {spec.embedding_dim}, "
        f"k={spec.num_neighbors}, model size {spec.preprocess.model_size}",
    )
    target = output_dir / f"{name}.onnx"
    with step(f"exporting {target}"):
        path, checks = export_onnx(spec, target, map_at_input_size=map_at_input_size, opset=opset, check=check)
    err.print(f"  wrote {path} ({human_size(path)})")
    if checks:
        rows = [
            {
                "batch": c.batch,
                "input": f"{c.height}x{c.width}",
                "max |d score|": f"{c.parity.max_score_error:.1e}",
                "max |d map|": f"{c.parity.max_map_error:.1e}",
                "labels equal": c.parity.labels_identical,
            }
            for c in checks
        ]
        print_table(rows, "self-check: ONNX Runtime vs deploy model")
    out.print(f"next: {program()} predict {path} IMAGES...")
