"""fast_model.FastPatchCore on one NVIDIA GPU, replayed as one CUDA graph per batch size.

A batch of one is launch-bound (a hundred small kernels), so the model is captured once per batch size and
replayed as a single graph launch. Graphs are keyed by the batch size alone: the input is converted and resized
to the model's resolution outside the graph (a few kernels), so any input size, and any mix of camera
resolutions, replays the same graphs; ``captures`` counts the captures (a benchmark reads it).

Graphs: one per batch size 1..``max_batch``, captured on first use or ahead by ``capture``; a larger batch runs
in chunks of ``max_batch``. Their memory: every graph reads one static input and writes one static set of outputs,
both sized for ``max_batch`` (per image 12 bytes per model pixel in, 5 bytes per map pixel out: 1.1 MiB at
256x256 with the map at the model's size), and the graphs share one memory pool, whose activations are freed at
the end of each capture and so reused by the next: device memory is about one ``max_batch`` graph's activations
whatever the number of graphs. What each further graph adds is its executable (its kernel nodes, driver memory);
benchmarks/profile_cuda.py ``--host-vs-device`` reports the memory before and after capturing 1..max_batch. The
upload ring adds three slots, each as large as the largest host batch it has carried, pinned and on the device.

Ways in:
- ``CudaPatchCore.run(tensor)``: device-resident, uint8 [N, H, W, 3] or float32 [N, 3, H, W] on the GPU;
  returns the graph's device outputs (valid until the next call).
- ``CudaPatchCore.submit(array)`` / ``run_host(array)``: numpy in, a Prediction out (what
  runtime/cuda_backend.py adapts to the contract). The upload goes through a ring of pinned slots (staging.py)
  on a copy stream the compute stream waits on; the four outputs (labels and masks computed by the graph, as
  ``PatchCoreDeploy.outputs`` computes them) are downloaded once each into a pinned block the returned
  Prediction owns, large ones from a device copy on a fetch stream while the next batch computes. ``submit``
  returns at once: a caller that submits batch i+1 before reading batch i's results overlaps its host work with
  the GPU, as do threads sharing one executor. ``submit_device(tensor)`` is the same for a batch on the GPU.

One lock serialises what touches the graphs (enqueueing their work; not the host copies, the uploads or the
waiting), so threads may share one executor; the capture runs on a private stream under the lock
(``capture_error_mode="thread_local"``), so other threads' CUDA work cannot break it.
"""

from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np
import torch

from patchcore_trt.errors import UserError
from patchcore_trt.gpu.fast_model import BACKBONE_DTYPES, FastPatchCore
from patchcore_trt.gpu.knn import SEARCH_MODES
from patchcore_trt.gpu.staging import RING_SLOTS, SlotRing, carve
from patchcore_trt.model import DeployOutput
from patchcore_trt.outputs import Prediction
from patchcore_trt.spec import PatchCoreSpec

_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}
DEFAULT_MAX_BATCH = 64  # the benchmarks' largest batch (benchmarks/h200_table.py); a server passes its own
STAGED_DOWNLOAD = 1 << 20  # output bytes from which a chunk is copied on the device and downloaded from the copy
MAX_MAP_SIZES = 4  # with the map at the input's size, graph sets kept for this many recent input sizes


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


def _input_size(images: torch.Tensor) -> tuple[int, int]:
    """(H, W) of uint8 [N, H, W, 3] or float32 [N, 3, H, W]."""
    return (images.shape[1], images.shape[2]) if images.dtype == torch.uint8 else (images.shape[2], images.shape[3])


def chunks(batch: int, most: int) -> list[tuple[int, int]]:
    """(start, stop) of the runs a batch of ``batch`` is replayed in: ``most`` images at a time, the rest last."""
    return [(start, min(start + most, batch)) for start in range(0, batch, most)]


class _Statics:
    """The static input and outputs that every graph of one map size reads and writes, at ``max_batch``."""

    def __init__(self, model: FastPatchCore, max_batch: int, input_size: tuple[int, int]) -> None:
        device = model.index.bank.device
        size = tuple(model.preprocess.settings.resize)
        warm_images = torch.randint(0, 256, (max_batch, 3, *size), dtype=torch.uint8)  # warm-up data, not zeros
        self.device_in = (warm_images / 255).to(device)
        model.check_fused_backbone(self.device_in[:1])
        probe = model.forward_resized(self.device_in[:1], input_size)
        self.outputs = DeployOutput(
            *(torch.empty((max_batch, *out.shape[1:]), dtype=out.dtype, device=device) for out in probe)
        )


