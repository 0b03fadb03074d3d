"""The deploy model: one nn.Module that computes exactly what anomalib's ``AnomalibModule.forward`` computes.

Input: float32 images [N, 3, H, W], RGB in [0, 1], any H and W (anomalib's own input convention).
Outputs: pred_score [N], pred_label [N] (bool), anomaly_map [N, 1, h, w], pred_mask [N, 1, h, w] (bool),
normalised with the checkpoint's thresholds and min/max and labelled exactly as the anomalib release that wrote
the checkpoint does (spec.Postprocess: the normalisation switch, the label rule, the zero-range value).

Differences from anomalib's code are in how, never in what:
- the nearest-neighbour search walks the memory bank in fixed chunks, so activation memory is
  [patches x chunk] whatever the bank size (anomalib materialises [1024 patches x M]); each chunk's minimum
  is taken on the square-rooted distances anomalib compares, first index among equals, and the chunks' winners
  likewise, so the row is anomalib's (the lowest index among equal distances) and not only the distance;
- the 33x33 Gaussian blur runs as two 1-D passes (the kernel is an outer product).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import numpy as np
import timm
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from patchcore_trt.errors import UserError
from patchcore_trt.outputs import Prediction, over_threshold
from patchcore_trt.spec import PatchCoreSpec, Postprocess, Preprocess

DEFAULT_BANK_CHUNK = 4096


class DeployOutput(NamedTuple):
    """The graph's outputs, in artifact.OUTPUT_NAMES order (the exporter names them by position)."""

    pred_score: torch.Tensor
    pred_label: torch.Tensor
    anomaly_map: torch.Tensor
    pred_mask: torch.Tensor


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def create_backbone(name: str, layers: tuple[str, ...]) -> nn.Module:
    """The timm ``features_only`` network anomalib's TimmFeatureExtractor builds, with layer names mapped to indices."""
    try:
        probe = timm.create_model(name, pretrained=False, features_only=True, exportable=True)
    except Exception as exc:  # timm raises RuntimeError for unknown names; the Hub client its own error types
        if name.startswith(("hf-hub:", "hf_hub:")):
            offline = " (HF_HUB_OFFLINE is set: the Hub is not reachable from here)" if _hub_offline() else ""
            raise UserError(
                f"backbone {name!r} is defined on the Hugging Face Hub, which could not be read{offline}; "
                "download the model once where the Hub is reachable (it is cached), or export there"
            ) from None
        if not isinstance(exc, RuntimeError):
            raise
        raise UserError(f"backbone {name!r} is not a timm model known to this timm version ({exc})") from None
    modules = [info["module"] for info in probe.feature_info.info]
    missing = [layer for layer in layers if layer not in modules]
    if missing:
        raise UserError(f"backbone {name!r} has no feature layer(s) {missing}; it has {modules}")
    indices = [modules.index(layer) for layer in layers]
    return timm.create_model(name, pretrained=False, features_only=True, exportable=True, out_indices=indices)


def load_backbone(name: str, layers: tuple[str, ...], state: dict[str, torch.Tensor]) -> nn.Module:
    """``create_backbone`` with a checkpoint's weights loaded, in eval mode."""
    backbone = create_backbone(name, layers)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"the checkpoint's backbone weights do not fit timm's {name} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it trained with another timm version?"
        )
    return backbone.eval()


def squared_distances(x: torch.Tensor, y: torch.Tensor, y_sq_norm: torch.Tensor) -> torch.Tensor:
    """||x - y||^2 by anomalib's formula and operation order: -2 x.y + ||x||^2 + ||y||^2, clamped at 0."""
    x_sq_norm = x.pow(2).sum(dim=-1, keepdim=True)
    return (torch.matmul(x, y.transpose(-2, -1)) * -2 + x_sq_norm + y_sq_norm).clamp_min(0)


