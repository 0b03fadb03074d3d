"""The one backend contract: every runtime takes the same images and returns the same Prediction.

``Backend.predict`` takes float32 [N, 3, H, W] in [0, 1], uint8 [N, H, W, 3] as decoded, and (where the registry
says the backend takes it) a CUDA tensor of either layout. It checks every kind here (layout, dtype, range,
minimum side, NaN) and every output; a backend implements ``_infer`` on float32 and, for the kinds it takes
natively, ``_infer_uint8`` / ``_infer_device``. Other backends get uint8 converted exactly as
``images.load_image`` converts a decoded image, so results are identical either way. A contract test runs every
registered backend through every kind it declares, so backends cannot drift apart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from patchcore_trt.artifact import MIN_SIDE
from patchcore_trt.errors import UserError
from patchcore_trt.images import uint8_to_float
from patchcore_trt.outputs import NonFiniteOutputError, Postprocess, Prediction
from patchcore_trt.runtime.registry import REGISTRY

__all__ = ["Backend", "NonFiniteOutputError", "Prediction", "check_images"]


# Float images a hair outside [0, 1] come from resampling; anything further is a scale mistake (0..255).
_RANGE_SLACK = 1e-3


def _too_small(backend: str, height: int, width: int) -> UserError:
    return UserError(
        f"{backend}: images of {height}x{width} pixels are too small; both sides must be at least {MIN_SIDE}"
    )


def _is_tensor(images: Any) -> bool:
    return hasattr(images, "is_cuda") and hasattr(images, "detach")  # torch, recognised without importing it


def check_images(images: Any, backend: str) -> np.ndarray:
    """``images`` as a contiguous float32 [N, 3, H, W] batch in [0, 1], or a UserError saying what is wrong."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1] != 3:
        shape = getattr(images, "shape", None)
        raise UserError(
            f"{backend}: expected images as a [N, 3, H, W] array (float32 in [0, 1]) or [N, H, W, 3] uint8, "
            f"got shape {shape}"
        )
    if images.shape[0] == 0:
        raise UserError(f"{backend}: the batch is empty")
    if min(images.shape[2:]) < MIN_SIDE:
        raise _too_small(backend, images.shape[2], images.shape[3])
    if images.dtype.kind != "f":
        hint = "; uint8 images go in as decoded, [N, H, W, 3]" if images.dtype == np.uint8 else ""
        raise UserError(f"{backend}: expected float images in [0, 1], got dtype {images.dtype}{hint}")
    floats = np.ascontiguousarray(images, dtype=np.float32)
    low, high = float(floats.min()), float(floats.max())  # NaN propagates through min and max: one pass each
    if not (np.isfinite(low) and np.isfinite(high)):
        bad = np.flatnonzero(~np.isfinite(floats.reshape(len(floats), -1)).all(axis=1)).tolist()
        raise UserError(f"{backend}: image(s) {bad} of the batch hold NaN or infinite values")
    if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
        raise UserError(f"{backend}: pixel values span {low:g}..{high:g}; scale images to [0, 1] (RGB float32)")
    return floats


def _check_uint8(images: np.ndarray, backend: str) -> np.ndarray:
    if len(images) == 0:
        raise UserError(f"{backend}: the batch is empty")
    if min(images.shape[1:3]) < MIN_SIDE:
        raise _too_small(backend, images.shape[1], images.shape[2])
    return np.ascontiguousarray(images)


def _check_device(images: Any, backend: str) -> Any:
    """A CUDA tensor: uint8 [N, H, W, 3] or float32 [N, 3, H, W] in [0, 1] without NaN (checked on the device)."""
    shape, dtype = tuple(images.shape), str(images.dtype)
    if not images.is_cuda:
        raise UserError(f"{backend}: a torch tensor must be on a CUDA device (or pass numpy), got {images.device}")
    uint8 = dtype == "torch.uint8" and len(shape) == 4 and shape[3] == 3
    floats = dtype == "torch.float32" and len(shape) == 4 and shape[1] == 3
    if not (uint8 or floats):
        raise UserError(
            f"{backend}: expected a CUDA tensor uint8 [N, H, W, 3] or float32 [N, 3, H, W], "
            f"got {dtype[6:]} {list(shape)}"
        )
    if shape[0] == 0:
        raise UserError(f"{backend}: the batch is empty")
    height, width = shape[1:3] if uint8 else shape[2:]
    if min(height, width) < MIN_SIDE:
        raise _too_small(backend, height, width)
    if floats:
        low, high = (float(value) for value in images.aminmax())  # one reduction; NaN propagates into both
        if not (np.isfinite(low) and np.isfinite(high)):
            raise UserError(f"{backend}: the batch holds NaN or infinite values")
        if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
            raise UserError(f"{backend}: pixel values span {low:g}..{high:g}; scale images to [0, 1] (RGB float32)")
    return images.contiguous()


