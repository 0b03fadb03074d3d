"""Precision as inspectable ONNX graph transforms: FP16 backbone, INT8 Q/DQ backbone, FP32 search everywhere.

Modern TensorRT takes precision from the network itself (strongly typed networks; TensorRT 11 and TensorRT-RTX
have no FP16/INT8 builder flags), so each precision is an ONNX file a user can open in Netron:

- ``fp16``: the backbone's nodes run in FP16 between Cast nodes; preprocessing, feature pooling, the
  nearest-neighbour distance, the score and the normalisation stay FP32. In FP16 the distance
  ||x||^2 - 2 x.y + ||y||^2 cancels catastrophically (large norms, small differences), so it must not move.
- ``int8``: explicit symmetric Q/DQ (per-channel weights, per-tensor activations) on the backbone's Conv
  inputs only, from ``onnxruntime.quantization`` with ranges calibrated on normal images. The search stays FP32.

The backbone is found by the module scope the torch exporter records on every node
(``pkg.torch.onnx.name_scopes``), not by node names, which change between exporter versions.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from patchcore_trt.artifact import INPUT_NAME, METADATA_KEY, ArtifactMetadata, save_onnx, staged_onnx, write_onnx
from patchcore_trt.errors import MissingDependencyError, UserError
from patchcore_trt.files import sha256_of, write_text_atomic
from patchcore_trt.images import ImageError, collect_images, load_image

BACKBONE_SCOPE = "backbone"
SCOPE_KEY = "pkg.torch.onnx.name_scopes"
DEFAULT_CALIBRATION_IMAGES = 500
# Ops that both ONNX Runtime and TensorRT run in FP16 without changing meaning. A backbone node of any other
# type stays FP32 behind Casts, so an unusual backbone converts partially instead of wrongly.
FP16_OPS = frozenset(
    {"Conv", "Relu", "Add", "Mul", "Sub", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Clip", "Sigmoid"}
)
FP16_MAX = float(np.finfo(np.float16).max)
CACHE_FORMAT = 1


def backbone_nodes(model: onnx.ModelProto) -> list[int]:
    """Indices of the nodes the exporter placed inside the deploy model's ``backbone`` module."""
    found = []
    for index, node in enumerate(model.graph.node):
        scopes = next((prop.value for prop in node.metadata_props if prop.key == SCOPE_KEY), None)
        if scopes is not None:
            names = ast.literal_eval(scopes)
            if len(names) > 1 and names[1] == BACKBONE_SCOPE:
                found.append(index)
    if not any(model.graph.node[index].op_type == "Conv" for index in found):
        raise UserError(
            "the ONNX graph records no backbone module scope on its nodes; "
            "export it with 'patchcore-trt export' (torch's dynamo exporter records it)"
        )
    return found


def _float_values(graph: onnx.GraphProto) -> set[str]:
    infos = [*graph.input, *graph.value_info, *graph.output]
    floats = {info.name for info in infos if info.type.tensor_type.elem_type == TensorProto.FLOAT}
    return floats | {init.name for init in graph.initializer if init.data_type == TensorProto.FLOAT}


