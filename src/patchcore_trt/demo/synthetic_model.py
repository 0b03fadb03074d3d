"""A synthetic PatchCore model, so benchmarks run on a machine without a checkpoint.

Latency does not depend on the weights, but accuracy checks do: an untrained timm network has its last
BatchNorm of each block at zero (residual branches off) and identity statistics, and a Gaussian bank has no
near neighbours. So the synthetic model is built like a fitted one, only from random parts:
- backbone: timm's random initialisation, random BatchNorm scales and shifts, running statistics measured on
  generated textures (every branch contributes, activations stay in FP16 range);
- memory bank: ``bank_size`` patch features of generated defect-free textures, drawn at random (a coreset
  stand-in);
- post-processing: min/max of the image scores and maps of generated normal and defective textures, with
  the thresholds at their midpoints, so normalised scores spread over [0, 1] as a real model's do.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from patchcore_trt.errors import UserError
from patchcore_trt.gpu.knn import float32_matmul
from patchcore_trt.model import PatchCoreDeploy, Preprocessor, create_backbone
from patchcore_trt.spec import PatchCoreSpec, Postprocess, Preprocess

SIGMA = 4  # anomalib's AnomalyMapGenerator default


def gaussian_taps(sigma: float = SIGMA) -> torch.Tensor:
    """The 1-D factor of anomalib's blur kernel: size 2 * int(4 sigma + 0.5) + 1, normalised."""
    size = 2 * int(4.0 * sigma + 0.5) + 1
    x = torch.arange(size, dtype=torch.float64) - size // 2
    taps = torch.exp(-(x**2) / (2 * sigma**2))
    return (taps / taps.sum()).float()


def texture_images(count: int, size: tuple[int, int], *, seed: int, defects: bool = False) -> torch.Tensor:
    """uint8 [count, H, W, 3]: smooth coloured textures with fine grain; ``defects`` adds one blot each."""
    gen = torch.Generator().manual_seed(seed)
    height, width = size
    coarse = F.interpolate(torch.rand(count, 3, 6, 6, generator=gen), size=size, mode="bicubic", align_corners=False)
    medium = F.interpolate(torch.rand(count, 1, 24, 24, generator=gen), size=size, mode="bilinear", align_corners=False)
    fine = torch.rand(count, 1, height, width, generator=gen)
    images = 0.2 + 0.4 * coarse + 0.25 * medium + 0.15 * fine
    if defects:
        yy = torch.linspace(0, 1, height)[:, None]
        xx = torch.linspace(0, 1, width)[None, :]
        for image in images:
            cy, cx, ry, rx = (torch.rand(4, generator=gen) * torch.tensor([0.6, 0.6, 0.12, 0.12]) + 0.2).tolist()
            blot = ((yy - cy) / (ry * 0.5)) ** 2 + ((xx - cx) / (rx * 0.5)) ** 2 <= 1
            image[:, blot] = 0.6 * image[:, blot] + 0.4 * torch.rand(3, 1, generator=gen)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _as_input(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return images.to(device).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def _calibrated_backbone(
    name: str, layers: tuple[str, ...], size: tuple[int, int], seed: int, device: torch.device | str
) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = create_backbone(name, layers)
        norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.2)
            norm.reset_running_stats()
            norm.momentum = None  # cumulative averages over the calibration batches
    normalise = Preprocessor(Preprocess(resize=size)).to(device)
    backbone.to(device).train()
    for batch in range(2):
        backbone(normalise(_as_input(texture_images(4, size, seed=seed + 101 + batch), device)))
    for norm in norms:
        norm.momentum = 0.1
    return {key: value.detach().float().cpu() for key, value in backbone.eval().state_dict().items()}


# Building a bank of M rows holds a pool of 1.25 M rows twice (the batches and their concatenation), then the M
# rows drawn from it.
BANK_BUILD_COPIES = 3.5


