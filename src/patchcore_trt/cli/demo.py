"""``patchcore-trt demo``: the whole pipeline on generated data, no user files needed."""

from __future__ import annotations

from pathlib import Path

import typer

from patchcore_trt.cli import app
from patchcore_trt.cli._common import out, print_table, program, step


@app.command("demo")
def demo_command(
    work_dir: Path = typer.Option(Path("patchcore-demo"), "--output", "-o", help="Folder for data, model and report."),
    backbone: str = typer.Option("wide_resnet50_2", help="timm backbone (random weights: no download here)."),
    image_size: int = typer.Option(256, min=64, help="Model resolution (square)."),
) -> None:
    """Generate an inspection data set, train anomalib PatchCore, export, predict and compare backends."""
    from patchcore_trt.demo.pipeline import run_demo
    from patchcore_trt.demo.training import TrainSettings
    from patchcore_trt.verify import FOOTNOTE, table_rows

    settings = TrainSettings(backbone=backbone, image_size=(image_size, image_size))
    result = run_demo(work_dir, settings, step=step)
    title = f"parity vs anomalib's forward on {len(result.test_images)} test images"
    print_table(table_rows(result.rows), title)
    out.print(FOOTNOTE)
    data = work_dir / "data"
    out.print(f"checkpoint (anomalib): {result.checkpoint}")
    out.print(f"ONNX (exported, self-checked): {result.onnx}")
    out.print(f"heatmaps: {result.visuals_dir}; figures: {result.report}")
    out.print(f"report (open in a browser): {result.html_report}")
    tool = program()
    out.print("next, try:")
    out.print(f"  {tool} predict {result.onnx} {data / 'test'} --json {work_dir / 'results.json'}")
    out.print(f"  {tool} verify {result.checkpoint} {data / 'test'} --onnx {result.onnx}")
    out.print(f"  {tool} build {result.onnx} --precision fp16 --eval-data {data}")
    out.print(f"  {tool} bench {result.checkpoint} --backends onnxruntime,torch")
    if not result.passed:
        raise typer.Exit(1)