def _to_fp16(array: np.ndarray, name: str) -> onnx.TensorProto:
    if np.abs(array).max(initial=0) > FP16_MAX:
        raise UserError(f"weight {name} holds values beyond the FP16 range (|x| > {FP16_MAX:g}); use fp32 or int8")
    return numpy_helper.from_array(array.astype(np.float16), name)


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run the backbone in FP16 and everything else in FP32, with Cast nodes at the boundary.

    A float value ``v`` used inside the region is read as ``v.fp16``: produced there directly by a region
    node, cast from ``v`` at the region's entry, or stored as an FP16 initializer. A region output that
    anything outside reads is cast back to FP32 under its original name, so the rest of the graph is untouched.
    """
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    # Indices, not node objects: protobuf hands out a new wrapper object on every access.
    region = {index for index in backbone_nodes(model) if graph.node[index].op_type in FP16_OPS}
    floats = _float_values(graph)
    initializers = {init.name: init for init in graph.initializer}
    produced = {out for index in region for out in graph.node[index].output}
    read_outside = {name for index, node in enumerate(graph.node) if index not in region for name in node.input}
    read_outside |= {out.name for out in graph.output}

    def low(name: str) -> str:
        return f"{name}.fp16"

    nodes: list[onnx.NodeProto] = []
    entered: set[str] = set()
    for position, node in enumerate(graph.node):
        if position not in region:
            nodes.append(node)
            continue
        for index, name in enumerate(node.input):
            if name not in floats:
                continue
            if name not in produced and name not in entered:
                entered.add(name)
                if name in initializers:
                    graph.initializer.append(_to_fp16(numpy_helper.to_array(initializers[name]), low(name)))
                else:
                    nodes.append(helper.make_node("Cast", [name], [low(name)], to=TensorProto.FLOAT16, name=low(name)))
            node.input[index] = low(name)
        nodes.append(node)
        for index, name in enumerate(node.output):
            if name not in floats:
                continue
            node.output[index] = low(name)
            if name in read_outside:
                nodes.append(helper.make_node("Cast", [low(name)], [name], to=TensorProto.FLOAT, name=f"{name}.fp32"))
    unused = [init for init in graph.initializer if init.name in entered and init.name not in read_outside]
    for init in unused:
        graph.initializer.remove(init)
    del graph.node[:]
    graph.node.extend(nodes)
    stale = [info for info in graph.value_info if info.name in produced]
    for info in stale:
        graph.value_info.remove(info)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def _set_precision(model: onnx.ModelProto, source: Path, precision: str, **details: Any) -> None:
    """Mark ``model``'s metadata (copied from ``source``) as the ``precision`` variant."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = ArtifactMetadata.from_json(prop.value, source).with_precision(precision, **details).to_json()
            return
    raise UserError(
        f"{source}: not exported by patchcore-trt (no {METADATA_KEY!r} metadata); run 'patchcore-trt export'"
    )


def write_fp16_onnx(source: Path, output: Path) -> Path:
    """Write the mixed-precision FP16 variant of the FP32 ONNX ``source`` to ``output``."""
    model = convert_fp16(onnx.load(str(source)))
    fp16_nodes = sum(
        1 for node in model.graph.node if node.op_type != "Cast" and any(n.endswith(".fp16") for n in node.input)
    )
    _set_precision(model, source, "fp16", fp16={"region": BACKBONE_SCOPE, "nodes": fp16_nodes})
    save_onnx(model, Path(output))
    return Path(output)


# --- INT8 -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """How many images an INT8 transform was calibrated on, and whether the ranges came from the cache."""

    images: int
    from_cache: bool


def calibration_images(folder: Path, max_images: int = DEFAULT_CALIBRATION_IMAGES) -> list[Path]:
    """Up to ``max_images`` image files of ``folder``, evenly spread over its sorted listing."""
    if max_images < 1:
        raise UserError(f"--calibration-images must be at least 1, got {max_images}")
    if not Path(folder).is_dir():
        raise UserError(f"{folder}: the calibration folder does not exist (expected a folder of normal images)")
    paths, _ = collect_images([str(folder)])
    if not paths:
        raise UserError(f"{folder}: no images found for INT8 calibration")
    if len(paths) <= max_images:
        return paths
    picks = np.linspace(0, len(paths) - 1, max_images).round().astype(int)
    return [paths[index] for index in picks]


def _cache_key(source: Path, images: list[Path], method: str) -> dict[str, Any]:
    # Content hashes, not paths: the same images elsewhere (CI, another machine) reuse the cache.
    digest = hashlib.sha256()
    for path in images:
        digest.update(sha256_of(path).encode())
    return {
        "model_sha256": sha256_of(source),
        "images_sha256": digest.hexdigest(),
        "images": len(images),
        "method": method,
    }


