"""Deploy model -> ONNX with dynamic batch, height and width, metadata inside, and a self-check.

The graph takes float32 RGB images in [0, 1] of any size and resizes them to the model resolution itself,
so callers never need to know it. Everything a runtime needs (the transform the graph applies, thresholds,
versions, the source checkpoint's hash) is stored in the ONNX ``metadata_props`` (artifact.ArtifactMetadata).

The graph is written to a private folder, checked there (onnx.checker, then ONNX Runtime against the deploy
model at three batch sizes and input sizes) and only then renamed to its final name.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import onnxruntime  # noqa: F401 - the self-check needs it: fail before a long export, not after
import torch

import patchcore_trt
from patchcore_trt.artifact import (
    EXTERNAL_DATA_THRESHOLD,
    INPUT_NAME,
    MAX_BATCH,
    MAX_SIDE,
    METADATA_KEY,
    MIN_SIDE,
    OUTPUT_NAMES,
    ArtifactMetadata,
    check_opset,
    staged_onnx,
    write_onnx,
)
from patchcore_trt.compare import PARITY_BAR, Parity, compare
from patchcore_trt.errors import UserError
from patchcore_trt.model import PatchCoreDeploy
from patchcore_trt.runtime import Prediction, open_backend
from patchcore_trt.spec import PatchCoreSpec

DEFAULT_OPSET = 18
# The self-check: batch sizes x input sizes run through ONNX Runtime and the deploy model.
CHECK_SHAPES = ((1, 256, 256), (2, 300, 200), (3, 180, 333))


@dataclass(frozen=True)
class ShapeCheck:
    """The self-check at one input shape."""

    batch: int
    height: int
    width: int
    parity: Parity


def graph_transform(spec: PatchCoreSpec) -> dict[str, object]:
    """The pre-processing the exported graph applies (anomalib's export transform: no antialiasing)."""
    return {**asdict(spec.preprocess), "antialias": False}


def build_metadata(spec: PatchCoreSpec, *, map_at_input_size: bool) -> ArtifactMetadata:
    """What the exported graph computes; runtimes read thresholds and the input spec from it."""
    return ArtifactMetadata(
        precision="fp32",
        model_size=spec.preprocess.model_size,
        map_at_input_size=map_at_input_size,
        backbone=spec.backbone,
        layers=spec.layers,
        bank_size=spec.bank_size,
        embedding_dim=spec.embedding_dim,
        num_neighbors=spec.num_neighbors,
        transform=graph_transform(spec),
        postprocess=spec.postprocess,
        source_checkpoint={"name": spec.source_name, "sha256": spec.source_sha256},
        producer=f"patchcore-trt {patchcore_trt.__version__}",
        versions={"torch": torch.__version__, "onnx": onnx.__version__},
        details={"training_transform": asdict(spec.preprocess)},
        written_by={"release": spec.written_by, "evidence": spec.written_by_evidence} if spec.written_by else {},
    )


def _torch_export(model: PatchCoreDeploy, opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    height = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    example = torch.rand(2, 3, 192, 224)
    # The exporter narrates every pass on stdout and stderr; keep the CLI's output to our own progress lines.
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes={"images": {0: batch, 2: height, 3: width}},
        )
    proto = program.model_proto
    written = max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))
    if written != opset:
        raise UserError(f"torch's exporter could not write opset {opset} (it wrote {written}); use --opset {written}")
    return proto


def self_check(path: Path, model: PatchCoreDeploy, *, seed: int = 0) -> list[ShapeCheck]:
    """onnx.checker, then ONNX Runtime (through the backend contract) against the deploy model at three shapes."""
    onnx.checker.check_model(str(path), full_check=True)
    generator = torch.Generator().manual_seed(seed)
    checks = []
    with open_backend(path, "onnxruntime") as backend:
        for batch, height, width in CHECK_SHAPES:
            images = torch.rand(batch, 3, height, width, generator=generator)
            with torch.inference_mode():
                expected = Prediction.from_outputs(model(images))
            figures = compare(backend.predict(images.numpy()), expected, threshold=backend.image_threshold)
            checks.append(ShapeCheck(batch, height, width, figures))
            if not figures.within(PARITY_BAR):
                raise RuntimeError(
                    f"ONNX Runtime disagrees with the deploy model at {[batch, 3, height, width]}: {figures}"
                )
    return checks


def export_onnx(
    spec: PatchCoreSpec,
    path: Path | str,
    *,
    map_at_input_size: bool = False,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> tuple[Path, list[ShapeCheck]]:
    """Export ``spec`` to ONNX at ``path``; return the path and the self-check results (empty if not checked)."""
    check_opset(opset)
    path = Path(path)
    model = PatchCoreDeploy(spec, map_at_input_size=map_at_input_size).eval()
    proto = _torch_export(model, opset)
    if proto.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    onnx.helper.set_model_props(
        proto, {METADATA_KEY: build_metadata(spec, map_at_input_size=map_at_input_size).to_json()}
    )
    proto.producer_name = "patchcore-trt"
    proto.producer_version = patchcore_trt.__version__
    proto.doc_string = f"anomalib PatchCore ({spec.backbone}, bank {spec.bank_size}) from {spec.source_name}"
    with staged_onnx(path) as staged:
        write_onnx(proto, staged)
        try:
            checks = self_check(staged, model) if check else []
        except (RuntimeError, onnx.checker.ValidationError) as exc:
            # A graph that failed its own check never takes the name a deployment would pick it up by.
            raise UserError(f"{path}: the exported graph failed its self-check and was not written ({exc})") from None
    return path, checks
