"""How much of the exact scan the norm bound (gpu/prune.py) skips on real memory banks: the golden checkpoints'
banks (features of trained anomalib models, shared/fixtures/anomalib-versions) searched by the patches of their
own test images. CPU only, float64 specification (prune.skippable; the kernel's FP32 test skips the same or
fewer, tests/test_prune.py).

Per release and tile height (block_m): the fraction of (query, tile) pairs, and of (block of 32 patches, tile)
pairs (what pruned_scan skips: a tile is skipped for a whole query block; patches in image order, and sorted
by norm as pruned_scan orders them), whose tile the bound excludes; with each query's bound taken from the
FP16 candidates' best row (what the certified search has in hand) and from the true nearest row (the bound's
ceiling).

Usage: python benchmarks/prune_fraction.py OUT.json [--fixtures DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.gpu.knn import BankIndex, candidates
from patchcore_trt.gpu.prune import norm_tiles, skippable, upper_bounds
from patchcore_trt.images import load_image
from patchcore_trt.model import PatchCoreDeploy, nearest_rows

RELEASES = ("1.2.0", "2.0.0", "2.0.0-default", "2.2.0", "2.3.3", "2.6.2", "2.6.2-default")
QUERY_BLOCK = 32


@torch.no_grad()
def patches(release_dir: Path, fixtures: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(bank [M, D], the test images' patch features [P, D]) of one golden checkpoint."""
    spec = read_checkpoint(release_dir / "model.ckpt")
    model = PatchCoreDeploy(spec).eval()
    files = np.load(release_dir / "forward.npz")["files"]
    images = torch.stack([torch.from_numpy(load_image(fixtures / name)) for name in files])
    floats = images.permute(0, 3, 1, 2).float() / 255 if images.dtype == torch.uint8 else images
    embedding = model.embed(model.preprocess(floats))
    return spec.memory_bank.float(), embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]).contiguous()


def _block_fraction(skip: torch.Tensor) -> float:
    blocks = F.pad(skip, (0, 0, 0, -len(skip) % QUERY_BLOCK), value=True).view(-1, QUERY_BLOCK, skip.shape[1])
    return float(blocks.all(dim=1).float().mean())


def fractions(queries: torch.Tensor, upper: torch.Tensor, bank: torch.Tensor, block_m: int) -> dict:
    tiles = norm_tiles(bank, block_m)
    skip = skippable(queries, upper, tiles)
    by_norm = torch.argsort(queries.double().norm(dim=1))
    return {
        "tiles": skip.shape[1],
        "query_tile": float(skip.float().mean()),
        "block_tile": _block_fraction(skip),  # blocks of patches in image order
        "block_tile_norm_sorted": _block_fraction(skip[by_norm]),  # blocks of patches sorted by norm
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    default = os.environ.get("PATCHCORE_TRT_FIXTURES", "../shared/fixtures/anomalib-versions")
    parser.add_argument("--fixtures", type=Path, default=Path(default))
    args = parser.parse_args()
    results = []
    for release in RELEASES:
        bank, queries = patches(args.fixtures / release, args.fixtures)
        values, rows, _ = candidates(queries, BankIndex(bank, 1), 2)
        fp16_best = rows.gather(1, values.argmin(dim=1, keepdim=True))[:, 0]
        _, nearest = nearest_rows(queries, bank, bank.pow(2).sum(-1))
        norms = bank.double().norm(dim=1)
        row = {"release": release, "bank": list(bank.shape), "queries": len(queries)}
        row["bank_norms"] = {"min": float(norms.min()), "median": float(norms.median()), "max": float(norms.max())}
        for name, guesses in (("fp16_guess", fp16_best), ("nearest_guess", nearest)):
            upper = upper_bounds(queries, guesses, bank)
            row[name] = {str(m): fractions(queries, upper, bank, m) for m in (16, 64, 256)}
        results.append(row)
        print(json.dumps(row), flush=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps({"device": "cpu", "query_block": QUERY_BLOCK, "rows": results}, indent=1))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