def _cached_ranges(cache: Path | None, key: dict[str, Any]) -> dict[str, Any] | None:
    if cache is None or not cache.is_file():
        return None
    try:
        content = json.loads(cache.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{cache}: the calibration cache is unreadable ({exc}); delete it to recalibrate") from None
    if content.get("format") != CACHE_FORMAT or content.get("key") != key:
        return None
    return content["ranges"]


def _dequantize_for_convs_only(model: onnx.ModelProto) -> None:
    """Rewire non-Conv readers of a quantized activation (residual Adds) to its FP32 original.

    onnxruntime shares one Q/DQ pair among all readers of a tensor, so the skip connection would carry the
    INT8-rounded value, while Q/DQ belongs on the backbone convolutions' inputs only.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type == "Conv":
            continue
        for index, name in enumerate(node.input):
            dequantize = producers.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            quantize = producers.get(dequantize.input[0])
            if quantize is not None and quantize.op_type == "QuantizeLinear":
                node.input[index] = quantize.input[0]


@contextlib.contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    root = logging.getLogger()
    previous = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(previous)


class _ImageReader:
    """onnxruntime's CalibrationDataReader protocol over image files, one image per batch (any size)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.paths):
            return None
        path = self.paths[self.position]
        self.position += 1
        try:
            return {INPUT_NAME: load_image(path)[None]}
        except ImageError as exc:
            raise UserError(f"{path}: {exc}") from None

    def __len__(self) -> int:
        return len(self.paths)


def write_int8_onnx(
    source: Path,
    output: Path,
    images: list[Path],
    *,
    cache: Path | None = None,
) -> Calibration:
    """Insert symmetric INT8 Q/DQ on the backbone convolutions of ``source``, calibrated on ``images``.

    Args:
        source: The FP32 ONNX from ``patchcore-trt export``.
        output: Where the Q/DQ ONNX goes.
        images: Normal images (see ``calibration_images``).
        cache: JSON calibration cache; reused when it was made from the same model and the same image
            contents, rewritten otherwise.
    """
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime") from exc
    source, output = Path(source), Path(output)
    model = onnx.load(str(source), load_external_data=False)
    convs = [model.graph.node[i].name for i in backbone_nodes(model) if model.graph.node[i].op_type == "Conv"]
    key = _cache_key(source, images, "minmax")
    ranges = _cached_ranges(cache, key)
    with tempfile.TemporaryDirectory(prefix="patchcore-trt-int8-") as scratch:
        ort_cache = Path(scratch) / "ranges.json"
        if ranges is not None:
            ort_cache.write_text(json.dumps(ranges))
        # onnxruntime.quantization advises pre-processing through the root logger; our graphs are already optimised.
        with staged_onnx(output) as staged, _root_log_level(logging.ERROR):
            quantize_static(
                str(source),
                str(staged),
                calibration_data_reader=None if ranges is not None else _ImageReader(images),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["Conv"],
                nodes_to_quantize=convs,
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(ort_cache),
                extra_options={
                    # TensorRT's Q/DQ is symmetric: zero points must be 0.
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    # TensorRT wants FP32 biases (it folds the scales itself), not INT32 Q/DQ biases.
                    "QuantizeBias": False,
                    # Q/DQ on Conv inputs only, TensorRT's recommended placement; outputs stay FP32 into the
                    # residual Adds, and ReLUs are kept (dropping them is only exact for asymmetric UINT8).
                    "OpTypesToExcludeOutputQuantization": ["Conv"],
                    "QDQKeepRemovableActivations": True,
                },
            )
            quantized = onnx.load(str(staged))
            _dequantize_for_convs_only(quantized)
            _set_precision(
                quantized,
                source,
                "int8",
                int8={"region": BACKBONE_SCOPE, "convs": len(convs), "calibration": key, "library": "onnxruntime"},
            )
            write_onnx(quantized, staged)
        if ranges is None and cache is not None:
            content = {"format": CACHE_FORMAT, "key": key, "ranges": json.loads(ort_cache.read_text())}
            write_text_atomic(cache, json.dumps(content))
    return Calibration(images=len(images), from_cache=ranges is not None)
