"""The deploy model in PyTorch on the CPU: the FP32 reference every other backend is compared against."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.model import PatchCoreDeploy
from patchcore_trt.outputs import Prediction
from patchcore_trt.runtime.base import Backend


class TorchBackend(Backend):
    name: ClassVar[str] = "torch"

    def __init__(
        self,
        artifact: Path,
        *,
        device: str = "cpu",
        trust_pickled_code: bool = False,
        map_at_input_size: bool = False,
        anomalib_version: str | None = None,
    ) -> None:
        super().__init__(artifact, device)
        self.spec = read_checkpoint(artifact, trust_pickled_code=trust_pickled_code, anomalib_version=anomalib_version)
        self.postprocess = self.spec.postprocess
        self.model = PatchCoreDeploy(self.spec, map_at_input_size=map_at_input_size).eval()

    @torch.inference_mode()
    def _infer(self, images: np.ndarray) -> Prediction:
        batch = torch.from_numpy(images)
        return self.model.prediction(*self.model.raw_scores(batch), input_size=batch.shape[-2:])
