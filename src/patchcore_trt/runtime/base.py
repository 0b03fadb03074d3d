"""The one backend contract: every runtime takes the same images and returns the same Prediction.

Public methods live here and check inputs and outputs; a backend implements only ``_infer``. A contract
test runs every installed backend through the same checks, so backends cannot drift apart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from patchcore_trt.errors import UserError


@dataclass(frozen=True)
class Prediction:
    """Host (numpy) results for a batch of N images.

    Attributes:
        pred_score: [N] float32, anomalib's normalised score in [0, 1].
        pred_label: [N] bool, True = anomalous.
        anomaly_map: [N, 1, h, w] float32, normalised.
        pred_mask: [N, 1, h, w] bool.
    """

    pred_score: np.ndarray
    pred_label: np.ndarray
    anomaly_map: np.ndarray
    pred_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.pred_score.shape[0])

    def item(self, index: int) -> Prediction:
        """The prediction of one image, as a batch of one."""
        part = slice(index, index + 1)
        return Prediction(self.pred_score[part], self.pred_label[part], self.anomaly_map[part], self.pred_mask[part])

    @staticmethod
    def concat(parts: list[Prediction]) -> Prediction:
        return Prediction(*(np.concatenate([getattr(p, f) for p in parts]) for f in Prediction.__dataclass_fields__))


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports, so the CLI can reject an option up front instead of rewriting it."""

    artifact_suffixes: tuple[str, ...]
    precisions: tuple[str, ...] = ("fp32",)
    devices: tuple[str, ...] = ("cpu",)
    dynamic_batch: bool = True
    dynamic_size: bool = True


class Backend(ABC):
    """A loaded model that turns float32 RGB images in [0, 1], [N, 3, H, W], into a Prediction."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def __init__(self, artifact: Path) -> None:
        self.artifact = Path(artifact)

    def predict(self, images: np.ndarray) -> Prediction:
        """Run the model on a batch. Raises UserError for input the model cannot take."""
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1] != 3:
            shape = getattr(images, "shape", None)
            raise UserError(f"{self.name}: expected images as a [N, 3, H, W] array, got shape {shape}")
        if images.shape[0] == 0:
            raise UserError(f"{self.name}: the batch is empty")
        prediction = self._infer(np.ascontiguousarray(images, dtype=np.float32))
        n = images.shape[0]
        if prediction.pred_score.shape != (n,) or prediction.anomaly_map.ndim != 4 or len(prediction.anomaly_map) != n:
            raise RuntimeError(f"{self.name} returned malformed outputs for a batch of {n}")
        return prediction

    @abstractmethod
    def _infer(self, images: np.ndarray) -> Prediction:
        """Backend-specific inference on a validated, contiguous float32 batch."""

    def close(self) -> None:
        """Release device memory and sessions (optional)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prediction_from_outputs(outputs: dict[str, np.ndarray]) -> Prediction:
    """Build a Prediction from named graph outputs (ONNX Runtime, OpenVINO and TensorRT all return these)."""
    return Prediction(
        pred_score=np.asarray(outputs["pred_score"], dtype=np.float32).reshape(-1),
        pred_label=np.asarray(outputs["pred_label"]).astype(bool).reshape(-1),
        anomaly_map=np.asarray(outputs["anomaly_map"], dtype=np.float32),
        pred_mask=np.asarray(outputs["pred_mask"]).astype(bool),
    )
