"""GPU check of the memory-bank search alone: knn.nearest (exact, fast) against the FP32 search of the deploy
model, plus the candidate kernel's speed per tile shape next to a cuBLAS FP16 product of the same size.

Usage: python benchmarks/check_search.py OUT.json [--tune]
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import asdict

import torch
import triton.testing

from patchcore_trt.demo.synthetic_model import synthetic_spec, texture_images
from patchcore_trt.gpu.knn import CANDIDATES_PER_TILE, BankIndex, certified_pass, float32_matmul, nearest
from patchcore_trt.gpu.knn_triton import TileConfig, tile_candidates
from patchcore_trt.model import MemoryBankSearch

SHAPES = [(1024, 16384), (16384, 16384), (4096, 32768), (65536, 32768)]  # (patches, bank): batch 1 / 16
CONFIGS = [
    TileConfig(128, 128, 64, 8, 8, 3),
    TileConfig(128, 128, 64, 8, 4, 4),
    TileConfig(128, 256, 64, 8, 8, 3),
    TileConfig(256, 128, 64, 8, 8, 3),
    TileConfig(64, 256, 64, 8, 4, 4),
    TileConfig(128, 64, 64, 8, 4, 4),
]


def accuracy(queries: torch.Tensor, index: BankIndex, label: str) -> list[dict]:
    with float32_matmul():
        ref_dist, ref_rows = MemoryBankSearch(index.bank).nearest(queries)
        uncertified = float(certified_pass(queries, index)[2].float().mean())
        rows = []
        for mode in ("certified", "fp16"):
            dist, found = nearest(queries, index, mode)
            rows.append(
                {
                    "queries": label,
                    "mode": mode,
                    "patches": len(queries),
                    "bank": index.bank_size,
                    "max_rel_dist_error": float(((dist - ref_dist).abs() / ref_dist.clamp_min(1e-12)).max()),
                    "max_abs_dist_error": float((dist - ref_dist).abs().max()),
                    "row_mismatch": int((found != ref_rows).sum()),
                    **({"uncertified_share": uncertified} if mode == "certified" else {}),
                }
            )
            print(rows[-1], flush=True)
    return rows


def speed(patches: int, bank: int, configs: list[TileConfig]) -> list[dict]:
    queries = torch.randn(patches, 1536, device="cuda").half()
    table = torch.randn(bank, 1536, device="cuda").half()
    sq = table.float().pow(2).sum(-1)
    factor = torch.tensor([2.0], device="cuda")
    flop = 2 * patches * bank * 1536
    rows = []
    cublas = triton.testing.do_bench(lambda: torch.mm(queries, table.T), warmup=50, rep=300, return_mode="median")
    rows.append(
        {"patches": patches, "bank": bank, "kernel": "cuBLAS fp16 mm only", "ms": cublas, "tflops": flop / cublas / 1e9}
    )
    for config in configs:
        for keep in (1, CANDIDATES_PER_TILE):
            ms = triton.testing.do_bench(
                functools.partial(tile_candidates, queries, table, sq, keep, factor, config),
                warmup=50,
                rep=300,
                return_mode="median",
            )
            rows.append(
                {
                    "patches": patches,
                    "bank": bank,
                    "kernel": f"triton keep={keep}",
                    **asdict(config),
                    "ms": ms,
                    "tflops": flop / ms / 1e9,
                }
            )
    for row in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def main() -> None:
    out, tune = sys.argv[1], "--tune" in sys.argv
    results: dict[str, list] = {"accuracy": [], "speed": []}
    torch.manual_seed(0)
    gaussian_bank = torch.randn(16384, 1536)
    results["accuracy"] += accuracy(
        torch.randn(4096, 1536, device="cuda"), BankIndex(gaussian_bank, 9, "cuda"), "gaussian"
    )
    spec = synthetic_spec(16384, (256, 256), device="cuda")
    index = BankIndex(spec.memory_bank, 9, "cuda")
    from patchcore_trt.model import PatchCoreDeploy

    deploy = PatchCoreDeploy(spec).cuda().eval()
    images = torch.cat([texture_images(8, (256, 256), seed=99), texture_images(8, (256, 256), seed=98, defects=True)])
    with torch.no_grad(), float32_matmul():
        embedding = deploy.embed(deploy.preprocess(images.cuda().permute(0, 3, 1, 2).float() / 255))
    results["accuracy"] += accuracy(embedding.permute(0, 2, 3, 1).reshape(-1, 1536).contiguous(), index, "features")
    for patches, bank in SHAPES:
        results["speed"] += speed(patches, bank, CONFIGS if tune else [TileConfig()])
    with open(out, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
