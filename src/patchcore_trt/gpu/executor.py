"""fast_model.FastPatchCore on one NVIDIA GPU, replayed as one CUDA graph per input shape.

A batch of one is launch-bound (a hundred small kernels), so each input shape is captured once and replayed
as a single graph launch. With host arrays the graph also holds the copies: the batch goes from a pinned
staging buffer to the GPU and the score and map come back into pinned buffers, all in that one launch.

Two ways in:
- ``CudaPatchCore.run(tensor)``: device-resident, uint8 [N, H, W, 3] or float32 [N, 3, H, W] on the GPU;
  returns the graph's device outputs (valid until the next call).
- ``CudaPatchCore.run_host(array)``: numpy in, numpy out (what runtime/cuda_backend.py adapts to the contract).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from patchcore_trt.errors import UserError
from patchcore_trt.gpu.fast_model import BACKBONE_DTYPES, FastPatchCore
from patchcore_trt.gpu.knn import SEARCH_MODES
from patchcore_trt.model import DeployOutput
from patchcore_trt.outputs import Postprocess, Prediction
from patchcore_trt.spec import PatchCoreSpec

_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}
MAX_CACHED_SHAPES = 8  # each captured shape holds its activations; a stream of odd sizes must not grow forever


def require_cuda() -> None:
    """Raise UserError unless this torch can run the CUDA backend here."""
    if not torch.cuda.is_available():
        raise UserError(
            f"the cuda backend needs an NVIDIA GPU and a CUDA build of PyTorch; torch {torch.__version__} sees no GPU"
        )
    if importlib.util.find_spec("triton") is None:
        raise UserError("the cuda backend needs triton (it ships with PyTorch's Linux CUDA wheels): pip install triton")


def _check_layout(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if dtype == torch.uint8 and len(shape) == 4 and shape[3] == 3 and shape[0] > 0:
        return
    if dtype == torch.float32 and len(shape) == 4 and shape[1] == 3 and shape[0] > 0:
        return
    raise UserError(
        f"cuda: expected uint8 images [N, H, W, 3] or float32 images [N, 3, H, W], got {str(dtype)[6:]} {list(shape)}"
    )


@dataclass(frozen=True)
class HostOutput:
    """Normalised score [N] and map [N, 1, h, w] in pinned host memory, valid until the next call of that shape."""

    pred_score: np.ndarray
    anomaly_map: np.ndarray

    def prediction(self, post: Postprocess) -> Prediction:
        """A Prediction that owns its arrays; labels and masks are the same float32 comparisons as on the GPU."""
        return Prediction.from_scores(self.pred_score.copy(), self.anomaly_map.copy(), post)


class _ShapeGraph:
    """One input shape: static input (and pinned staging) buffers, warm-up, then an optional graph capture."""

    def __init__(
        self,
        model: FastPatchCore,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        *,
        host: bool,
        pool: tuple[int, int] | None,
    ) -> None:
        self.model = model
        device = model.index.bank.device
        self.device_in = torch.empty(shape, dtype=dtype, device=device)
        warm_images = torch.randint(0, 256, shape, dtype=torch.uint8)  # warm-up data, not zeros
        self.device_in.copy_(warm_images if dtype == torch.uint8 else warm_images / 255)
        self.host_in = torch.empty(shape, dtype=dtype, pin_memory=True) if host else None
        self.host_score: torch.Tensor | None = None
        self.host_map: torch.Tensor | None = None
        self.captured: torch.cuda.CUDAGraph | None = None
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), _autotuned_convolutions():
            model.check_fused_backbone(self._float_images())
            warm = self._forward()  # cuDNN picks its kernels, Triton compiles, the map matrices are built
            if host:
                self.host_score = torch.empty(warm.pred_score.shape, pin_memory=True)
                self.host_map = torch.empty(warm.anomaly_map.shape, pin_memory=True)
                self.host_in.copy_(self.device_in)
            self.outputs = self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        if pool is not None:
            self.captured = torch.cuda.CUDAGraph()
            with _autotuned_convolutions(), torch.cuda.graph(self.captured, pool=pool):
                self.outputs = self._step()

    def _float_images(self) -> torch.Tensor:
        if self.device_in.dtype == torch.uint8:
            return self.device_in.permute(0, 3, 1, 2).float() / 255
        return self.device_in

    def _forward(self) -> DeployOutput:
        if self.device_in.dtype == torch.uint8:
            return self.model.forward_uint8(self.device_in)
        return self.model(self.device_in)

    def _step(self) -> DeployOutput:
        if self.host_in is not None:
            self.device_in.copy_(self.host_in, non_blocking=True)
        outputs = self._forward()
        if self.host_score is not None and self.host_map is not None:
            self.host_score.copy_(outputs.pred_score, non_blocking=True)
            self.host_map.copy_(outputs.anomaly_map, non_blocking=True)
        return outputs

    def run(self) -> DeployOutput:
        if self.captured is None:
            self.outputs = self._step()
        else:
            self.captured.replay()
        return self.outputs


@contextlib.contextmanager
def _autotuned_convolutions() -> Iterator[None]:
    # cuDNN benchmarks its algorithms for each new shape during warm-up; the graph keeps the winners.
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


class CudaPatchCore:
    """FastPatchCore on a CUDA device with a CUDA graph (and pinned buffers) per input shape.

    Args:
        spec: The fitted model.
        backbone_dtype: Backbone arithmetic: fp32, tf32, fp16 or bf16.
        search: ``exact`` or ``fast`` (see gpu/knn.py).
        device: A CUDA device; the current one by default.
        graphs: Capture CUDA graphs (off: plain eager launches, for profiling and comparison).
    """

    def __init__(
        self,
        spec: PatchCoreSpec,
        *,
        backbone_dtype: str = "fp16",
        search: str = "exact",
        device: torch.device | str | None = None,
        graphs: bool = True,
        map_at_input_size: bool = False,
    ) -> None:
        require_cuda()
        if backbone_dtype not in BACKBONE_DTYPES:
            raise UserError(f"cuda: backbone dtype {backbone_dtype!r} is not one of {', '.join(BACKBONE_DTYPES)}")
        if search not in SEARCH_MODES:
            raise UserError(f"cuda: search {search!r} is not one of {', '.join(SEARCH_MODES)}")
        self.device = torch.device(device if device is not None else "cuda")
        if self.device.type != "cuda":
            raise UserError(f"cuda: the cuda backend runs on CUDA devices, not {self.device}")
        if self.device.index is None:  # tensors report 'cuda:N': compare like with like
            self.device = torch.device("cuda", torch.cuda.current_device())
        with torch.cuda.device(self.device):
            self.model = FastPatchCore(
                spec,
                backbone_dtype=backbone_dtype,
                search=search,
                device=self.device,
                map_at_input_size=map_at_input_size,
            ).eval()
            self._pool = torch.cuda.graph_pool_handle() if graphs else None
        self._graphs: OrderedDict[tuple[tuple[int, ...], torch.dtype, bool], _ShapeGraph] = OrderedDict()

    def _graph_for(self, shape: tuple[int, ...], dtype: torch.dtype, host: bool) -> _ShapeGraph:
        _check_layout(shape, dtype)
        key = (shape, dtype, host)
        if key in self._graphs:
            self._graphs.move_to_end(key)
        else:
            if len(self._graphs) >= MAX_CACHED_SHAPES:
                self._graphs.popitem(last=False)
            with torch.cuda.device(self.device):
                self._graphs[key] = _ShapeGraph(self.model, shape, dtype, host=host, pool=self._pool)
        return self._graphs[key]

    def run(self, images: torch.Tensor) -> DeployOutput:
        """Device-resident inference. The outputs live in graph memory that every shape's graph shares: read
        (or clone) them before the next call."""
        if images.device != self.device:
            raise UserError(f"cuda: images are on {images.device}, the model on {self.device}")
        graph = self._graph_for(tuple(images.shape), images.dtype, host=False)
        graph.device_in.copy_(images)
        return graph.run()

    def run_host(self, images: np.ndarray) -> HostOutput:
        """Host arrays in and out; the upload and download are part of the graph."""
        dtype = _TORCH_DTYPES.get(images.dtype, torch.float64)  # float64 and others fail the layout check
        graph = self._graph_for(tuple(images.shape), dtype, host=True)
        np.copyto(graph.host_in.numpy(), images)
        graph.run()
        torch.cuda.current_stream(self.device).synchronize()
        return HostOutput(graph.host_score.numpy(), graph.host_map.numpy())

    def close(self) -> None:
        self._graphs.clear()
