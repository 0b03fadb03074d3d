"""anomalib's own outputs on a checkpoint: the reference every backend is compared against.

Two anomalib paths exist and they differ on purpose:
- ``AnomalibModule.forward`` (what anomalib exports and what patchcore-trt reproduces): the pre-processor's
  *exportable* transform, which resizes without antialiasing;
- the Lightning predict path (``Engine.predict``), which resizes with antialiasing.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from patchcore_trt.errors import MissingDependencyError
from patchcore_trt.model import DeployOutput


class AnomalibReference:
    """An anomalib PatchCore module loaded from a checkpoint, run on CPU in float32."""

    def __init__(self, checkpoint: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from anomalib.models import Patchcore
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise MissingDependencyError("anomalib", "anomalib") from exc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = Patchcore.load_from_checkpoint(str(checkpoint), map_location="cpu", pre_trained=False)
        self.module.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> DeployOutput:
        """``AnomalibModule.forward``: pre-processor (export transform) -> model -> post-processor."""
        out = self.module(images)
        return DeployOutput(out.pred_score, out.pred_label, out.anomaly_map, out.pred_mask)

    @torch.no_grad()
    def lightning_predict(self, images: torch.Tensor) -> DeployOutput:
        """What ``Engine.predict`` computes: the training transform (antialiased resize), model, post-processor."""
        module = self.module
        transformed = module.pre_processor.transform(images)
        out = module.post_processor(module.model(transformed))
        return DeployOutput(out.pred_score, out.pred_label, out.anomaly_map, out.pred_mask)
