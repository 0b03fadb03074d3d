"""A small generated inspection data set in MVTec AD layout, so the demo, build's accuracy gate without
--eval-data and the tests need no download.

Normal parts are a brushed-metal texture with a machined ring; defects are scratches and stains, each
written with its ground-truth mask:

    ROOT/train/good/*.png  ROOT/test/good/*.png  ROOT/test/defect/*.png  ROOT/ground_truth/defect/*_mask.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from patchcore_trt.files import atomic_path


@dataclass(frozen=True)
class SyntheticDataset:
    """Where the generated folders are."""

    root: Path

    @property
    def train_good(self) -> Path:
        return self.root / "train" / "good"

    @property
    def test_good(self) -> Path:
        return self.root / "test" / "good"

    @property
    def test_defect(self) -> Path:
        return self.root / "test" / "defect"

    @property
    def masks(self) -> Path:
        return self.root / "ground_truth" / "defect"


def _normal_part(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A brushed-metal texture with a ring whose position jitters a little, as parts do on a line."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    streaks = rng.normal(0, 1, size=(height, 1)).astype(np.float32)
    streaks = np.repeat(streaks, width, axis=1)
    base = 0.55 + 0.03 * streaks + 0.02 * rng.normal(0, 1, size=(height, width)).astype(np.float32)
    cy = height / 2 + rng.uniform(-2, 2)
    cx = width / 2 + rng.uniform(-2, 2)
    radius = np.hypot(yy - cy, xx - cx)
    ring = np.exp(-(((radius - 0.3 * min(height, width)) / 3.0) ** 2))
    gray = np.clip(base - 0.25 * ring, 0, 1)
    tint = np.array([1.0, 0.97, 0.92], dtype=np.float32)
    return np.clip(gray[..., None] * tint, 0, 1)


def _defect_mask(rng: np.random.Generator, height: int, width: int, kind: str) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "stain":
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
        ry, rx = rng.uniform(0.06, 0.12) * height, rng.uniform(0.06, 0.12) * width
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    # A scratch: a thick line segment at a random angle.
    y0, x0 = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.25, 0.45) * min(height, width)
    dy, dx = np.sin(angle), np.cos(angle)
    along = (yy - y0) * dy + (xx - x0) * dx
    across = np.abs(-(yy - y0) * dx + (xx - x0) * dy)
    return (np.abs(along) <= length / 2) & (across <= 2.5)


def _to_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(np.round(array * 255).astype(np.uint8)).save(tmp, format="PNG")


def make_synthetic_dataset(
    root: Path,
    *,
    n_train: int = 16,
    n_test_good: int = 6,
    n_test_defect: int = 6,
    size: tuple[int, int] = (300, 340),
    seed: int = 0,
) -> SyntheticDataset:
    """Write a generated MVTec-layout data set under ``root`` and return its folders.

    Args:
        root: Folder to create (reused if it already holds the same files).
        n_train: Normal training images.
        n_test_good: Normal test images.
        n_test_defect: Defective test images, each with a mask.
        size: Raw image (height, width); deliberately not the model's resolution, and larger, as camera
            images are (so anomalib's antialiased and plain resizes differ, as they do in the field).
        seed: Seed of the generator; the same seed writes the same images.
    """
    dataset = SyntheticDataset(Path(root))
    rng = np.random.default_rng(seed)
    height, width = size
    for folder in (dataset.train_good, dataset.test_good, dataset.test_defect, dataset.masks):
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(n_train):
        _to_png(_normal_part(rng, height, width), dataset.train_good / f"{index:03d}.png")
    for index in range(n_test_good):
        _to_png(_normal_part(rng, height, width), dataset.test_good / f"{index:03d}.png")
    for index in range(n_test_defect):
        image = _normal_part(rng, height, width)
        kind = "stain" if index % 2 else "scratch"
        mask = _defect_mask(rng, height, width, kind)
        colour = np.array([0.15, 0.1, 0.05] if kind == "scratch" else [0.85, 0.55, 0.2], dtype=np.float32)
        image[mask] = colour
        _to_png(image, dataset.test_defect / f"{index:03d}.png")
        _to_png(mask.astype(np.float32), dataset.masks / f"{index:03d}_mask.png")
    return dataset
