"""The CUDA fast path behind the backend contract: gpu/executor.CudaPatchCore on one NVIDIA GPU.

Two modes: ``exact`` (the default) computes anomalib's FP32 results within the parity bar (IEEE FP32
backbone); ``fast`` runs the backbone in FP16 (|d score| about 1e-3). ``backbone_dtype`` and ``search`` override
a mode's choices.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import numpy as np

from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.errors import UserError
from patchcore_trt.gpu.executor import CudaPatchCore, require_cuda
from patchcore_trt.runtime.base import Backend, Prediction

MODES = {"exact": {"backbone_dtype": "fp32", "search": "exact"}, "fast": {"backbone_dtype": "fp16", "search": "exact"}}


class CudaBackend(Backend):
    """``predict`` on an NVIDIA GPU (see gpu/fast_model.py for what each setting computes)."""

    name: ClassVar[str] = "cuda"

    def __init__(
        self,
        artifact: Path,
        *,
        device: str = "cuda",
        mode: str = "exact",
        backbone_dtype: str | None = None,
        search: str | None = None,
        trust_pickled_code: bool = False,
        map_at_input_size: bool = False,
        graphs: bool = True,
        anomalib_version: str | None = None,
    ) -> None:
        super().__init__(artifact, device)
        if mode not in MODES:
            raise UserError(f"cuda: mode {mode!r} is not one of {', '.join(MODES)}")
        require_cuda()
        self.spec = read_checkpoint(artifact, trust_pickled_code=trust_pickled_code, anomalib_version=anomalib_version)
        self.postprocess = asdict(self.spec.postprocess)
        self.executor = CudaPatchCore(
            self.spec,
            backbone_dtype=backbone_dtype or MODES[mode]["backbone_dtype"],
            search=search or MODES[mode]["search"],
            device=device,
            graphs=graphs,
            map_at_input_size=map_at_input_size,
        )

    def _infer(self, images: np.ndarray) -> Prediction:
        return self.executor.run_host(images).prediction(self.spec.postprocess)

    def predict_uint8(self, images: np.ndarray) -> Prediction:
        """uint8 [N, H, W, 3] images as decoded, without a float32 copy on the host (4x fewer bytes to upload)."""
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise UserError(f"cuda: predict_uint8 takes a uint8 numpy array, got {type(images).__name__}")
        return self.executor.run_host(np.ascontiguousarray(images)).prediction(self.spec.postprocess)

    def close(self) -> None:
        self.executor.close()
