"""The deploy model in PyTorch on the CPU: the FP32 reference every other backend is compared against."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.model import PatchCoreDeploy
from patchcore_trt.runtime.base import Backend, Capabilities, Prediction


class TorchBackend(Backend):
    name: ClassVar[str] = "torch"
    capabilities: ClassVar[Capabilities] = Capabilities(artifact_suffixes=(".ckpt",))

    def __init__(
        self, artifact: Path, *, device: str = "cpu", trust_pickled_code: bool = False, map_at_input_size: bool = False
    ) -> None:
        super().__init__(artifact)
        self.spec = read_checkpoint(artifact, trust_pickled_code=trust_pickled_code)
        self.model = PatchCoreDeploy(self.spec, map_at_input_size=map_at_input_size).eval()

    @torch.inference_mode()
    def _infer(self, images: np.ndarray) -> Prediction:
        out = self.model(torch.from_numpy(images))
        return Prediction(
            pred_score=out.pred_score.numpy(),
            pred_label=out.pred_label.numpy(),
            anomaly_map=out.anomaly_map.numpy(),
            pred_mask=out.pred_mask.numpy(),
        )
