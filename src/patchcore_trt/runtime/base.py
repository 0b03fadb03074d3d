"""The one backend contract: every runtime takes the same images and returns the same Prediction.

Public methods live here and check inputs and outputs; a backend implements only ``_infer``. A contract
test runs every registered backend through the same checks, so backends cannot drift apart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from patchcore_trt.artifact import MIN_SIDE
from patchcore_trt.errors import UserError

# Float images a hair outside [0, 1] come from resampling; anything further is a scale mistake (0..255).
_RANGE_SLACK = 1e-3


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

    def __getitem__(self, index: int | slice) -> Prediction:
        """The predictions of some images, still a batch (``prediction[i]`` is a batch of one)."""
        part = slice(index, index + 1) if isinstance(index, int) else index
        return Prediction(self.pred_score[part], self.pred_label[part], self.anomaly_map[part], self.pred_mask[part])

    @classmethod
    def from_outputs(cls, outputs: Sequence[Any]) -> Prediction:
        """From (score, label, map, mask) in the graph's output order: numpy arrays or torch tensors on any device."""
        score, label, anomaly_map, mask = (_to_numpy(value) for value in outputs)
        anomaly_map = anomaly_map.astype(np.float32, copy=False)
        batch = len(anomaly_map)
        return cls(
            pred_score=score.astype(np.float32, copy=False).reshape(batch),
            pred_label=label.astype(bool, copy=False).reshape(batch),
            anomaly_map=anomaly_map.reshape(batch, 1, *anomaly_map.shape[-2:]),
            pred_mask=mask.astype(bool, copy=False).reshape(batch, 1, *anomaly_map.shape[-2:]),
        )

    @staticmethod
    def concat(parts: Sequence[Prediction]) -> Prediction:
        return Prediction(*(np.concatenate([getattr(p, f) for p in parts]) for f in Prediction.__dataclass_fields__))

    def non_finite(self) -> list[int]:
        """Indices of images whose score or map holds NaN or infinity."""
        maps_ok = np.isfinite(self.anomaly_map.reshape(len(self), -1)).all(axis=1)
        return np.flatnonzero(~(np.isfinite(self.pred_score) & maps_ok)).tolist()


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: no torch import needed to recognise one
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.float16", "torch.bfloat16"):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


class NonFiniteOutputError(UserError):
    """Some images of a batch scored NaN or infinity; ``prediction`` still holds the whole batch."""

    def __init__(self, backend: str, prediction: Prediction, bad: list[int]) -> None:
        super().__init__(
            f"{backend}: the model returned NaN or infinite outputs for image(s) {bad} of the batch "
            "(an input of extreme values, or a model whose numbers overflow)"
        )
        self.prediction = prediction
        self.bad = bad


def check_images(images: Any, backend: str) -> np.ndarray:
    """``images`` as a contiguous float32 [N, 3, H, W] batch in [0, 1], or a UserError saying what is wrong."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1] != 3:
        shape = getattr(images, "shape", None)
        raise UserError(f"{backend}: expected images as a [N, 3, H, W] array, got shape {shape}")
    if images.shape[0] == 0:
        raise UserError(f"{backend}: the batch is empty")
    if min(images.shape[2:]) < MIN_SIDE:
        raise UserError(
            f"{backend}: images of {images.shape[2]}x{images.shape[3]} pixels are too small; "
            f"both sides must be at least {MIN_SIDE}"
        )
    if images.dtype.kind != "f":
        hint = " (divide uint8 images by 255)" if images.dtype == np.uint8 else ""
        raise UserError(f"{backend}: expected float images in [0, 1], got dtype {images.dtype}{hint}")
    floats = np.ascontiguousarray(images, dtype=np.float32)
    low, high = float(floats.min()), float(floats.max())  # NaN propagates through min and max: one pass each
    if not (np.isfinite(low) and np.isfinite(high)):
        bad = np.flatnonzero(~np.isfinite(floats.reshape(len(floats), -1)).all(axis=1)).tolist()
        raise UserError(f"{backend}: image(s) {bad} of the batch hold NaN or infinite values")
    if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
        raise UserError(f"{backend}: pixel values span {low:g}..{high:g}; scale images to [0, 1] (RGB float32)")
    return floats


class Backend(ABC):
    """A loaded model that turns float32 RGB images in [0, 1], [N, 3, H, W], into a Prediction.

    Attributes:
        postprocess: The model's post-processing statistics (anomalib's thresholds, min/max and sensitivities),
            as every artifact records them: what turns normalised outputs back into anomalib's raw ones.
    """

    name: ClassVar[str]
    postprocess: dict[str, float]

    def __init__(self, artifact: Path, device: str) -> None:
        self.artifact = Path(artifact)
        self.device = device

    @property
    def image_threshold(self) -> float:
        """The normalised score above which the model calls an image anomalous (comparisons' tie rule needs it)."""
        return 1.0 - float(self.postprocess["image_sensitivity"])

    def predict(self, images: np.ndarray) -> Prediction:
        """Run the model on a batch.

        Raises:
            UserError: for input the model cannot take.
            NonFiniteOutputError: when some images scored NaN or infinity (the others are in its ``prediction``).
        """
        batch = check_images(images, self.name)
        prediction = self._infer(batch)
        n = batch.shape[0]
        if prediction.pred_score.shape != (n,) or prediction.anomaly_map.ndim != 4 or len(prediction.anomaly_map) != n:
            raise RuntimeError(f"{self.name} returned malformed outputs for a batch of {n}")
        bad = prediction.non_finite()
        if bad:
            raise NonFiniteOutputError(self.name, prediction, bad)
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
