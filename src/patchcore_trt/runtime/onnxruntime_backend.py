"""ONNX Runtime backend for exported ``.onnx`` files (CPU by default; CUDA when onnxruntime-gpu is present)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from patchcore_trt.errors import MissingDependencyError, UserError
from patchcore_trt.export import INPUT_NAME, read_onnx_metadata
from patchcore_trt.model import OUTPUT_NAMES
from patchcore_trt.runtime.base import Backend, Capabilities, Prediction, prediction_from_outputs

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class OnnxRuntimeBackend(Backend):
    name: ClassVar[str] = "onnxruntime"
    capabilities: ClassVar[Capabilities] = Capabilities(
        artifact_suffixes=(".onnx",), precisions=("fp32", "fp16", "int8"), devices=("cpu", "cuda")
    )

    def __init__(self, artifact: Path, *, device: str = "cpu", threads: int = 0) -> None:
        super().__init__(artifact)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingDependencyError("onnxruntime", "onnxruntime") from exc
        if PROVIDERS[device] not in ort.get_available_providers():
            raise UserError(f"onnxruntime: {PROVIDERS[device]} is not available in this onnxruntime build")
        self.metadata = read_onnx_metadata(artifact)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(artifact), options, providers=[PROVIDERS[device]])

    def _infer(self, images: np.ndarray) -> Prediction:
        outputs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return prediction_from_outputs(dict(zip(OUTPUT_NAMES, outputs, strict=True)))
