"""Where the fast path's GPU time goes: torch.profiler over eager runs, kernel time per stage and per kernel.

The stages are FastPatchCore.forward's record_function ranges; inside ``backbone+embed`` the kernels are split by
name into the backbone's (convolutions, their fused epilogues, layout changes, pooling) and the embedding's
(average pooling, upsampling, concatenation, casts). The graph replay (what the backend runs) is timed beside.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from patchcore_trt.gpu.executor import CudaPatchCore

STAGES = ("preprocess", "backbone+embed", "search", "score+map")
_BACKBONE = re.compile(r"conv|xmma|cudnn|nvjet|gemm|cutlass|implicit|nchw|nhwc|max_pool|relu|bias|add", re.I)
_EMBED = re.compile(r"avg_pool|upsample|CatArray|interpolate|direct_copy|copy_kernel", re.I)


def device_ms(run: Any, reps: int = 50) -> float:
    """Median GPU time of ``run`` in ms, CUDA events around each call (for graph replays: no host overhead)."""
    run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def stage_profile(executor: CudaPatchCore, images: torch.Tensor, runs: int = 5, top: int = 15) -> dict[str, Any]:
    """GPU time per stage and the ``top`` kernels of ``runs`` eager forwards of uint8 [N, H, W, 3] ``images`` on
    the GPU, and the graph replay's median time."""
    replay = device_ms(lambda: executor.run(images), reps=30)
    model = executor.model
    for _ in range(3):
        model.forward_uint8(images)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            model.forward_uint8(images)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ranges = [(e.name, e.time_range.start, e.time_range.end) for e in events if e.name in STAGES]
    stages: dict[str, float] = {}
    kernels: dict[tuple[str, str], float] = {}
    for event in events:
        if event.name in STAGES:
            continue
        ms = event.time_range.elapsed_us() / 1e3 / runs
        stage = next((name for name, lo, hi in ranges if lo <= event.time_range.start < hi), "other")
        if stage == "backbone+embed":
            stage = "embedding" if _EMBED.search(event.name) else "backbone"
        stages[stage] = stages.get(stage, 0.0) + ms
        kernels[(stage, event.name)] = kernels.get((stage, event.name), 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda item: -item[1])[:top]
    return {
        "graph_replay_ms": replay,
        "eager_gpu_ms": sum(stages.values()),
        "stages_ms": stages,
        "top_kernels": [{"stage": s, "kernel": k[:140], "ms": ms} for (s, k), ms in ranked],
    }
