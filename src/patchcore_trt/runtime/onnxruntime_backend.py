"""ONNX Runtime backend for exported ``.onnx`` files (FP32, FP16 or INT8 variants), on the CPU or a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from patchcore_trt.artifact import INPUT_NAME, OUTPUT_NAMES, check_graph_io, ort_session, read_onnx_metadata
from patchcore_trt.outputs import Prediction
from patchcore_trt.runtime.base import Backend


class OnnxRuntimeBackend(Backend):
    """``qdq_fusion=False`` runs each QuantizeLinear/DequantizeLinear pair as written instead of ONNX Runtime's own
    x86 INT8 kernels, whose saturation differs from TensorRT's (the accuracy gate uses this)."""

    name: ClassVar[str] = "onnxruntime"

    def __init__(self, artifact: Path, *, device: str = "cpu", threads: int = 0, qdq_fusion: bool = True) -> None:
        super().__init__(artifact, device)
        self.postprocess = read_onnx_metadata(artifact).postprocess
        # Idle intra-op threads sleep instead of spinning: predict decodes the next images on the same cores while
        # a batch runs, and spinning workers starved those decoders (11 against 15 img/s end to end on 2 cores).
        config = {"session.intra_op.allow_spinning": "0"}
        if not qdq_fusion:
            config["session.disable_quant_qdq"] = "1"
        self.session = ort_session(artifact, device=device, threads=threads, config=config)
        inputs, outputs = (
            {t.name: None if t.shape is None else len(t.shape) for t in tensors}
            for tensors in (self.session.get_inputs(), self.session.get_outputs())
        )
        check_graph_io(artifact, inputs, outputs)

    def _infer(self, images: np.ndarray) -> Prediction:
        return Prediction.from_outputs(self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images}))
