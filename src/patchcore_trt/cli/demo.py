"""``patchcore-trt demo``: the whole pipeline on generated data, no user files needed."""

from __future__ import annotations

from pathlib import Path

import typer

from patchcore_trt.cli import app
from patchcore_trt.cli._common import err, out


@app.command("demo")
def demo_command(
    work_dir: Path = typer.Option(Path("patchcore-demo"), "--output", "-o", help="Folder for data, model and report."),
    backbone: str = typer.Option("wide_resnet50_2", help="timm backbone (random weights: no download here)."),
    image_size: int = typer.Option(256, min=64, help="Model resolution (square)."),
) -> None:
    """Generate an inspection data set, train anomalib PatchCore, export, predict and compare backends."""
    from patchcore_trt.demo import run_demo
    from patchcore_trt.report import parity_row, rich_table
    from patchcore_trt.training import TrainSettings

    settings = TrainSettings(backbone=backbone, image_size=(image_size, image_size))
    result = run_demo(work_dir, settings, log=lambda line: err.print(f"[green]✓[/] {line}", highlight=False))
    rows = []
    for row in result.rows:
        shown = parity_row(row.name, row.figures)
        shown["CPU ms/img"] = f"{row.ms_per_image:.0f}" if row.ms_per_image is not None else "-"
        shown["bar"] = "-" if row.ms_per_image is None else ("PASS" if row.passed else "FAIL")
        rows.append(shown)
    out.print(rich_table(rows, title=f"parity vs anomalib's forward on {len(result.test_images)} test images"))
    out.print(
        "* anomalib's Lightning predict path resizes with antialiasing; its forward (and its export) does not.",
        highlight=False,
    )
    out.print(f"report: {result.report}; heatmaps: {result.visuals_dir}", highlight=False)
    out.print(
        f"next: patchcore-trt predict {result.onnx} {work_dir / 'data' / 'test'} --save-visuals out/", highlight=False
    )
    if not result.passed:
        raise typer.Exit(1)
