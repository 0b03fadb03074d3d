"""PatchCoreSpec: everything inference needs from an anomalib PatchCore checkpoint, as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Preprocess:
    """anomalib's pre-processor: resize (then optional centre crop) and ImageNet-style normalisation."""

    resize: tuple[int, int]
    interpolation: str = "bilinear"
    antialias: bool = True
    center_crop: tuple[int, int] | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def model_size(self) -> tuple[int, int]:
        """(height, width) the backbone sees, and the resolution of anomalib's anomaly map."""
        return self.center_crop or self.resize


@dataclass(frozen=True)
class Postprocess:
    """anomalib's post-processing: statistics (NaN fallbacks already resolved) and the rules of the release.

    Attributes:
        normalize: anomalib's ``enable_normalization``; False: scores and maps stay raw and are still labelled
            against ``1 - sensitivity``, as anomalib does.
        threshold_inclusive: A value equal to the label threshold is anomalous. anomalib 1.x labels raw >=
            threshold; its min-max normalisation puts the threshold at exactly 0.5 and is monotonic, so on the
            outputs that is normalised >= 0.5. anomalib 2.x labels normalised > 1 - sensitivity.
        zero_range: The normalised value at the threshold when max == min: 0.5 in anomalib 2.7 (an explicit
            guard), NaN in 1.x-2.6 (0 / 0).
    """

    image_threshold: float
    pixel_threshold: float
    image_min: float
    image_max: float
    pixel_min: float
    pixel_max: float
    image_sensitivity: float = 0.5
    pixel_sensitivity: float = 0.5
    normalize: bool = True
    threshold_inclusive: bool = False
    zero_range: float = 0.5

    @property
    def normalized_image_threshold(self) -> float:
        return 1.0 - self.image_sensitivity

    @property
    def normalized_pixel_threshold(self) -> float:
        return 1.0 - self.pixel_sensitivity


@dataclass(frozen=True)
class PatchCoreSpec:
    """A fitted PatchCore model, independent of anomalib and Lightning.

    Attributes:
        backbone: timm model name, e.g. ``wide_resnet50_2``.
        layers: Feature layers, in anomalib's order (the first sets the patch grid).
        backbone_state: timm ``features_only`` state dict.
        memory_bank: [M, D] float32 coreset.
        num_neighbors: anomalib's k for the image-score re-weighting.
        blur_kernel: 1-D Gaussian taps whose outer product is anomalib's 2-D blur kernel.
        source_sha256: Hash of the checkpoint file this spec was read from.
        written_by: The anomalib release (range) that writes the checkpoint's layout, e.g. ``anomalib 2.0.x``.
        written_by_evidence: What in the file says so.
    """

    backbone: str
    layers: tuple[str, ...]
    backbone_state: dict[str, torch.Tensor] = field(repr=False)
    memory_bank: torch.Tensor = field(repr=False)
    num_neighbors: int
    blur_kernel: torch.Tensor = field(repr=False)
    preprocess: Preprocess
    postprocess: Postprocess
    source_sha256: str = ""
    source_name: str = ""
    written_by: str = ""
    written_by_evidence: str = ""

    @property
    def bank_size(self) -> int:
        return int(self.memory_bank.shape[0])

    @property
    def embedding_dim(self) -> int:
        return int(self.memory_bank.shape[1])
