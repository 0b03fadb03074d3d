"""Where the CUDA backend's time goes: torch.profiler over eager runs, GPU time per stage and per kernel.

The stages are the record_function ranges of FastPatchCore.forward; the graph replay time (what bench
reports) is measured beside it. Usage: python benchmarks/profile_cuda.py OUT.txt [precision,...] [search]
"""

from __future__ import annotations

import functools
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from patchcore_trt.bench.matrix import device_ms
from patchcore_trt.demo.synthetic_model import synthetic_spec, texture_images
from patchcore_trt.gpu.executor import CudaPatchCore

WORKLOADS = [((256, 256), 16384, 1), ((256, 256), 16384, 16), ((512, 512), 32768, 1), ((512, 512), 32768, 16)]
STAGES = ("preprocess", "backbone+embed", "search", "score+map")


def kernel_times(prof: profile, runs: int) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """GPU kernel time per stage (kernels inside each stage's range) and per kernel name, ms per run."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ranges = [(e.name, e.time_range.start, e.time_range.end) for e in events if e.name in STAGES]
    stages = dict.fromkeys(STAGES, 0.0)
    per_kernel: dict[str, list[float]] = {}
    for event in events:
        if event.name in STAGES:
            continue
        ms = event.time_range.elapsed_us() / 1e3 / runs
        stage = next((name for name, lo, hi in ranges if lo <= event.time_range.start < hi), "other")
        stages[stage] = stages.get(stage, 0.0) + ms
        per_kernel.setdefault(event.name, []).append(ms)
    kernels = sorted(((name, sum(t), len(t) // runs) for name, t in per_kernel.items()), key=lambda k: -k[1])
    return stages, kernels


def main() -> None:
    out = sys.argv[1]
    precisions = sys.argv[2].split(",") if len(sys.argv) > 2 else ["fp16"]
    search = sys.argv[3] if len(sys.argv) > 3 else "exact"
    lines = []
    runs = 5
    for size, bank, batch in WORKLOADS:
        spec = synthetic_spec(bank, size, device="cuda")
        images = texture_images(batch, size, seed=7).cuda()
        for precision in precisions:
            runner = CudaPatchCore(spec, backbone_dtype=precision, search=search)
            replay = device_ms(functools.partial(runner.run, images))
            for _ in range(3):
                runner.model.forward_uint8(images)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(runs):
                    runner.model.forward_uint8(images)
                torch.cuda.synchronize()
            stages, kernels = kernel_times(prof, runs)
            head = f"{size[0]}x{size[1]} bank {bank} batch {batch} {precision} {search}"
            total = sum(stages.values())
            lines.append(f"== {head}: graph replay {replay:.3f} ms; GPU kernel time per eager run {total:.3f} ms")
            lines += [f"   stage {name:15s} {ms:8.3f} ms" for name, ms in stages.items()]
            lines += [f"   {ms:8.3f} ms {count:4d}x  {name[:120]}" for name, ms, count in kernels[:22]]
            print("\n".join(lines[-29:]), flush=True)
            del runner
            torch.cuda.empty_cache()
    with open(out, "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