def row_squared_norms(rows: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """``rows.pow(2).sum(dim=-1)`` a block of rows at a time, so a bank of a million rows never has an FP32 copy
    of its squares in memory (6 GB at 1536 features)."""
    return torch.cat([rows[start : start + chunk].pow(2).sum(dim=-1) for start in range(0, len(rows), chunk)])


def nearest_rows(
    queries: torch.Tensor, bank: torch.Tensor, bank_sq_norm: torch.Tensor, chunk: int = DEFAULT_BANK_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """anomalib's ``euclidean_dist(queries, bank).min(1)`` a chunk of bank rows at a time: the distance to, and
    the index of, the nearest bank row, the lowest index among equal distances ([P, D], [M, D], [M] -> [P], [P])."""
    best, best_index = [], []
    for start in range(0, len(bank), chunk):
        rows, sq_norm = bank[start : start + chunk], bank_sq_norm[start : start + chunk]
        chunk_best, chunk_index = squared_distances(queries, rows, sq_norm).sqrt().min(dim=1)
        best.append(chunk_best)
        best_index.append(chunk_index + start)
    if len(best) == 1:
        return best[0], best_index[0]
    distance, winner = torch.stack(best, dim=1).min(dim=1, keepdim=True)  # the first chunk among equals
    return distance.squeeze(1), torch.stack(best_index, dim=1).gather(1, winner).squeeze(1)


class MemoryBankSearch(nn.Module):
    """Exact nearest-neighbour search over a memory bank held in fixed-size chunks."""

    def __init__(self, memory_bank: torch.Tensor, chunk: int = DEFAULT_BANK_CHUNK) -> None:
        super().__init__()
        if chunk < 1:
            raise ValueError("chunk must be positive")
        self.bank_size = int(memory_bank.shape[0])
        self.chunk = chunk
        self.register_buffer("bank", memory_bank.float().contiguous())
        self.register_buffer("bank_sq_norm", row_squared_norms(self.bank)[None, :].contiguous())

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to, and index of, the nearest bank row for each query row [P, D] (see ``nearest_rows``)."""
        return nearest_rows(queries, self.bank, self.bank_sq_norm[0], self.chunk)

    def k_nearest_indices(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of the k nearest bank rows for each query row, nearest first: anomalib's ``topk`` over its
        square-rooted distances (the order among equal distances is topk's, as in anomalib)."""
        candidate, candidate_index = [], []
        for start in range(0, self.bank_size, self.chunk):
            rows, sq_norm = self.bank[start : start + self.chunk], self.bank_sq_norm[:, start : start + self.chunk]
            chunk_best, chunk_index = (
                squared_distances(queries, rows, sq_norm).sqrt().topk(min(k, rows.shape[0]), dim=1, largest=False)
            )
            candidate.append(chunk_best)
            candidate_index.append(chunk_index + start)
        if len(candidate) == 1:
            return candidate_index[0]
        _, order = torch.cat(candidate, dim=1).topk(k, dim=1, largest=False)
        return torch.cat(candidate_index, dim=1).gather(1, order)


def image_scores(
    patch_scores: torch.Tensor,
    locations: torch.Tensor,
    embedding: torch.Tensor,
    search: MemoryBankSearch,
    num_neighbors: int,
) -> torch.Tensor:
    """anomalib's image score: the largest patch distance, re-weighted by its neighbourhood in the bank.

    Args:
        patch_scores: [N, P] nearest distances. locations: [N, P] their bank rows.
        embedding: [N, P, D] patch features.
    """
    if num_neighbors == 1:
        return patch_scores.amax(dim=1)
    max_patch = patch_scores.argmax(dim=1, keepdim=True)
    score = patch_scores.gather(1, max_patch).squeeze(1)
    max_feature = embedding.gather(1, max_patch[..., None].expand(-1, -1, embedding.shape[-1]))
    nearest_rows = search.bank[locations.gather(1, max_patch).squeeze(1)]
    support = search.k_nearest_indices(nearest_rows, min(num_neighbors, search.bank_size))
    support_rows = search.bank[support]
    distances = squared_distances(max_feature, support_rows, support_rows.pow(2).sum(-1)[:, None, :]).sqrt()
    weights = 1 - F.softmax(distances.squeeze(1), dim=1)[:, 0]
    return weights * score


class Preprocessor(nn.Module):
    """anomalib's exportable pre-processor: resize without antialiasing, optional centre crop, normalise."""

    def __init__(self, settings: Preprocess) -> None:
        super().__init__()
        self.settings = settings
        self.register_buffer("mean", torch.tensor(settings.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(settings.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.crop_and_normalize(self.resize(images))

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] at any H x W -> [N, 3, resize]: the only step that depends on the input's size."""
        mode = self.settings.interpolation
        align = False if mode in ("bilinear", "bicubic") else None
        return F.interpolate(images, size=self.settings.resize, mode=mode, align_corners=align)

    def crop_and_normalize(self, images: torch.Tensor) -> torch.Tensor:
        """The resized images -> the backbone's input."""
        if self.settings.center_crop is not None:
            crop_h, crop_w = self.settings.center_crop
            top = round((self.settings.resize[0] - crop_h) / 2.0)
            left = round((self.settings.resize[1] - crop_w) / 2.0)
            images = images[:, :, top : top + crop_h, left : left + crop_w]
        return (images - self.mean) / self.std


class AnomalyMap(nn.Module):
    """Patch scores -> nearest upsampling to the model resolution -> anomalib's Gaussian blur (separable)."""

    def __init__(self, taps: torch.Tensor, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.pad = int(taps.numel() // 2)
        self.register_buffer("taps_h", taps.float().view(1, 1, 1, -1))
        self.register_buffer("taps_v", taps.float().view(1, 1, -1, 1))

    def forward(self, patch_scores: torch.Tensor) -> torch.Tensor:
        upsampled = F.interpolate(patch_scores, size=self.size, mode="nearest")
        padded = F.pad(upsampled, (self.pad, self.pad, self.pad, self.pad), mode="reflect")
        return F.conv2d(F.conv2d(padded, self.taps_h), self.taps_v)


def normalize(values: torch.Tensor, threshold: float, low: float, high: float, zero_range: float = 0.5) -> torch.Tensor:
    """anomalib's min-max normalisation around the threshold; ``zero_range`` at the threshold when max == min
    (anomalib 2.7's guard gives 0.5; earlier releases divide 0 by 0)."""
    if high == low:
        return torch.where(values > threshold, 1.0, torch.where(values < threshold, 0.0, zero_range))
    return (((values - threshold) / (high - low)) + 0.5).clamp(min=0, max=1)


class PatchCoreDeploy(nn.Module):
    """PatchCore inference as one graph, faithful to anomalib's forward (see module docstring).

    Args:
        spec: The model read from a checkpoint.
        map_at_input_size: Return the anomaly map and mask at the input's H x W instead of the model's.
        bank_chunk: Memory-bank rows searched at once.
    """

    def __init__(
        self,
        spec: PatchCoreSpec,
        *,
        map_at_input_size: bool = False,
        bank_chunk: int = DEFAULT_BANK_CHUNK,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.spec_layers = spec.layers
        self.num_neighbors = spec.num_neighbors
        self.post: Postprocess = spec.postprocess
        self.map_at_input_size = map_at_input_size
        self.preprocess = Preprocessor(spec.preprocess)
        # Products whose checkpoints hold the same backbone share one module (serving many products, line/).
        if backbone is None:
            backbone = load_backbone(spec.backbone, spec.layers, spec.backbone_state)
        self.backbone = backbone
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.search = MemoryBankSearch(spec.memory_bank, bank_chunk)
        self.anomaly_map = AnomalyMap(spec.blur_kernel, spec.preprocess.model_size)

    def embed(self, normalized_images: torch.Tensor) -> torch.Tensor:
        """[N, 3, h, w] -> [N, D, gh, gw]: pooled backbone features, upsampled to the first layer and concatenated."""
        features = [self.pool(feature) for feature in self.backbone(normalized_images)]
        grid = features[0].shape[-2:]
        upsampled = [features[0]] + [F.interpolate(feature, size=grid, mode="bilinear") for feature in features[1:]]
        return torch.cat(upsampled, dim=1)

    def raw_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalised (image score [N], anomaly map [N, 1, h, w]) as anomalib's PatchcoreModel returns them."""
        return self.score_embedding(self.embed(self.preprocess(images)))

    def score_embedding(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``embed``'s features [N, D, gh, gw] -> the raw (image score, anomaly map): everything the bank decides."""
        batch, dim, grid_h, grid_w = embedding.shape
        patches = embedding.permute(0, 2, 3, 1).reshape(batch, grid_h * grid_w, dim)
        distances, locations = self.search.nearest(patches.reshape(-1, dim))
        distances = distances.reshape(batch, grid_h * grid_w)
        score = image_scores(distances, locations.reshape(batch, -1), patches, self.search, self.num_neighbors)
        return score, self.anomaly_map(distances.reshape(batch, 1, grid_h, grid_w))

    def forward(self, images: torch.Tensor) -> DeployOutput:
        return self.outputs(*self.raw_scores(images), input_size=images.shape[-2:])

    def prediction(self, score: torch.Tensor, anomaly_map: torch.Tensor, input_size: Any) -> Prediction:
        """``outputs`` as a host Prediction that also carries the un-normalised score: the normalised one is clipped
        at 0 and 1, where it cannot be undone."""
        raw = score.detach().cpu().numpy().astype(np.float32, copy=False).reshape(len(score))
        return dataclasses.replace(Prediction.from_outputs(self.outputs(score, anomaly_map, input_size)), raw_score=raw)

    def outputs(self, score: torch.Tensor, anomaly_map: torch.Tensor, input_size: Any) -> DeployOutput:
        """The raw score and map -> the normalised, labelled outputs (the map at ``input_size`` if asked)."""
        if self.map_at_input_size:
            anomaly_map = F.interpolate(anomaly_map, size=input_size, mode="bilinear", align_corners=False)
        post = self.post
        if post.normalize:
            score = normalize(score, post.image_threshold, post.image_min, post.image_max, post.zero_range)
            anomaly_map = normalize(anomaly_map, post.pixel_threshold, post.pixel_min, post.pixel_max, post.zero_range)
        return DeployOutput(
            pred_score=score,
            pred_label=over_threshold(score, post.normalized_image_threshold, post.threshold_inclusive),
            anomaly_map=anomaly_map,
            pred_mask=over_threshold(anomaly_map, post.normalized_pixel_threshold, post.threshold_inclusive),
        )
