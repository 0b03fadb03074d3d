"""Stress test of the cuda backend's certified exact search against anomalib's FP32 search (its euclidean_dist
and min(1) tie rule: model.nearest_rows), on real trained banks and on synthetic WRN50-like banks.

Per bank: rows that differ from the reference (must be 0; a differing row whose float64 distance is not within
FP32 rounding of the reference row's is counted apart as ``rows_wrong``), max |d distance|, the share of queries
the certificate could not prove (they cost a full FP32 scan each), and the whole model's max |d score| and
|d map| against the FP32 deploy model. Then the neighbour-table build (candidate kernel + FP32 re-rank) timed,
against the FP32 M x M search where ``--table-reference`` asks; and, on a GPU, the executor fed two input
resolutions interleaved at two batch sizes, with its capture count (it must stay at one per batch size).

Results go to OUT/exact_stress.json after every step (versions, GPU, git commit, the exact command); a rerun
with the same --out skips the steps already there.

Usage (from the repository root):
  python benchmarks/exact_stress.py --out runs/exact                     # on the GPU: 16k and 1M banks
  python benchmarks/exact_stress.py --out /tmp/exact --dry-run           # on a CPU, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.demo.synthetic_model import synthetic_spec, texture_images
from patchcore_trt.files import write_bytes_atomic
from patchcore_trt.gpu.fast_model import FastPatchCore
from patchcore_trt.gpu.knn import BankIndex, certified_pass, float32_matmul, nearest, neighbour_table
from patchcore_trt.images import load_image
from patchcore_trt.model import MemoryBankSearch, PatchCoreDeploy, nearest_rows

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("PATCHCORE_TRT_FIXTURES", ROOT.parent / "shared" / "fixtures" / "anomalib-versions"))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def environment() -> dict[str, Any]:
    import triton

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {
        "command": " ".join([sys.executable, *sys.argv]),
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "triton": triton.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


class Results:
    """The JSON file, rewritten atomically after every step; steps already in it are skipped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"steps": {}}
        self.data.setdefault("calls", []).append(environment())
        self.save()

    def save(self) -> None:
        write_bytes_atomic(self.path, json.dumps(self.data, indent=2).encode())

    def step(self, name: str, run) -> None:
        if name in self.data["steps"]:
            log(f"{name}: done in an earlier call, skipped")
            return
        log(f"{name} ...")
        start = time.perf_counter()
        result = run()
        result["seconds"] = round(time.perf_counter() - start, 3)
        self.data["steps"][name] = result
        self.save()
        log(f"{name}: {result}")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def search_figures(queries: torch.Tensor, index: BankIndex) -> dict[str, Any]:
    """The certified search against the reference on these queries."""
    with float32_matmul():  # set-up of a reference, not a served call
        expected, expected_rows = nearest_rows(queries, index.bank, index.bank_sq)
    _, _, flagged, _ = certified_pass(queries, index)
    distances, rows = nearest(queries, index)
    differ = (rows != expected_rows).nonzero()[:, 0]
    wrong = 0
    if len(differ):  # differing rows: within FP32 rounding of each other (a tie), or a wrong answer
        x = queries[differ].double()
        ours = (x - index.bank[rows[differ]].double()).norm(dim=-1)
        theirs = (x - index.bank[expected_rows[differ]].double()).norm(dim=-1)
        wrong = int(((ours - theirs) > 1e-5 * theirs.clamp_min(1e-3)).sum())
    return {
        "queries": len(queries),
        "bank": index.bank_size,
        "rows_differing": len(differ),
        "rows_wrong": wrong,
        "max_abs_distance_difference": float((distances - expected).abs().max()),
        "uncertified_share": float(flagged.float().mean()),
    }


def model_figures(spec, images: torch.Tensor, device: str) -> dict[str, Any]:
    """The fast model (exact mode, FP32 backbone) against the FP32 deploy model on the same images."""
    with torch.no_grad():
        deploy = PatchCoreDeploy(spec).to(device).eval()
        with float32_matmul():
            expected = deploy(images)
            queries = deploy.embed(deploy.preprocess(images))
        fast = FastPatchCore(spec, backbone_dtype="fp32", device=device).eval()
        got = fast(images)
    patches = queries.permute(0, 2, 3, 1).reshape(-1, queries.shape[1]).contiguous()
    return {
        **search_figures(patches, fast.index),
        "max_abs_score_difference": float((got.pred_score - expected.pred_score).abs().max()),
        "max_abs_map_difference": float((got.anomaly_map - expected.anomaly_map).abs().max()),
        "labels_differing": int((got.pred_label != expected.pred_label).sum()),
    }


