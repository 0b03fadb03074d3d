"""``patchcore-trt build``: FP32 ONNX -> (FP16/INT8 graph transform -> accuracy gate) -> TensorRT engine."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from patchcore_trt.cli import app
from patchcore_trt.cli._common import err, human_size, step
from patchcore_trt.errors import UserError


def _artifact(model: Path, precision: str, suffix: str) -> Path:
    """MODEL.onnx -> MODEL.<precision><suffix> beside it (Path.with_suffix would eat the precision)."""
    return model.with_name(f"{model.stem}.{precision}{suffix}")


def _gate(model: Path, candidate: Path, precision: str, eval_data: Path, force: bool) -> dict:
    from patchcore_trt.accuracy import BUDGETS, evaluate, labelled_folder, over_budget

    with step(f"accuracy gate: {candidate.name} vs {model.name} in ONNX Runtime (CPU) on {eval_data}"):
        figures = evaluate(model, candidate, labelled_folder(eval_data), precision)
    broken = over_budget(figures, BUDGETS[precision])
    err.print(f"  {figures.summary()}", highlight=False)
    if broken and not force:
        raise UserError(
            f"the {precision} graph is over its accuracy budget ({'; '.join(broken)}); --force builds it anyway"
        )
    if broken:
        err.print(f"[yellow]warning:[/] over budget ({'; '.join(broken)}), building anyway (--force)")
    return {
        "figures": {**asdict(figures), "image_auroc_drop_points": figures.image_auroc_drop_points},
        "over_budget": broken,
    }


@app.command("build")
def build(
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
    from patchcore_trt.engine import Profile, Shape, build_engine, check_build, default_profile
    from patchcore_trt.export import read_onnx_metadata
    from patchcore_trt.precision import PRECISIONS, write_fp16_onnx, write_int8_onnx
    from patchcore_trt.precision import calibration_images as pick_images

    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    metadata = read_onnx_metadata(model)
    if metadata.get("precision", "fp32") != "fp32":
        raise UserError(f"{model}: this is a {metadata['precision']} graph; build from the FP32 export")
    profile = (
        Profile(*(Shape.parse(text) for text in shapes)) if shapes else default_profile(tuple(metadata["model_size"]))
    )
    trt = check_build(model, profile, workspace_gib=workspace, timing_cache=timing_cache)
    if precision == "int8" and calibration is None:
        raise UserError("--precision int8 needs --calibration FOLDER (normal images, up to --calibration-images)")
    if precision != "fp32" and eval_data is None:
        raise UserError(
            f"--precision {precision} needs --eval-data FOLDER for its accuracy gate "
            "(good/ and defect subfolders, as MVTec AD or the demo's generated data set)"
        )
    source, gate = model, None
    if precision != "fp32":
        source = _artifact(model, precision, ".onnx")
        if precision == "fp16":
            with step(f"writing {source.name} (backbone FP16, search FP32)"):
                write_fp16_onnx(model, source)
        else:
            images = pick_images(calibration, calibration_images)
            cache = calibration_cache or _artifact(model, precision, ".calib.json")
            with step(f"writing {source.name} (backbone convs INT8 Q/DQ, {len(images)} calibration images)"):
                result = write_int8_onnx(model, source, images, cache=cache)
            if result.from_cache:
                err.print(f"  ranges reused from {cache} (same model, same image contents)", highlight=False)
        gate = _gate(model, source, precision, eval_data, force)
    engine = _artifact(model, precision, ".engine")
    with step(f"building {engine.name} with {trt.library} {trt.version}, profile {profile}"):
        result = build_engine(
            source,
            engine,
            profile,
            workspace_gib=workspace,
            timing_cache=timing_cache,
            extra_metadata=None if gate is None else {"accuracy_gate": gate},
        )
    err.print(f"  wrote {result.engine} ({human_size(result.engine)}) and {result.sidecar.name}", highlight=False)
    err.print(
        f"next: patchcore-trt predict {result.engine} IMAGES --device cuda  (an NVIDIA GPU {trt.library} supports)"
    )
