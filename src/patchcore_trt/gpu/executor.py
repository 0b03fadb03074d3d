"""fast_model.FastPatchCore on one NVIDIA GPU, replayed as one CUDA graph per batch size.

A batch of one is launch-bound (a hundred small kernels), so the model is captured once per batch size and
replayed as a single graph launch. Graphs are keyed by the batch size alone: the input is converted and resized
to the model's resolution outside the graph (a few kernels), so any input size, and any mix of camera
resolutions, replays the same graphs; ``captures`` counts the captures (a benchmark reads it). With host
arrays the upload goes through a pinned staging buffer, and the graph holds the score and map downloads into
pinned buffers.

Two ways in:
- ``CudaPatchCore.run(tensor)``: device-resident, uint8 [N, H, W, 3] or float32 [N, 3, H, W] on the GPU;
  returns the graph's device outputs (valid until the next call).
- ``CudaPatchCore.run_host(array)``: numpy in, numpy out (what runtime/cuda_backend.py adapts to the contract).

Both take a lock: one call at a time per CudaPatchCore (a graph's buffers are shared by its calls), so threads
may share one; the capture runs on a private stream under the lock (``capture_error_mode="thread_local"``), so
other threads' CUDA work cannot break it.
"""

from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
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
MAX_CACHED_BATCHES = 8  # each captured batch size holds its activations; a stream of sizes must not grow forever
MAX_STAGING = 4  # pinned upload buffers, one per recent raw input shape


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
    """Normalised score [N] and map [N, 1, h, w] on the host."""

    pred_score: np.ndarray
    anomaly_map: np.ndarray

    def prediction(self, post: Postprocess) -> Prediction:
        """The Prediction; labels and masks are the same float32 comparisons as on the GPU."""
        return Prediction.from_scores(self.pred_score, self.anomaly_map, post)


class _BatchGraph:
    """One batch size: a static [N, 3, h, w] float32 input at the model's resize resolution, warm-up, then an
    optional graph capture of everything after the resize (with the downloads to pinned buffers when ``host``)."""

    def __init__(
        self, model: FastPatchCore, batch: int, input_size: tuple[int, int], *, host: bool, pool: tuple[int, int] | None
    ) -> None:
        self.model = model
        self.input_size = input_size
        device = model.index.bank.device
        size = tuple(model.preprocess.settings.resize)
        warm_images = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8)  # warm-up data, not zeros
        self.device_in = (warm_images / 255).to(device)
        self.host_score: torch.Tensor | None = None
        self.host_map: torch.Tensor | None = None
        self.captured: torch.cuda.CUDAGraph | None = None
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            model.check_fused_backbone(self.device_in)
            warm = self._forward()  # cuDNN picks its kernels, Triton compiles, the map matrices are built
            if host:
                self.host_score = torch.empty(warm.pred_score.shape, pin_memory=True)
                self.host_map = torch.empty(warm.anomaly_map.shape, pin_memory=True)
            self.outputs = self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        if pool is not None:
            self.captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.captured, pool=pool, capture_error_mode="thread_local"):
                self.outputs = self._step()

    def _forward(self) -> DeployOutput:
        return self.model.forward_resized(self.device_in, self.input_size)

    def _step(self) -> DeployOutput:
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


class CudaPatchCore:
    """FastPatchCore on a CUDA device with a CUDA graph (and pinned buffers) per input shape.

    Args:
        spec: The fitted model.
        backbone_dtype: Backbone arithmetic: fp32, tf32, fp16 or bf16.
        search: ``exact`` or ``fast`` (see gpu/knn.py).
        device: A CUDA device; the current one by default.
        graphs: Capture CUDA graphs (off: plain eager launches, for profiling and comparison).
        neighbours: The bank's neighbour table, if already computed (knn.BankIndex; by default it is built).
    """

    def __init__(
        self,
        spec: PatchCoreSpec,
        *,
        backbone_dtype: str = "fp16",
        search: str = "certified",
        device: torch.device | str | None = None,
        graphs: bool = True,
        map_at_input_size: bool = False,
        neighbours: torch.Tensor | None = None,
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
                neighbours=neighbours,
            ).eval()
            self._pool = torch.cuda.graph_pool_handle() if graphs else None
        self._graphs: OrderedDict[tuple[int, tuple[int, int] | None, bool], _BatchGraph] = OrderedDict()
        self._staging: OrderedDict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.captures = 0  # graphs captured (or, without graphs, batch sizes warmed up) so far

    def _graph_for(self, batch: int, input_size: tuple[int, int], host: bool) -> _BatchGraph:
        # The map at the input's size is interpolated inside the graph: then the size is part of the key.
        key = (batch, input_size if self.model.map_at_input_size else None, host)
        if key in self._graphs:
            self._graphs.move_to_end(key)
        else:
            if len(self._graphs) >= MAX_CACHED_BATCHES:
                self._graphs.popitem(last=False)
            with torch.cuda.device(self.device):
                self._graphs[key] = _BatchGraph(self.model, batch, input_size, host=host, pool=self._pool)
            self.captures += 1
        return self._graphs[key]

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC or float32 NCHW on the device -> float32 [N, 3, resize], eagerly (outside any graph)."""
        floats = images.permute(0, 3, 1, 2).float().div_(255) if images.dtype == torch.uint8 else images
        return self.model.preprocess.resize(floats)

    def _infer(self, images: torch.Tensor, host: bool) -> _BatchGraph:
        input_size = (images.shape[1], images.shape[2]) if images.dtype == torch.uint8 else tuple(images.shape[-2:])
        graph = self._graph_for(images.shape[0], input_size, host)
        with torch.no_grad():
            graph.device_in.copy_(self._resized(images))
        graph.run()
        return graph

    def run(self, images: torch.Tensor) -> DeployOutput:
        """Device-resident inference. The outputs live in graph memory that every batch size's graph shares:
        read (or clone) them before the next call."""
        if images.device != self.device:
            raise UserError(f"cuda: images are on {images.device}, the model on {self.device}")
        _check_layout(tuple(images.shape), images.dtype)
        with self._lock, torch.cuda.device(self.device):
            return self._infer(images, host=False).outputs

    def run_host(self, images: np.ndarray) -> HostOutput:
        """Host arrays in and out: a pinned upload, the graph, the downloads inside it; the returned arrays are
        the caller's own."""
        dtype = _TORCH_DTYPES.get(images.dtype, torch.float64)  # float64 and others fail the layout check
        _check_layout(tuple(images.shape), dtype)
        with self._lock, torch.cuda.device(self.device):
            staging = self._staging_for(tuple(images.shape), dtype)
            np.copyto(staging.numpy(), images)
            graph = self._infer(staging.to(self.device, non_blocking=True), host=True)
            torch.cuda.current_stream(self.device).synchronize()
            return HostOutput(graph.host_score.numpy().copy(), graph.host_map.numpy().copy())

    def _staging_for(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (shape, dtype)
        if key in self._staging:
            self._staging.move_to_end(key)
        else:
            if len(self._staging) >= MAX_STAGING:
                self._staging.popitem(last=False)
            self._staging[key] = torch.empty(shape, dtype=dtype, pin_memory=True)
        return self._staging[key]

    def close(self) -> None:
        with self._lock:
            self._graphs.clear()
            self._staging.clear()
