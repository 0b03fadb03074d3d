"""Where the CUDA backend's time goes: GPU time per stage and per kernel (CudaBackend.profile, gpu/profile.py).

Usage: python benchmarks/profile_cuda.py OUT.txt [precision,...] [search]
"""

from __future__ import annotations

import sys

import torch

from patchcore_trt.demo.synthetic_model import synthetic_spec, texture_images
from patchcore_trt.runtime.cuda_backend import CudaBackend

WORKLOADS = [((256, 256), 16384, 1), ((256, 256), 16384, 16), ((512, 512), 32768, 1), ((512, 512), 32768, 16)]


def main() -> None:
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


if __name__ == "__main__":
    main()
