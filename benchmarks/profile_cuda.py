"""Where the CUDA backend's time goes: GPU time per stage and per kernel (CudaBackend.profile, gpu/profile.py); or,
with --host-vs-device, img/s host-to-host beside device-resident on the same backend and images (one command).

Usage: python benchmarks/profile_cuda.py OUT.txt [precision,...] [search]
       python benchmarks/profile_cuda.py --host-vs-device OUT.json [--mode exact,fast] [--batches 1,16,64]
           [--size 256] [--bank 16384] [--max-batch 64] [--iters 200]

The second form writes, per mode and batch, device_predict / host_predict (the contract, one call after another),
device_pipelined / host_pipelined (two batches in flight; the host batches written into the backend's pinned
slots) and host_pipelined_over_device_predict (the 5% target: at least 0.95), plus the GPU memory and time of
capturing a graph for every batch size 1..max-batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from patchcore_trt.bench.matrix import input_pool
from patchcore_trt.demo.synthetic_model import synthetic_spec, texture_images
from patchcore_trt.gpu.profile import graph_memory, host_vs_device
from patchcore_trt.runtime.cuda_backend import CudaBackend

WORKLOADS = [((256, 256), 16384, 1), ((256, 256), 16384, 16), ((512, 512), 32768, 1), ((512, 512), 32768, 16)]


def stages() -> None:
    out = sys.argv[1]
    precisions = sys.argv[2].split(",") if len(sys.argv) > 2 else ["fp16"]
    search = sys.argv[3] if len(sys.argv) > 3 else "certified"
    lines = []
    for size, bank, batch in WORKLOADS:
        spec = synthetic_spec(bank, size, device="cuda")
        images = texture_images(batch, size, seed=7).cuda()
        for precision in precisions:
            backend = CudaBackend.from_spec(spec, backbone_dtype=precision, search=search)
            found = backend.profile(images, runs=5)
            head = f"{size[0]}x{size[1]} bank {bank} batch {batch} {precision} {search}"
            lines.append(
                f"== {head}: graph replay {found['graph_replay_ms']:.3f} ms; "
                f"GPU kernel time per eager run {found['eager_gpu_ms']:.3f} ms"
            )
            lines += [f"   stage {name:15s} {ms:8.3f} ms" for name, ms in found["stages_ms"].items()]
            lines += [f"   {k['ms']:8.3f} ms  {k['stage']:10s} {k['kernel'][:110]}" for k in found["top_kernels"]]
            print("\n".join(lines[-22:]), flush=True)
            backend.close()
            torch.cuda.empty_cache()
    with open(out, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def host_and_device() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host-vs-device", dest="out", type=Path, required=True)
    parser.add_argument("--mode", default="exact,fast")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--bank", type=int, default=16384)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    size = (args.size, args.size)
    batches = [int(value) for value in args.batches.split(",")]
    spec = synthetic_spec(args.bank, size, device="cuda")
    pool = input_pool(size, 2 * max(batches))  # two distinct batches of the largest size, rotated
    rows = []
    for mode in args.mode.split(","):
        backend = CudaBackend.from_spec(spec, mode=mode, max_batch=args.max_batch)
        memory = graph_memory(backend.executor)
        print(f"{mode}: graphs 1..{args.max_batch}: {memory}", flush=True)
        for batch in batches:
            chunks = [pool[i : i + batch] for i in range(0, len(pool) - batch + 1, batch)][:8]
            figures = host_vs_device(backend, chunks, iters=args.iters)
            rows.append({"mode": mode, "size": args.size, "bank": args.bank, "batch": batch, **figures})
            print(f"{mode} b{batch}: " + ", ".join(f"{key} {value:,.3f}" for key, value in figures.items()), flush=True)
        rows.append({"mode": mode, "graph_memory": memory})
        backend.close()
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    host_and_device() if "--host-vs-device" in sys.argv else stages()