class _BatchGraph:
    """One batch size: slices of the statics, warm-up, then an optional capture of everything after the resize."""

    def __init__(
        self,
        model: FastPatchCore,
        statics: _Statics,
        batch: int,
        input_size: tuple[int, int],
        pool: tuple[int, int] | None,
    ) -> None:
        self.model = model
        self.input_size = input_size
        self.device_in = statics.device_in[:batch]
        self.outputs = DeployOutput(*(out[:batch] for out in statics.outputs))
        self.captured: torch.cuda.CUDAGraph | None = None
        device = self.device_in.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            model.check_fused_backbone(self.device_in)
            self._step()  # cuDNN picks its kernels, Triton compiles, the map matrices are built
        torch.cuda.current_stream(device).wait_stream(side)
        if pool is not None:
            self.captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.captured, pool=pool, capture_error_mode="thread_local"):
                self._step()  # the model's own outputs die here: their pool memory goes to the next capture

    def _step(self) -> None:
        for static, out in zip(self.outputs, self.model.forward_resized(self.device_in, self.input_size), strict=True):
            static.copy_(out)

    def run(self) -> DeployOutput:
        if self.captured is None:
            self._step()
        else:
            self.captured.replay()
        return self.outputs


class PendingPrediction:
    """A submitted batch: ``result()`` waits for its downloads and returns its Prediction (views of its own
    pinned block, which it keeps alive)."""

    def __init__(self, done: torch.cuda.Event, prediction: Prediction) -> None:
        self._done = done
        self._prediction = prediction

    def result(self) -> Prediction:
        self._done.synchronize()
        return self._prediction