def input_kind(images: Any) -> str:
    """Which of the registry's INPUT_KINDS ``images`` is meant as (validation comes after)."""
    if _is_tensor(images):
        return "device"
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3:
        return "uint8"
    return "float32"


class Backend(ABC):
    """A loaded model that turns images into a Prediction (see the module docstring for the input kinds).

    Attributes:
        postprocess: The model's post-processing statistics and label rule, as every artifact records them.
    """

    name: ClassVar[str]
    postprocess: Postprocess
    # The maps' [h, w] where a backend knows it without them (a served model asked for scores only); else None.
    map_size: tuple[int, int] | None = None

    def __init__(self, artifact: Path, device: str) -> None:
        self.artifact = Path(artifact)
        self.device = device

    @property
    def image_threshold(self) -> float:
        """The normalised score at which the label changes (``postprocess.rule`` says on which side)."""
        return self.postprocess.normalized_image_threshold

    @property
    def native_inputs(self) -> tuple[str, ...]:
        """The input kinds this backend takes without conversion (the registry's fact)."""
        return REGISTRY[self.name].inputs

    def predict(self, images: Any) -> Prediction:
        """Run the model on a batch: float32 [N, 3, H, W] in [0, 1], uint8 [N, H, W, 3], or a CUDA tensor.

        Raises:
            UserError: for input the model cannot take.
            NonFiniteOutputError: when some images scored NaN or infinity (the others are in its ``prediction``).
        """
        kind = input_kind(images)
        if kind == "device":
            if kind not in self.native_inputs:
                raise UserError(f"{self.name}: takes numpy arrays, not torch tensors (call .cpu().numpy() first)")
            batch = _check_device(images, self.name)
            prediction = self._infer_device(batch)
        elif kind == "uint8":
            batch = _check_uint8(images, self.name)
            native = kind in self.native_inputs
            prediction = self._infer_uint8(batch) if native else self._infer(uint8_to_float(batch))
        else:
            batch = check_images(images, self.name)
            prediction = self._infer(batch)
        n = len(batch)
        maps = prediction.anomaly_map
        if prediction.pred_score.shape != (n,) or (maps is not None and (maps.ndim != 4 or len(maps) != n)):
            raise RuntimeError(f"{self.name} returned malformed outputs for a batch of {n}")
        bad = prediction.non_finite()
        if bad:
            raise NonFiniteOutputError(self.name, prediction, bad)
        return prediction

    def slot(self, count: int, height: int, width: int) -> np.ndarray:
        """An empty uint8 [count, height, width, 3] batch for a producer (a decoder) to fill and pass to ``predict``
        once. A backend that stages its uploads hands out its own staging memory (cuda: a pinned slot), so the
        batch is not copied again on its way to the device."""
        return np.empty((count, height, width, 3), dtype=np.uint8)

    @abstractmethod
    def _infer(self, images: np.ndarray) -> Prediction:
        """Backend-specific inference on a validated, contiguous float32 [N, 3, H, W] batch."""

    def _infer_uint8(self, images: np.ndarray) -> Prediction:
        """Inference on a validated, contiguous uint8 [N, H, W, 3] batch (backends that declare ``uint8``)."""
        raise NotImplementedError(f"{self.name} declares uint8 input but does not implement it")

    def _infer_device(self, images: Any) -> Prediction:
        """Inference on a validated CUDA tensor (backends that declare ``device``)."""
        raise NotImplementedError(f"{self.name} declares device input but does not implement it")

    def describe(self) -> dict[str, object]:
        """What a results file records about the model: its file and SHA-256, backend, device, thresholds, rule."""
        from patchcore_trt.files import sha256_of

        return {
            "file": self.artifact,
            "sha256": sha256_of(self.artifact),
            "backend": self.name,
            "device": self.device,
            "image_threshold": self.image_threshold,
            "rule": self.postprocess.rule,
            "postprocess": self.postprocess.to_dict(),
        }

    def notes(self) -> list[str]:
        """What the user should know about the inputs seen so far (e.g. images rounded for a uint8 server model)."""
        return []

    def close(self) -> None:
        """Release device memory and sessions (optional)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
