"""patchcore-trt: anomalib PatchCore checkpoints to fast, verified ONNX and TensorRT inference."""

from __future__ import annotations

__version__ = "0.1.0"
