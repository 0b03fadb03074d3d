"""OpenVINO backend for exported ``.onnx`` files: anomalib's default deployment runtime, for comparison."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from patchcore_trt.artifact import INPUT_NAME, OUTPUT_NAMES, check_graph_io, read_onnx_metadata
from patchcore_trt.errors import MissingDependencyError, UserError
from patchcore_trt.outputs import Prediction
from patchcore_trt.runtime.base import Backend


class OpenVinoBackend(Backend):
    name: ClassVar[str] = "openvino"

    def __init__(self, artifact: Path, *, device: str = "cpu") -> None:
        super().__init__(artifact, device)
        try:
            import openvino as ov
        except ImportError as exc:
            raise MissingDependencyError("openvino", "openvino") from exc
        self.postprocess = read_onnx_metadata(artifact).postprocess
        core = ov.Core()
        try:
            # f32 inference precision: OpenVINO's CPU plugin otherwise may pick bf16 where the CPU has it.
            self.compiled = core.compile_model(
                str(artifact), device.upper(), {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
            )
        except RuntimeError as exc:
            raise UserError(f"openvino could not compile {artifact}: {str(exc).splitlines()[0]}") from None
        check_graph_io(artifact, _tensors(self.compiled.inputs), _tensors(self.compiled.outputs))
        self.request = self.compiled.create_infer_request()

    def _infer(self, images: np.ndarray) -> Prediction:
        results = self.request.infer({INPUT_NAME: images})
        return Prediction.from_outputs([results[self.compiled.output(name)] for name in OUTPUT_NAMES])


def _tensors(ports: list) -> dict[str, int | None]:
    """A compiled model's ports by name, with their ranks (None where dynamic)."""
    tensors = {}
    for port in ports:
        rank = port.get_partial_shape().rank
        tensors[port.get_any_name()] = rank.get_length() if rank.is_static else None
    return tensors