def available_memory() -> int | None:
    """Bytes of memory this machine can give now (MemAvailable), or None where it cannot tell."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_bank_memory(bank_size: int, embedding_dim: int) -> None:
    """Refuse a synthetic bank whose build needs more memory than the machine has, before it starts."""
    needed = BANK_BUILD_COPIES * bank_size * embedding_dim * 4
    available = available_memory()
    if available is not None and needed > available:
        raise UserError(
            f"a synthetic bank of {bank_size:,} rows x {embedding_dim} features needs about {needed / 2**30:.0f} GiB "
            f"of memory to build and this machine has {available / 2**30:.0f} GiB available; use a smaller --bank"
        )


@torch.no_grad()
def _bank(
    deploy: PatchCoreDeploy, bank_size: int, size: tuple[int, int], seed: int, device: torch.device | str
) -> torch.Tensor:
    """``bank_size`` rows drawn without replacement from the patch features of a quarter more defect-free textures."""
    features: list[torch.Tensor] = []
    while sum(len(f) for f in features) < math.ceil(1.25 * bank_size):
        if len(features) == 1:  # the feature size is known now, before a large bank fills the memory
            check_bank_memory(bank_size, features[0].shape[1])
        images = _as_input(texture_images(8, size, seed=seed + 1000 + len(features)), device)
        embedding = deploy.embed(deploy.preprocess(images))
        features.append(embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]).cpu())
    pool = torch.cat(features)
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:bank_size]
    return pool[pick].contiguous()


@torch.no_grad()
def _postprocess(deploy: PatchCoreDeploy, size: tuple[int, int], seed: int, device: torch.device | str) -> Postprocess:
    images = torch.cat(
        [texture_images(8, size, seed=seed + 2000), texture_images(8, size, seed=seed + 3000, defects=True)]
    )
    outputs = [deploy.raw_scores(_as_input(images[i : i + 8], device)) for i in range(0, len(images), 8)]
    scores = torch.cat([score for score, _ in outputs])
    maps = torch.cat([anomaly_map for _, anomaly_map in outputs])
    # Values a float32 checkpoint holds exactly: write_checkpoint -> read_checkpoint returns this very spec.
    image_min, image_max, pixel_min, pixel_max = (
        float(v) for v in (scores.min(), scores.max(), maps.min(), maps.max())
    )
    image_threshold, pixel_threshold = (
        float(torch.tensor(v)) for v in ((image_min + image_max) / 2, (pixel_min + pixel_max) / 2)
    )
    return Postprocess(
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        image_min=image_min,
        image_max=image_max,
        pixel_min=pixel_min,
        pixel_max=pixel_max,
    )


def synthetic_spec(
    bank_size: int = 16384,
    image_size: tuple[int, int] = (256, 256),
    *,
    backbone: str = "wide_resnet50_2",
    layers: tuple[str, ...] = ("layer2", "layer3"),
    num_neighbors: int = 9,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> PatchCoreSpec:
    """A fitted-looking PatchCore model from random parts (see the module docstring); tensors end on the CPU.

    Args:
        bank_size: Memory-bank rows M.
        image_size: Model resolution (height, width).
        device: Where the features are computed (a GPU makes large banks quick).
    """
    if bank_size < 1:
        raise UserError(f"the synthetic memory bank needs at least 1 row, got {bank_size}")
    spec = PatchCoreSpec(
        backbone=backbone,
        layers=tuple(layers),
        backbone_state=_calibrated_backbone(backbone, tuple(layers), image_size, seed, device),
        memory_bank=torch.zeros(1, 1),  # replaced below, once the feature size is known
        num_neighbors=num_neighbors,
        blur_kernel=gaussian_taps(),
        preprocess=Preprocess(resize=image_size),
        postprocess=Postprocess(
            image_threshold=0.5, pixel_threshold=0.5, image_min=0, image_max=1, pixel_min=0, pixel_max=1
        ),
        source_name=f"synthetic-{backbone}-M{bank_size}-{image_size[0]}x{image_size[1]}-seed{seed}",
    )
    with float32_matmul():
        spec = replace(
            spec, memory_bank=_bank(PatchCoreDeploy(spec).to(device).eval(), bank_size, image_size, seed, device)
        )
        return replace(
            spec, postprocess=_postprocess(PatchCoreDeploy(spec).to(device).eval(), image_size, seed, device)
        )