class CudaPatchCore:
    """FastPatchCore on a CUDA device with a CUDA graph per batch size and pinned staging (see module docstring).

    Args:
        spec: The fitted model.
        backbone_dtype: Backbone arithmetic: fp32, tf32, fp16 or bf16.
        search: ``exact`` or ``fast`` (see gpu/knn.py).
        device: A CUDA device; the current one by default.
        graphs: Capture CUDA graphs (off: plain eager launches, for profiling and comparison).
        neighbours: The bank's neighbour table, if already computed (knn.BankIndex; by default it is built).
        max_batch: The largest batch run as one graph; larger batches run in chunks of it.
        slots: Pinned upload slots in the ring.
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
        max_batch: int = DEFAULT_MAX_BATCH,
        slots: int = RING_SLOTS,
    ) -> None:
        require_cuda()
        if backbone_dtype not in BACKBONE_DTYPES:
            raise UserError(f"cuda: backbone dtype {backbone_dtype!r} is not one of {', '.join(BACKBONE_DTYPES)}")
        if search not in SEARCH_MODES:
            raise UserError(f"cuda: search {search!r} is not one of {', '.join(SEARCH_MODES)}")
        if max_batch < 1:
            raise UserError(f"cuda: max_batch must be at least 1, got {max_batch}")
        self.device = torch.device(device if device is not None else "cuda")
        if self.device.type != "cuda":
            raise UserError(f"cuda: the cuda backend runs on CUDA devices, not {self.device}")
        if self.device.index is None:  # tensors report 'cuda:N': compare like with like
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_batch = max_batch
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
            self._compute = torch.cuda.Stream(self.device)
            self._copy = torch.cuda.Stream(self.device)  # uploads
            self._fetch = torch.cuda.Stream(self.device)  # downloads of staged outputs
        self._statics: OrderedDict[tuple[int, int] | None, _Statics] = OrderedDict()
        self._graphs: dict[tuple[int, tuple[int, int] | None], _BatchGraph] = {}
        self.ring = SlotRing(slots, pin=True)
        self._lock = threading.Lock()
        self.captures = 0  # graphs captured (or, without graphs, batch sizes warmed up) so far

    def _graph_for(self, batch: int, input_size: tuple[int, int]) -> _BatchGraph:
        # The map at the input's size is interpolated inside the graph: then the size is part of the key.
        map_key = input_size if self.model.map_at_input_size else None
        key = (batch, map_key)
        if key in self._graphs:
            return self._graphs[key]
        if map_key not in self._statics:
            if len(self._statics) >= MAX_MAP_SIZES:
                stale, _ = self._statics.popitem(last=False)
                self._graphs = {k: graph for k, graph in self._graphs.items() if k[1] != stale}
            with torch.cuda.stream(self._compute):
                self._statics[map_key] = _Statics(self.model, self.max_batch, input_size)
        self._statics.move_to_end(map_key)
        with torch.cuda.stream(self._compute):
            self._graphs[key] = _BatchGraph(self.model, self._statics[map_key], batch, input_size, self._pool)
        self.captures += 1
        return self._graphs[key]

    def capture(self, batches: Iterable[int], input_size: tuple[int, int] | None = None) -> None:
        """Capture the graphs of ``batches`` now (a server's warm-up) rather than on their first batch."""
        size = input_size or tuple(self.model.preprocess.settings.resize)
        with self._lock, torch.cuda.device(self.device), torch.no_grad():
            for batch in batches:
                if not 1 <= batch <= self.max_batch:
                    raise UserError(f"cuda: batch {batch} is outside 1..{self.max_batch} (max_batch)")
                self._graph_for(batch, size)

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC or float32 NCHW on the device -> float32 [N, 3, resize], eagerly (outside any graph)."""
        floats = images.permute(0, 3, 1, 2).float().div_(255) if images.dtype == torch.uint8 else images
        return self.model.preprocess.resize(floats)

    def _replay(self, images: torch.Tensor, each: Callable[[int, DeployOutput], None]) -> None:
        """Run ``images`` (on the device) on the compute stream in chunks of at most ``max_batch``, handing each
        chunk's start and outputs to ``each`` before the next chunk overwrites them."""
        input_size = _input_size(images)
        with torch.no_grad(), torch.cuda.stream(self._compute):
            for start, stop in chunks(images.shape[0], self.max_batch):
                graph = self._graph_for(stop - start, input_size)
                graph.device_in.copy_(self._resized(images[start:stop]))
                each(start, graph.run())

    def run(self, images: torch.Tensor) -> DeployOutput:
        """Device-resident inference. Up to ``max_batch`` images, the outputs live in static graph memory that
        every batch size's graph shares: read (or clone) them before the next call."""
        if images.device != self.device:
            raise UserError(f"cuda: images are on {images.device}, the model on {self.device}")
        _check_layout(tuple(images.shape), images.dtype)
        parts: list[DeployOutput] = []
        with self._lock, torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            self._compute.wait_stream(caller)
            images.record_stream(self._compute)
            whole = images.shape[0] <= self.max_batch
            self._replay(images, lambda _, out: parts.append(out if whole else DeployOutput(*(t.clone() for t in out))))
            caller.wait_stream(self._compute)
        return parts[0] if whole else DeployOutput(*(torch.cat(column) for column in zip(*parts, strict=True)))

    def _download(self, on_device: torch.Tensor) -> PendingPrediction:
        """Replay ``on_device`` (ordered on the compute stream) and download each output once, chunk by chunk,
        into a pinned block of its own; the caller holds the lock.

        The next replay overwrites the static outputs, so a download from them holds the compute stream for its
        whole DMA (about a millisecond for 64 maps at 256x256). Outputs of ``STAGED_DOWNLOAD`` bytes or more are
        first copied on the device (tens of microseconds) and downloaded from the copy on the fetch stream, while
        the next batch computes; smaller ones go down directly, where the extra copy would cost more than it saves."""
        outputs: list[torch.Tensor] = []

        def download(start: int, out: DeployOutput) -> None:
            if not outputs:  # the first chunk's shapes and dtypes size the whole batch's block
                outputs.extend(carve([((len(on_device), *t.shape[1:]), t.dtype) for t in out], pin=True))
            sources, stream = list(out), self._compute
            if sum(t.numel() * t.element_size() for t in out) >= STAGED_DOWNLOAD:
                sources, stream = [t.clone() for t in out], self._fetch
                stream.wait_stream(self._compute)
                for source in sources:
                    source.record_stream(stream)  # the caching allocator keeps it until the download is done
            with torch.cuda.stream(stream):
                for host, source in zip(outputs, sources, strict=True):
                    host[start : start + len(source)].copy_(source, non_blocking=True)

        self._replay(on_device, download)
        self._fetch.wait_stream(self._compute)
        done = torch.cuda.Event()
        done.record(self._fetch)
        return PendingPrediction(done, Prediction.from_outputs(outputs))

    def submit(self, images: np.ndarray) -> PendingPrediction:
        """Enqueue a host batch (uint8 [N, H, W, 3] or float32 [N, 3, H, W]; an array from ``ring.lend`` goes up
        without a host copy) and return at once; the result is the caller's own."""
        dtype = _TORCH_DTYPES.get(images.dtype, torch.float64)  # float64 and others fail the layout check
        _check_layout(tuple(images.shape), dtype)
        images = np.ascontiguousarray(images)
        slot, copy = self.ring.take(images)
        uploaded = consumed = None
        try:
            with torch.cuda.device(self.device):
                # Outside the lock: the slot is this call's alone, and the copy stream takes any thread's uploads.
                if slot.consumed is not None:  # the last batch from this slot may still be reading its device copy
                    self._copy.wait_event(slot.consumed)
                with torch.cuda.stream(self._copy):
                    try:
                        on_device = slot.upload(images, self.device, copy=copy, streams=(self._copy, self._compute))
                    finally:  # also after a partial upload: the host must not rewrite bytes a DMA may still read
                        uploaded = torch.cuda.Event()
                        uploaded.record(self._copy)
                with self._lock:
                    self._compute.wait_event(uploaded)
                    try:
                        return self._download(on_device)
                    finally:
                        consumed = torch.cuda.Event()
                        consumed.record(self._compute)
        finally:
            # Nothing enqueued for the slot: whatever read its device copy before still does.
            self.ring.queued(slot, uploaded, consumed if consumed is not None else slot.consumed)

    def submit_device(self, images: torch.Tensor) -> PendingPrediction:
        """``submit`` for a batch already on the GPU (from the caller's current stream): no upload."""
        if images.device != self.device:
            raise UserError(f"cuda: images are on {images.device}, the model on {self.device}")
        _check_layout(tuple(images.shape), images.dtype)
        with self._lock, torch.cuda.device(self.device):
            self._compute.wait_stream(torch.cuda.current_stream(self.device))
            images.record_stream(self._compute)
            return self._download(images)

    def run_host(self, images: np.ndarray) -> Prediction:
        """Host arrays in and out: ``submit`` and wait."""
        return self.submit(images).result()

    def close(self) -> None:
        with self._lock:
            self._graphs.clear()
            self._statics.clear()
