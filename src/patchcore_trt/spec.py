"""PatchCoreSpec: everything inference needs from an anomalib PatchCore checkpoint, as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from patchcore_trt.outputs import Postprocess, Preprocess

__all__ = ["PatchCoreSpec", "Postprocess", "Preprocess"]


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
