"""``patchcore-trt build``: FP32 ONNX -> (FP16/INT8 graph transform -> accuracy gate) -> TensorRT engine."""

from __future__ import annotations

from pathlib import Path

import typer

from patchcore_trt.cli import app
from patchcore_trt.cli._common import check_output_dir, check_output_file, err, human_size, program, step, warn


@app.command("build")
def build_command(
    model: Path = typer.Argument(..., help="FP32 ONNX written by 'patchcore-trt export'."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 (backbone in FP16) or int8 (backbone Q/DQ)."),
    shapes: tuple[str, str, str] | None = typer.Option(
        None, "--shapes", help="MIN OPT MAX as BATCHxHEIGHTxWIDTH, e.g. 1x256x256 1x512x512 16x1024x1024."
    ),
    workspace: float | None = typer.Option(None, "--workspace", help="TensorRT scratch memory limit in GiB."),
    timing_cache: Path | None = typer.Option(None, "--timing-cache", help="Timing cache to reuse (full TensorRT)."),
    calibration: Path | None = typer.Option(None, "--calibration", help="int8: folder of normal images."),
    calibration_images: int = typer.Option(500, "--calibration-images", help="int8: images used at most."),
    calibration_cache: Path | None = typer.Option(
        None, "--calibration-cache", help="int8: range cache (default MODEL.int8.calib.json)."
    ),
    eval_data: Path | None = typer.Option(None, "--eval-data", help="fp16/int8: labelled folder for the gate."),
    force: bool = typer.Option(False, "--force", help="Build even if the accuracy gate fails."),
) -> None:
    """Build MODEL.<precision>.engine (+ .engine.json metadata) from an exported ONNX."""
    from patchcore_trt.artifact import variant_path
    from patchcore_trt.build import GateRefusedError, build
    from patchcore_trt.engine import Profile, Shape

    profile = Profile(*(Shape.parse(text) for text in shapes)) if shapes else None
    # The engine, its sidecar and the fp16/int8 graph are written beside MODEL; fail before the build, not after.
    if model.is_file():
        check_output_dir(model.parent)
    check_output_file(calibration_cache, protected=[model])
    check_output_file(timing_cache, protected=[model])
    try:
        outcome = build(
            model,
            precision,
            profile=profile,
            workspace_gib=workspace,
            timing_cache=timing_cache,
            calibration=calibration,
            max_calibration_images=calibration_images,
            calibration_cache=calibration_cache,
            eval_data=eval_data,
            force=force,
            step=step,
            notice=warn,
        )
    except GateRefusedError as refused:
        err.print(f"  {refused.figures.summary()}")
        raise
    if outcome.gate is not None:
        err.print(f"  {outcome.gate.summary()}")
    if outcome.calibration_from_cache:
        cache = calibration_cache or variant_path(model, precision, "calibration")
        err.print(f"  ranges reused from {cache} (same model, same image contents)")
    if outcome.over_budget:
        warn(f"over budget ({'; '.join(outcome.over_budget)}), built anyway (--force)")
    err.print(f"  wrote {outcome.engine} ({human_size(outcome.engine)}) and {outcome.sidecar.name}")
    err.print(f"next: {program()} predict {outcome.engine} IMAGES --device cuda  (a GPU {outcome.library} supports)")
