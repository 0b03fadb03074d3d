"""Write a line's version folder from checkpoints: one weights file per backbone group, one bank per product.

Each checkpoint is read by the safe reader (no pickled code runs, every tensor checked against its storage) and
split: the backbone's weights go to ``backbones/<group>.safetensors`` (once per group, whatever the number of
products in it), the memory bank to ``banks/<product>.npy`` (float32, memory-mapped by the serving process), and
everything else to the manifest. The model process then reads no pickle at all. Products carried over from the
previous version are hard links to its files (no copy, no re-read).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from patchcore_trt.errors import UserError
from patchcore_trt.line.products import MANIFEST, Group, Manifest, Product
from patchcore_trt.spec import PatchCoreSpec


def group_key(spec: PatchCoreSpec) -> str:
    """SHA-256 of what makes two checkpoints' backbones interchangeable: the timm name, the layers, the
    pre-processing and every weight's name, dtype, shape and bytes (content, never the file's name)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([spec.backbone, list(spec.layers), asdict(spec.preprocess)]).encode())
    for name in sorted(spec.backbone_state):
        tensor = spec.backbone_state[name].detach().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: a copy is as good
        shutil.copyfile(source, target)


def write_version(
    folder: Path,
    plan: list[tuple[str, Path | PatchCoreSpec | None]],
    *,
    previous: tuple[Path, Manifest] | None = None,
    trust_pickled_code: bool = False,
    anomalib_version: str | None = None,
    on_product: Callable[[str], None] | None = None,
) -> Manifest:
    """Fill ``folder`` (a new, empty staging folder) with the line ``plan`` describes and return its manifest.

    Args:
        plan: (product name, checkpoint) in the line's order; the checkpoint may be one already read (a
            PatchCoreSpec); None carries the product over from ``previous`` (its folder and manifest) unchanged.
        on_product: Called with each product's name before it is read (progress).
    """
    from safetensors.torch import save_file

    from patchcore_trt.checkpoint import read_checkpoint
    from patchcore_trt.export import build_metadata

    products: dict[str, Product] = {}
    groups: dict[str, Group] = {}
    for name, checkpoint in plan:
        if on_product is not None:
            on_product(name)
        if checkpoint is None:
            if previous is None or name not in previous[1].products:
                raise ValueError(f"product {name!r} has no checkpoint and no previous version to carry it from")
            old_folder, old = previous
            product = old.products[name]
            _link(old_folder / product.bank, folder / product.bank)
            if product.group not in groups:
                group = groups[product.group] = old.groups[product.group]
                _link(old_folder / group.weights, folder / group.weights)
            products[name] = product
            continue
        if isinstance(checkpoint, PatchCoreSpec):
            spec = checkpoint
        else:
            try:
                spec = read_checkpoint(
                    checkpoint, trust_pickled_code=trust_pickled_code, anomalib_version=anomalib_version
                )
            except UserError as exc:
                raise UserError(f"product {name}: {exc}") from None
        digest = group_key(spec)  # hashes every backbone weight: once per product
        key = digest[:16]
        if key not in groups:
            weights = f"backbones/{key}.safetensors"
            (folder / "backbones").mkdir(exist_ok=True)
            state = {layer: tensor.detach().clone().contiguous() for layer, tensor in spec.backbone_state.items()}
            save_file(state, str(folder / weights))
            groups[key] = Group(spec.backbone, spec.layers, spec.preprocess, weights, digest)
        bank = f"banks/{name}.npy"
        (folder / "banks").mkdir(exist_ok=True)
        np.save(folder / bank, np.ascontiguousarray(spec.memory_bank.float().numpy()))
        metadata = build_metadata(spec, map_at_input_size=False)
        taps = tuple(float(tap) for tap in spec.blur_kernel.float().reshape(-1))
        products[name] = Product(name, spec.source_name, spec.source_sha256, key, bank, taps, metadata)
    manifest = Manifest(products, groups)
    (folder / MANIFEST).write_text(manifest.to_json())
    return manifest
