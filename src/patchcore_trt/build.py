"""The gated build as a library call: FP32 ONNX -> (FP16 or INT8 graph -> accuracy gate) -> TensorRT engine.

Everything that can fail fast is checked before the first long step (the graph's metadata, the profile against
the graph, TensorRT, the calibration and evaluation folders), so a mistake never leaves a half-made variant.
Variants are written beside the export (artifact.variant_path): ``MODEL.fp16.onnx``, ``MODEL.int8.onnx`` with
``MODEL.int8.calib.json``, and ``MODEL.<precision>.engine`` with its sidecar.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from patchcore_trt.accuracy import BUDGETS, GateFigures, LabelledSet, evaluate, labelled_folder, over_budget
from patchcore_trt.artifact import PRECISIONS, read_onnx_metadata, variant_path
from patchcore_trt.engine import RTX_DEFAULT_TARGETS, Profile, check_build, default_profile, run_build
from patchcore_trt.errors import UserError
from patchcore_trt.images import collect_images
from patchcore_trt.precision import DEFAULT_CALIBRATION_IMAGES, calibration_images, write_fp16_onnx, write_int8_onnx
from patchcore_trt.steps import Step, quiet

RTX_NOTICE = (
    f"full TensorRT is not installed: building with TensorRT-RTX, whose engines run on GPUs of compute capability "
    f"{RTX_DEFAULT_TARGETS} only (not Jetson Orin 8.7, T4 7.5, H100/H200 9.0). For those, build with full TensorRT "
    "10 or newer: the NGC container nvcr.io/nvidia/tensorrt, or a Jetson's JetPack."
)


class GateRefusedError(UserError):
    """The reduced-precision graph is over its accuracy budget; ``figures`` holds what was measured."""

    def __init__(self, figures: GateFigures, broken: list[str]) -> None:
        super().__init__(
            f"the {figures.precision} graph is over its accuracy budget ({'; '.join(broken)}); --force builds it anyway"
        )
        self.figures = figures
        self.broken = broken


@dataclass(frozen=True)
class BuildOutcome:
    """What a build made: the engine and sidecar, the graph they came from, and the gate's verdict."""

    engine: Path
    sidecar: Path
    graph: Path
    library: str
    version: str
    gate: GateFigures | None = None
    over_budget: tuple[str, ...] = ()
    calibration_from_cache: bool = False


def build(
    onnx_path: Path | str,
    precision: str = "fp32",
    *,
    profile: Profile | None = None,
    workspace_gib: float | None = None,
    timing_cache: Path | None = None,
    calibration: Path | None = None,
    max_calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    calibration_cache: Path | None = None,
    eval_data: Path | None = None,
    force: bool = False,
    step: Step = quiet,
    notice: Callable[[str], None] = lambda text: None,
) -> BuildOutcome:
    """Build ``MODEL.<precision>.engine`` from the FP32 export ``onnx_path``.

    Args:
        precision: fp32, fp16 (backbone in FP16) or int8 (backbone convolutions Q/DQ).
        profile: Input shapes; default: half to twice the model resolution, batch 1 to 32.
        calibration: int8: a folder of normal images; at most ``max_calibration_images`` are used.
        calibration_cache: int8: the range cache (default MODEL.int8.calib.json).
        eval_data: fp16/int8: the folder the accuracy gate compares on (MVTec layout, or plain images). fp16
            without one gates on generated images: drift and labels against FP32, no AUROC.
        force: Build even if the gate finds the graph over its budget.
        step: ``step(title)`` wraps each long step (the CLI logs start, end and time).
        notice: told what the user should know before the long steps (the TensorRT-RTX limits).

    Raises:
        GateRefusedError: the graph is over its accuracy budget and ``force`` is off.
        UserError: anything else the user can fix, before any file is written where it can be.
    """
    onnx_path = Path(onnx_path)
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    metadata = read_onnx_metadata(onnx_path)
    if metadata.precision != "fp32":
        raise UserError(f"{onnx_path}: this is a {metadata.precision} graph; build from the FP32 export")
    if precision == "int8" and (calibration is None or eval_data is None):
        missing = "--calibration FOLDER (normal images)" if calibration is None else "--eval-data FOLDER"
        raise UserError(
            f"--precision int8 needs {missing}: INT8 is calibrated on normal images and judged on a labelled "
            "folder (good/ and defect subfolders, as MVTec AD or the demo's generated data set)"
        )
    plan = check_build(
        onnx_path,
        profile or default_profile(metadata.model_size),
        workspace_gib=workspace_gib,
        timing_cache=timing_cache,
    )
    data = labelled_folder(eval_data) if eval_data is not None and precision != "fp32" else None
    picked = calibration_images(calibration, max_calibration_images) if calibration and precision != "fp32" else []
    if plan.trt.library == "tensorrt_rtx":  # told once every option is known to be good, not before a refusal
        notice(RTX_NOTICE)
    engine = variant_path(onnx_path, precision, "engine")
    graph, figures, broken, from_cache, extra = onnx_path, None, [], False, None
    if precision != "fp32":
        graph = variant_path(onnx_path, precision, "onnx")
        if precision == "fp16":
            with step(f"writing {graph.name} (backbone FP16, search FP32)"):
                write_fp16_onnx(onnx_path, graph)
        else:
            cache = calibration_cache or variant_path(onnx_path, precision, "calibration")
            with step(f"writing {graph.name} (backbone convs INT8 Q/DQ, {len(picked)} calibration images)"):
                from_cache = write_int8_onnx(onnx_path, graph, picked, cache=cache).from_cache
        figures = _gate(onnx_path, graph, precision, data, metadata.model_size, eval_data, step)
        broken = over_budget(figures, BUDGETS[precision])
        if broken and not force:
            raise GateRefusedError(figures, broken)
        gate = {**asdict(figures), "image_auroc_drop_points": figures.image_auroc_drop_points}
        extra = {"accuracy_gate": {"figures": gate, "over_budget": broken}}
    with step(f"building {engine.name} with {plan.trt.library} {plan.trt.version}, profile {plan.profile}"):
        result = run_build(plan, graph, engine, read_onnx_metadata(graph), extra)
    return BuildOutcome(
        result.engine, result.sidecar, graph, plan.trt.library, plan.trt.version, figures, tuple(broken), from_cache
    )


GENERATED_IMAGES = 16


def _gate(
    fp32: Path,
    graph: Path,
    precision: str,
    data: LabelledSet | None,
    model_size: tuple[int, int],
    eval_data: Path | None,
    step: Step,
) -> GateFigures:
    """The accuracy gate on ``data``, or without it on generated images (unlabelled: drift and labels only)."""
    if data is not None:
        with step(f"accuracy gate: {graph.name} vs {fp32.name} in ONNX Runtime (CPU) on {eval_data}"):
            return evaluate(fp32, graph, data, precision)
    from patchcore_trt.synthetic_data import make_synthetic_dataset

    half = GENERATED_IMAGES // 2
    with tempfile.TemporaryDirectory(prefix="patchcore-trt-gate-") as scratch:
        folder = make_synthetic_dataset(Path(scratch), n_train=0, n_test_good=half, n_test_defect=half, size=model_size)
        images = collect_images([str(folder.test_good), str(folder.test_defect)])[0]
        title = f"{len(images)} generated images (no --eval-data: drift and labels against FP32, no AUROC)"
        with step(f"accuracy gate: {graph.name} vs {fp32.name} in ONNX Runtime (CPU) on {title}"):
            return evaluate(fp32, graph, LabelledSet(images, None, [None] * len(images)), precision)
