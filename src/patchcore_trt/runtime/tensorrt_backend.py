"""TensorRT backend for ``.engine`` plans built by ``patchcore-trt build`` (TensorRT 10/11 or TensorRT-RTX).

One execution context, one CUDA stream. Device buffers are torch CUDA tensors (no pycuda or cuda-python), host
staging buffers are pinned so the copies are truly asynchronous, and every copy and the enqueue go to that
stream, which is synchronised once per batch. Buffers are kept while the input shape stays the same; with
``cuda_graph=True`` the enqueue for that shape is captured once and replayed.

Written against the documented TensorRT API. Nothing past ``check_engine`` (the validity check) has run on a GPU yet:
TensorRT-RTX 1.7 refuses the H100 (compute capability 9.0) and full TensorRT cannot be installed from PyPI here.
docs/tensorrt.md lists exactly what has and has not been executed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from patchcore_trt.artifact import INPUT_NAME, OUTPUT_NAMES, read_sidecar, sidecar_model_metadata
from patchcore_trt.engine import TensorRT, load_tensorrt
from patchcore_trt.errors import UserError
from patchcore_trt.outputs import Prediction
from patchcore_trt.runtime.base import Backend

# TensorRT's EngineInvalidityDiagnostics bits (IRuntime::getEngineValidity), worded for a user.
_INVALIDITY_REASONS = {
    "VERSION_MISMATCH": "it was built by another TensorRT version",
    "UNSUPPORTED_CC": "this GPU's compute capability is not one it was built for",
    "OLD_CUDA_DRIVER": "the NVIDIA driver is too old",
    "OLD_CUDA_RUNTIME": "the CUDA runtime is too old",
    "INSUFFICIENT_GPU_MEMORY": "the GPU has too little memory",
    "MALFORMED_ENGINE": "the file is damaged",
    "CUDA_ERROR": "CUDA reported an error (no usable GPU or driver?)",
}


def rebuild_hint(metadata: dict[str, Any]) -> str:
    precision = metadata.get("precision", "fp32")
    onnx_name = str(metadata.get("onnx", {}).get("name", "MODEL.onnx")).replace(f".{precision}.onnx", ".onnx")
    return f"rebuild it here with: patchcore-trt build {onnx_name} --precision {precision}"


def invalidity_reasons(trt: TensorRT, diagnostics: int) -> list[str]:
    """The reasons a ``get_engine_validity`` diagnostics bit mask names."""
    flags = trt.module.EngineInvalidityDiagnostics
    return [
        text
        for name, text in _INVALIDITY_REASONS.items()
        if hasattr(flags, name) and diagnostics & int(getattr(flags, name))
    ]


def check_engine(
    engine: Path, plan: bytes, metadata: dict[str, Any], trt: TensorRT, capability: tuple[int, int]
) -> None:
    """Refuse, with a rebuild hint, a plan that the installed TensorRT or this GPU cannot run."""
    # The plan and its sidecar are two files: make sure they come from the same build.
    if metadata.get("engine", {}).get("sha256") != hashlib.sha256(plan).hexdigest():
        raise UserError(f"{engine}: the metadata beside it belongs to another build; {rebuild_hint(metadata)}")
    built = metadata.get("tensorrt", {})
    if (built.get("library"), built.get("version")) != (trt.library, trt.version):
        raise UserError(
            f"{engine}: built with {built.get('library')} {built.get('version')}, but {trt.library} {trt.version} "
            f"is installed and plans are tied to one version; {rebuild_hint(metadata)}"
        )
    built_capability = metadata.get("device", {}).get("compute_capability")
    if built_capability is not None and tuple(built_capability) != capability:
        raise UserError(
            f"{engine}: built for a GPU of compute capability {built_capability[0]}.{built_capability[1]}, this one is "
            f"{capability[0]}.{capability[1]}; {rebuild_hint(metadata)}"
        )
    validity_check = getattr(
        trt.module.Runtime(trt.module.Logger(trt.module.Logger.ERROR)), "get_engine_validity", None
    )
    if validity_check is None:  # TensorRT 10 before getEngineValidity existed: deserialisation will tell
        return
    validity, diagnostics = validity_check(plan)
    if validity == trt.module.EngineValidity.INVALID:
        reasons = invalidity_reasons(trt, int(diagnostics)) or ["TensorRT gave no reason"]
        raise UserError(f"{engine}: this engine cannot run here ({'; '.join(reasons)}); {rebuild_hint(metadata)}")


class TensorRtBackend(Backend):
    name: ClassVar[str] = "tensorrt"

    def __init__(self, artifact: Path, *, device: str = "cuda", cuda_graph: bool = False) -> None:
        super().__init__(artifact, device)
        import torch

        index = int(device.partition(":")[2] or 0)  # the registry admits cuda and cuda:N only
        if not torch.cuda.is_available():
            raise UserError(f"{artifact}: TensorRT engines need an NVIDIA GPU, and torch sees no CUDA device")
        if index >= torch.cuda.device_count():
            raise UserError(f"tensorrt: no CUDA device {index} (this machine has {torch.cuda.device_count()})")
        self.cuda_device = torch.device("cuda", index)
        self.trt = load_tensorrt()
        sidecar = read_sidecar(artifact)
        self.postprocess = sidecar_model_metadata(artifact, sidecar).postprocess
        plan = Path(artifact).read_bytes()
        check_engine(Path(artifact), plan, sidecar, self.trt, torch.cuda.get_device_capability(self.cuda_device))
        trt = self.trt.module
        torch.cuda.set_device(self.cuda_device)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UserError(f"{artifact}: {self.trt.library} could not load this engine; {rebuild_hint(sidecar)}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.cuda_device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [name for name in names if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT]
        self.profile = [tuple(dims) for dims in self.engine.get_tensor_profile_shape(INPUT_NAME, 0)]
        self.cuda_graph = cuda_graph
        self._shape: tuple[int, ...] | None = None
        self._buffers: dict[str, Any] = {}
        self._graph: Any = None

    def _torch_dtype(self, name: str) -> Any:
        import torch

        numpy_type = np.dtype(self.trt.module.nptype(self.engine.get_tensor_dtype(name)))
        return torch.from_numpy(np.empty(0, dtype=numpy_type)).dtype

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        low, _, high = self.profile
        if not all(lo <= value <= hi for lo, value, hi in zip(low, shape, high, strict=True)):
            ranges = ", ".join(
                f"{name} {lo}..{hi}"
                for name, lo, hi in zip(("batch", "channels", "height", "width"), low, high, strict=True)
            )
            raise UserError(
                f"{self.artifact}: input shape {list(shape)} is outside the engine's profile ({ranges}); "
                "resize the images, or rebuild with 'patchcore-trt build --shapes MIN OPT MAX' covering it"
            )

    def _bind(self, shape: tuple[int, ...]) -> None:
        """Set the input shape and (re)allocate device and pinned host buffers when it changes."""
        import torch

        if shape == self._shape:
            return
        self._shape, self._graph, self._buffers = None, None, {}
        if not self.context.set_input_shape(INPUT_NAME, shape):
            raise UserError(f"{self.artifact}: TensorRT rejected input shape {list(shape)}")
        buffers: dict[str, Any] = {}
        for name in [INPUT_NAME, *self.outputs]:
            dims = tuple(self.context.get_tensor_shape(name))
            if any(size < 0 for size in dims):
                raise RuntimeError(f"tensorrt: output {name} has no static shape for input {list(shape)}: {dims}")
            dtype = self._torch_dtype(name)
            buffers[name] = torch.empty(dims, dtype=dtype, device=self.cuda_device)
            buffers[name + ".host"] = torch.empty(dims, dtype=dtype, pin_memory=True)
            self.context.set_tensor_address(name, buffers[name].data_ptr())
        self._buffers, self._shape = buffers, shape

    def _capture(self) -> Any:
        """Capture this shape's enqueue in a CUDA graph (inputs and outputs keep their addresses)."""
        import torch

        # TensorRT does deferred, shape-dependent set-up in the first enqueue after a shape change; it must not be
        # captured, so run once outside the graph first (TensorRT developer guide, "CUDA Graphs").
        self._enqueue()
        self.stream.synchronize()
        if not self.context.is_stream_capturable(self.stream.cuda_stream):
            raise UserError(f"{self.artifact}: this engine cannot be captured in a CUDA graph; run without cuda_graph")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            self._enqueue()
        return graph

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"tensorrt: execute_async_v3 failed for input shape {list(self._shape or ())}")

    def _infer(self, images: np.ndarray) -> Prediction:
        import torch

        shape = tuple(images.shape)
        self._check_shape(shape)
        self._bind(shape)
        buffers = self._buffers
        buffers[INPUT_NAME + ".host"].copy_(torch.from_numpy(images))
        with torch.cuda.stream(self.stream):
            buffers[INPUT_NAME].copy_(buffers[INPUT_NAME + ".host"], non_blocking=True)
            if self.cuda_graph:
                self._graph = self._graph or self._capture()
                self._graph.replay()
            else:
                self._enqueue()
            for name in self.outputs:
                buffers[name + ".host"].copy_(buffers[name], non_blocking=True)
        self.stream.synchronize()
        # Copies: the pinned buffers are reused by the next batch.
        return Prediction.from_outputs([buffers[name + ".host"].numpy().copy() for name in OUTPUT_NAMES])

    def close(self) -> None:
        self._graph, self._buffers, self._shape = None, {}, None
        self.context = None
        self.engine = None