def golden_step(release: str, device: str) -> dict[str, Any]:
    folder = FIXTURES / release
    spec = read_checkpoint(folder / "model.ckpt", trust_pickled_code=False)
    files = np.load(folder / "forward.npz")["files"]
    images = torch.from_numpy(np.stack([load_image(FIXTURES / name) for name in files]))  # float32 NCHW
    return model_figures(spec, images.to(device), device)


def synthetic_step(bank: int, size: int, batch: int, device: str, backbone: str) -> dict[str, Any]:
    spec = synthetic_spec(bank, (size, size), backbone=backbone, device=device)
    images = torch.cat(
        [texture_images(batch, (size, size), seed=21), texture_images(batch, (size, size), seed=22, defects=True)]
    )
    return model_figures(spec, images.to(device).permute(0, 3, 1, 2).float() / 255, device)


def table_step(bank: int, dim: int, device: str, reference: bool) -> dict[str, Any]:
    """The neighbour table of a WRN50-like bank (post-ReLU-like: non-negative with a spread of scales)."""
    generator = torch.Generator(device=device).manual_seed(0)
    rows = torch.randn(bank, dim, generator=generator, device=device).relu_() * torch.rand(
        dim, generator=generator, device=device
    )
    index = BankIndex(rows, 1, device)  # k=1: no table yet
    sync()
    start = time.perf_counter()
    table = neighbour_table(index, 9)
    sync()
    result: dict[str, Any] = {"bank": bank, "dim": dim, "k": 9, "table_seconds": round(time.perf_counter() - start, 3)}
    if reference:
        start = time.perf_counter()
        with float32_matmul():
            expected = MemoryBankSearch(index.bank).k_nearest_indices(index.bank, 9)
        sync()
        result["fp32_mxm_seconds"] = round(time.perf_counter() - start, 3)
        result["rows_differing_from_fp32_mxm"] = int((table != expected).any(dim=1).sum())
    return result


def graphs_step(bank: int, size: int, calls: int) -> dict[str, Any]:
    """Two camera resolutions interleaved at batches 1 and 4: the capture count must stay at one per batch."""
    from patchcore_trt.runtime.cuda_backend import CudaBackend

    backend = CudaBackend.from_spec(synthetic_spec(bank, (size, size), device="cuda"), mode="exact")
    shapes = [(1, 480, 640, 3), (1, 1080, 1920, 3), (4, 480, 640, 3), (4, 1080, 1920, 3)]
    rng = np.random.default_rng(0)
    inputs = {shape: rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes}
    seconds: dict[str, list[float]] = {str(shape): [] for shape in shapes}
    for call in range(calls):
        shape = shapes[call % len(shapes)]
        start = time.perf_counter()
        backend.predict(inputs[shape])
        seconds[str(shape)].append(time.perf_counter() - start)
    return {
        "calls": calls,
        "captures": backend.captures,
        "median_ms_after_first": {k: round(1e3 * float(np.median(v[1:])), 3) for k, v in seconds.items()},
        "first_call_ms": {k: round(1e3 * v[0], 3) for k, v in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="small banks on whatever device is here (CPU: <1 min)")
    parser.add_argument("--table-reference", action="store_true", help="also time the FP32 M x M search (minutes)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out / "exact_stress.json")
    releases = ["2.6.2"] if args.dry_run else sorted(p.name for p in FIXTURES.iterdir() if (p / "model.ckpt").is_file())
    for release in releases:
        results.step(f"golden {release}", lambda release=release: golden_step(release, device))
    banks = [(512, 64, 2)] if args.dry_run else [(16384, 256, 8), (1 << 20, 256, 8)]
    backbone = "resnet18" if args.dry_run else "wide_resnet50_2"
    for bank, size, batch in banks:
        results.step(
            f"synthetic {backbone} M={bank} {size}px",
            lambda b=bank, s=size, n=batch: synthetic_step(b, s, n, device, backbone),
        )
    for bank in [2048] if args.dry_run else [16384, 1 << 20]:
        reference = args.table_reference or bank <= 16384
        results.step(f"neighbour table M={bank}", lambda b=bank, r=reference: table_step(b, 1536, device, r))
    if device == "cuda":
        results.step("graphs: two resolutions", lambda: graphs_step(16384, 256, 12 if args.dry_run else 40))
    else:
        log("graphs: two resolutions needs a GPU (CudaPatchCore); skipped")


if __name__ == "__main__":
    main()
