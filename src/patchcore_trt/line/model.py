"""A line loaded for inference: one backbone per group, one bank search and post-processing per product.

``Line(folder)`` reads a version folder (``store.py`` wrote it) with no pickle: weights from safetensors, banks
memory-mapped from their .npy files (copy-on-write, so fifty products do not cost twice their size in RAM).
``Line.run`` takes requests of several products at once: the images of every product of one group (at one image
size) go through the backbone as one batch, then each product's slice is searched against its own bank and
post-processed with its own statistics. Each product is the deploy model (model.PatchCoreDeploy) of its
checkpoint with the group's backbone module shared, so its results are the torch backend's, bit for bit on the
CPU.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from patchcore_trt.errors import UserError
from patchcore_trt.images import uint8_to_float
from patchcore_trt.line.products import Manifest, read_manifest
from patchcore_trt.model import PatchCoreDeploy, load_backbone
from patchcore_trt.outputs import NonFiniteOutputError, Prediction
from patchcore_trt.spec import PatchCoreSpec


class Line:
    """The products of one line version, ready to score.

    Args:
        folder: A version folder (``line.json``, ``backbones/``, ``banks/``).
        device: ``cpu`` or ``cuda:N`` (FP32 throughout; TF32 off on the GPU, so results stay anomalib's FP32).
    """

    def __init__(self, folder: Path, device: str = "cpu") -> None:
        from safetensors.torch import load_file

        self.folder = Path(folder)
        self.device = torch.device(device)
        self.manifest: Manifest = read_manifest(self.folder)
        self.backbones = {}
        for key, group in self.manifest.groups.items():
            state = load_file(str(self.folder / group.weights))
            self.backbones[key] = load_backbone(group.backbone, group.layers, state).to(self.device)
        self.models: dict[str, PatchCoreDeploy] = {}
        for name, product in self.manifest.products.items():
            group = self.manifest.groups[product.group]
            bank = np.load(self.folder / product.bank, mmap_mode="c")  # writable view: torch takes it without a copy
            shape = (product.metadata.bank_size, product.metadata.embedding_dim)
            if bank.dtype != np.float32 or bank.shape != shape:
                raise UserError(
                    f"{self.folder / product.bank}: a {bank.dtype} {list(bank.shape)} array where product {name!r} "
                    f"needs float32 {list(shape)}"
                )
            spec = PatchCoreSpec(
                backbone=group.backbone, layers=group.layers, backbone_state={}, memory_bank=torch.from_numpy(bank),
                num_neighbors=product.metadata.num_neighbors, blur_kernel=torch.tensor(product.blur_kernel),
                preprocess=group.preprocess, postprocess=product.metadata.postprocess, source_sha256=product.sha256,
                source_name=product.source_file,
            )  # fmt: skip
            model = PatchCoreDeploy(spec, backbone=self.backbones[product.group])
            self.models[name] = model.eval().to(self.device)

    @property
    def products(self) -> list[str]:
        return list(self.manifest.products)

    def unknown(self, name: str) -> UserError | None:
        """The error for a product this line does not serve, None for one it does."""
        if name in self.models:
            return None
        return UserError(f"unknown product {name!r}; this line serves: {', '.join(self.products)}")

    def predict(self, product: str, images: np.ndarray) -> Prediction:
        """One product's uint8 [N, H, W, 3] images -> its Prediction (NonFiniteOutputError as Backend.predict)."""
        result = self.run([(product, images)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @torch.inference_mode()
    def run(self, items: Sequence[tuple[str, np.ndarray]]) -> list[Prediction | UserError]:
        """Several requests, (product, uint8 [n, H, W, 3]) each, all of one image size -> one result each: its
        Prediction, or the UserError that belongs to it alone (an unknown product, NaN or infinite outputs)."""
        results: list[Prediction | UserError] = [UserError("not run")] * len(items)  # every slot is set below
        by_group: dict[str, list[int]] = defaultdict(list)
        for index, (product, _) in enumerate(items):
            unknown = self.unknown(product)
            if unknown is not None:
                results[index] = unknown
            else:
                by_group[self.manifest.products[product].group].append(index)
        for members in by_group.values():
            batch = np.concatenate([items[index][1] for index in members])
            images = torch.from_numpy(uint8_to_float(batch)).to(self.device)
            first = self.models[items[members[0]][0]]
            with _fp32(self.device):
                embedding = first.embed(first.preprocess(images))
                start = 0
                for index in members:
                    product, count = items[index][0], len(items[index][1])
                    model = self.models[product]
                    part = embedding[start : start + count]
                    prediction = model.prediction(*model.score_embedding(part), input_size=images.shape[-2:])
                    bad = prediction.non_finite()
                    results[index] = NonFiniteOutputError(f"product {product}", prediction, bad) if bad else prediction
                    start += count
        return results


def _fp32(device: torch.device) -> object:
    """On a GPU, cuDNN's convolutions in plain FP32 (no TF32, no autotuned algorithm): anomalib's FP32 arithmetic."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False)
