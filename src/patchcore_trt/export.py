"""Deploy model -> ONNX with dynamic batch, height and width, metadata inside, and a self-check.

The graph takes float32 RGB images in [0, 1] of any size and resizes them to the model resolution itself,
so callers never need to know it. Everything a runtime needs (input spec, thresholds, versions, the source
checkpoint's hash) is stored in the ONNX ``metadata_props``: no side file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import patchcore_trt
from patchcore_trt.errors import MissingDependencyError, UserError
from patchcore_trt.files import atomic_path
from patchcore_trt.model import OUTPUT_NAMES, PatchCoreDeploy
from patchcore_trt.spec import PatchCoreSpec

INPUT_NAME = "image"
METADATA_KEY = "patchcore_trt"
DEFAULT_OPSET = 18
# protobuf cannot hold a single message over 2 GiB; larger banks go to an external data file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
MAX_DIM = 8192
# The self-check: batch sizes x input sizes run through ONNX Runtime and the deploy model.
CHECK_BATCHES = (1, 2, 3)
CHECK_SIZES = ((256, 256), (300, 200), (180, 333))
CHECK_SCORE_TOL = 1e-5
CHECK_MAP_TOL = 1e-4


@dataclass(frozen=True)
class ExportCheck:
    batch: int
    height: int
    width: int
    max_score_error: float
    max_map_error: float
    labels_equal: bool


def build_metadata(spec: PatchCoreSpec, *, map_at_input_size: bool, precision: str = "fp32") -> dict[str, Any]:
    """The JSON stored in the ONNX file; runtimes read thresholds and the input spec from it."""
    return {
        "format": 1,
        "producer": f"patchcore-trt {patchcore_trt.__version__}",
        "precision": precision,
        "input": {"name": INPUT_NAME, "layout": "NCHW", "channels": "RGB", "dtype": "float32", "range": [0.0, 1.0]},
        "outputs": list(OUTPUT_NAMES),
        "model_size": list(spec.preprocess.model_size),
        "map_at_input_size": map_at_input_size,
        "backbone": spec.backbone,
        "layers": list(spec.layers),
        "bank_size": spec.bank_size,
        "embedding_dim": spec.embedding_dim,
        "num_neighbors": spec.num_neighbors,
        "preprocess": asdict(spec.preprocess),
        "postprocess": asdict(spec.postprocess),
        "source_checkpoint": {"name": spec.source_name, "sha256": spec.source_sha256},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
    }


def read_onnx_metadata(path: Path | str) -> dict[str, Any]:
    """The patchcore-trt metadata of an exported ONNX file (without loading external weights)."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends with no common base
        raise UserError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise UserError(f"{path}: not exported by patchcore-trt (no {METADATA_KEY!r} metadata); run 'patchcore-trt export'")


def _torch_export(model: PatchCoreDeploy, opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height", min=32, max=MAX_DIM)
    width = torch.export.Dim("width", min=32, max=MAX_DIM)
    example = torch.rand(2, 3, 192, 224)
    # The exporter narrates every pass on stdout; keep the CLI's output to our own progress lines.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
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
    return program.model_proto


def save_onnx(proto: onnx.ModelProto, path: Path) -> None:
    """Write ``proto`` atomically; protos near protobuf's 2 GiB limit keep their tensors in PATH.data."""
    external = proto.ByteSize() > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    with atomic_path(path) as tmp:
        if external:
            # External data is written beside the model under a fixed name, then the model is renamed in.
            onnx.save_model(
                proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name
            )
            (tmp.parent / data_name).replace(path.parent / data_name)
        else:
            onnx.save_model(proto, str(tmp))


def ort_cpu_session(path: Path, config: dict[str, str] | None = None):
    """A quiet ONNX Runtime CPU session (with optional session config entries), or an install hint."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnxruntime") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(path: Path, model: PatchCoreDeploy, *, seed: int = 0) -> list[ExportCheck]:
    """onnx.checker, shape inference, then ONNX Runtime against the deploy model at 3 batches x 3 sizes."""
    onnx.checker.check_model(str(path), full_check=True)
    session = ort_cpu_session(path)
    generator = torch.Generator().manual_seed(seed)
    checks = []
    for batch, (height, width) in zip(CHECK_BATCHES, CHECK_SIZES, strict=True):
        images = torch.rand(batch, 3, height, width, generator=generator)
        with torch.inference_mode():
            expected = model(images)
        got = dict(zip(OUTPUT_NAMES, session.run(None, {INPUT_NAME: images.numpy()}), strict=True))
        check = ExportCheck(
            batch=batch,
            height=height,
            width=width,
            max_score_error=float(np.abs(got["pred_score"] - expected.pred_score.numpy()).max()),
            max_map_error=float(np.abs(got["anomaly_map"] - expected.anomaly_map.numpy()).max()),
            labels_equal=bool((got["pred_label"] == expected.pred_label.numpy()).all()),
        )
        checks.append(check)
        if check.max_score_error > CHECK_SCORE_TOL or check.max_map_error > CHECK_MAP_TOL or not check.labels_equal:
            raise RuntimeError(f"exported graph disagrees with the deploy model: {check}")
    return checks


def export_onnx(
    spec: PatchCoreSpec,
    path: Path | str,
    *,
    map_at_input_size: bool = False,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
) -> tuple[Path, list[ExportCheck]]:
    """Export ``spec`` to ONNX at ``path``; return the path and the self-check results (empty if not verified)."""
    if opset < 17:
        raise UserError(f"opset {opset} is too old; patchcore-trt exports opset 17 or newer")
    path = Path(path)
    model = PatchCoreDeploy(spec, map_at_input_size=map_at_input_size).eval()
    proto = _torch_export(model, opset)
    proto = (
        onnx.shape_inference.infer_shapes(proto, data_prop=True)
        if proto.ByteSize() < EXTERNAL_DATA_THRESHOLD
        else proto
    )
    metadata = build_metadata(spec, map_at_input_size=map_at_input_size)
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(metadata)})
    proto.producer_name = "patchcore-trt"
    proto.producer_version = patchcore_trt.__version__
    proto.doc_string = f"anomalib PatchCore ({spec.backbone}, bank {spec.bank_size}) from {spec.source_name}"
    save_onnx(proto, path)
    try:
        checks = verify_onnx(path, model) if verify else []
    except (RuntimeError, onnx.checker.ValidationError) as exc:
        # A graph that failed its own check must not be left where a deployment would pick it up.
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".data").unlink(missing_ok=True)
        raise UserError(f"{path}: the exported graph failed its self-check and was removed ({exc})") from None
    return path, checks
