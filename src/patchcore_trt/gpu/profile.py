"""Where the fast path's time goes: torch.profiler over eager runs, kernel time per stage and per kernel; and
what the host-to-host path costs beside the device-resident one (``host_vs_device``).

The stages are FastPatchCore.forward's record_function ranges; inside ``backbone+embed`` the kernels are split by
name into the backbone's (convolutions, their fused epilogues, layout changes, pooling) and the embedding's
(average pooling, upsampling, concatenation, casts). The graph replay (what the backend runs) is timed beside.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
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


def _rate(step: Callable[[int], Any], finish: Callable[[], None], batch: int, iters: int, max_seconds: float) -> float:
    """Images per second over up to ``iters`` calls of ``step(i)`` (after warm-up), ``finish`` draining what is
    still in flight; bounded by ``max_seconds``."""
    for i in range(5):
        step(i)
    finish()
    start = time.perf_counter()
    calls = 0
    while calls < iters and (calls < 10 or time.perf_counter() - start < max_seconds):
        step(calls)
        calls += 1
    finish()
    return calls * batch / (time.perf_counter() - start)


def host_vs_device(
    backend: Any, batches: list[np.ndarray], *, iters: int = 200, max_seconds: float = 10.0, depth: int = 2
) -> dict[str, float]:
    """img/s of one CudaBackend on the same uint8 batches, device-resident and host-to-host, each of:

    - ``*_predict``: ``predict`` one call after another (the contract; a caller waits for each batch);
    - ``*_pipelined``: ``depth`` batches in flight through the executor's ``submit`` (host: the producer writes
      each batch into a lent slot, as a decoder would), the contract's NaN check on each result.

    Every mode reads the results into host memory and checks them as ``predict`` does; ``host_pipelined`` over
    ``device_predict`` is the figure the host path is held to (within 5%)."""
    executor = backend.executor
    on_device = [torch.from_numpy(batch).to(executor.device) for batch in batches]
    rotation = len(batches)

    def pipelined(submit: Callable[[int], Any]) -> tuple[Callable[[int], Any], Callable[[], None]]:
        flight: deque[Any] = deque()

        def step(i: int) -> None:
            flight.append(submit(i % rotation))
            if len(flight) >= depth:
                flight.popleft().result().non_finite()

        def finish() -> None:
            while flight:
                flight.popleft().result().non_finite()

        return step, finish

    def host_submit(i: int) -> Any:
        slot = executor.ring.lend(batches[i].shape)
        np.copyto(slot, batches[i])
        return executor.submit(slot)

    def rate(step: Callable[[int], Any], finish: Callable[[], None] = lambda: None) -> float:
        return _rate(step, finish, len(batches[0]), iters, max_seconds)

    figures = {
        "device_predict": rate(lambda i: backend.predict(on_device[i % rotation])),
        "host_predict": rate(lambda i: backend.predict(batches[i % rotation])),
        "device_pipelined": rate(*pipelined(lambda i: executor.submit_device(on_device[i]))),
        "host_pipelined": rate(*pipelined(host_submit)),
    }
    figures["host_pipelined_over_device_predict"] = figures["host_pipelined"] / figures["device_predict"]
    figures["host_predict_over_device_predict"] = figures["host_predict"] / figures["device_predict"]
    return figures


def graph_memory(executor: CudaPatchCore) -> dict[str, float]:
    """GPU memory (MiB) and seconds to capture a graph for every batch size 1..max_batch."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(executor.device), torch.cuda.memory_reserved(executor.device)
    start = time.perf_counter()
    executor.capture(range(1, executor.max_batch + 1))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    after = torch.cuda.memory_allocated(executor.device), torch.cuda.memory_reserved(executor.device)
    mib = 2**20
    return {
        "max_batch": executor.max_batch,
        "graphs": executor.captures,
        "capture_s": seconds,
        "allocated_mib_added": (after[0] - before[0]) / mib,
        "reserved_mib_added": (after[1] - before[1]) / mib,
    }
