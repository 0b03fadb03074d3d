"""What a benchmark runs: one settings type and its defaults, shared by the library and the CLI (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PRECISION = {"cuda": "fp16"}  # every other backend: fp32
# Peers the bench times beside the registry's backends: anomalib's own module, eager and under
# torch.compile(mode="reduce-overhead"), and ONNX Runtime's CUDA execution provider on patchcore-trt's export.
PEERS = ("anomalib", "anomalib-compile", "onnxruntime-cuda")
GPU_BACKENDS = ("cuda", "tensorrt", "anomalib-compile", "onnxruntime-cuda")
MAX_BANK = 1 << 24  # 16.8M rows x 1536 floats is 100 GB: beyond any GPU's memory
MAX_IMAGES = 4096


@dataclass(frozen=True)
class BenchSettings:
    """What to run. ``banks`` pairs with ``sizes`` for synthetic models (one value: all sizes); no
    ``precisions`` means each backend's default (DEFAULT_PRECISION)."""

    backends: tuple[str, ...] = ("cuda",)
    precisions: tuple[str, ...] = ()
    searches: tuple[str, ...] = ("certified",)
    sizes: tuple[tuple[int, int], ...] = ((256, 256),)
    batches: tuple[int, ...] = (1,)
    banks: tuple[int, ...] = (16384,)
    copies: tuple[str, ...] = ("host", "device")
    warmup: int = 10
    iters: int = 100
    max_seconds: float = 10.0
    images: int = 16
    baseline: bool = True
    graphs: bool = True
    backbone: str = "wide_resnet50_2"
