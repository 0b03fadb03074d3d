"""The systems under test of the benchmark: the CUDA backend, its peers and the registry backends.

Peers (bench/settings.PEERS): anomalib's own module, eager (``anomalib``) and under
``torch.compile(mode="reduce-overhead")`` (``anomalib-compile``), and ONNX Runtime's CUDA execution provider on
patchcore-trt's ONNX export (``onnxruntime-cuda``). Their precision ``fp32`` is IEEE FP32 throughout (TF32 off
in cuDNN, cuBLAS and ONNX Runtime: the parity setting); ``tf32`` is each framework's default (PyTorch: TF32
convolutions, IEEE matrix products; ONNX Runtime: TF32 for both).

Each is a Subject: ``run(i)`` processes batch ``i`` of a rotation of input batches the way a caller would
(host arrays in and out, or tensors that stay on the GPU), ``outputs(i)`` returns its results for the
parity check. Whatever a registry backend needs to run (a .ckpt of a synthetic model, an ONNX export) is
made on first use by ``artifact_maker``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchcore_trt.artifact import ort_session
from patchcore_trt.outputs import Prediction
from patchcore_trt.spec import PatchCoreSpec


@dataclass(frozen=True)
class Case:
    """One row of the matrix; ``search`` is '-' and ``copies`` 'host' for backends without those options."""

    backend: str
    precision: str
    search: str
    copies: str
    batch: int


@dataclass
class Subject:
    """A system under test: ``run(i)`` processes rotation batch ``i``; ``outputs(i)`` returns its results."""

    run: Callable[[int], object]
    outputs: Callable[[int], Prediction]
    uses_cuda: bool
    close: Callable[[], None] = field(default=lambda: None)
    extra: dict[str, Any] = field(default_factory=dict)  # figures the row records beside the timings


COMPILE_MODE = "reduce-overhead"


def peer_unavailable(name: str) -> str | None:
    """Why the peer ``name`` cannot run here (None: it can): the reason every skip notice gives."""
    from patchcore_trt.reference import anomalib_available

    if name in ("anomalib", "anomalib-compile") and not anomalib_available():
        return "anomalib is not installed: pip install 'patchcore-trt[anomalib]'"
    if name == "anomalib-compile" and not torch.cuda.is_available():
        return f"torch.compile(mode={COMPILE_MODE!r}) replays CUDA graphs and torch sees no CUDA GPU here"
    if name == "onnxruntime-cuda":
        try:
            import onnxruntime
        except ImportError:
            return "onnxruntime is not installed: pip install onnxruntime-gpu"
        providers = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            return (
                f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (it offers "
                f"{', '.join(providers)}): pip install onnxruntime-gpu"
            )
        if not torch.cuda.is_available():
            return "torch sees no CUDA GPU here"
    return None


@contextlib.contextmanager
def math_mode(precision: str) -> Iterator[None]:
    """PyTorch's math mode for a peer's ``precision``: fp32 = IEEE throughout, tf32 = PyTorch's defaults (TF32
    cuDNN convolutions, IEEE matrix products); others run as they are set."""
    from patchcore_trt.gpu.knn import float32_matmul

    if precision in ("fp32", "tf32"):
        with float32_matmul(conv_tf32=precision == "tf32"):
            yield
    else:
        yield


def _in_mode(function: Callable[[int], Any], precision: str) -> Callable[[int], Any]:
    def run(i: int) -> Any:
        with math_mode(precision):
            return function(i)

    return run


def as_float_nchw(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [0, 1], the input convention of every backend's ``predict``."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def _cuda_subject(spec: PatchCoreSpec, case: Case, batches: list[np.ndarray], graphs: bool) -> Subject:
    """The cuda backend through its contract: uint8 host arrays in (``host``), or uint8 tensors already on the GPU
    (``device``); host results out either way."""
    from patchcore_trt.runtime.cuda_backend import CudaBackend

    backend = CudaBackend.from_spec(spec, backbone_dtype=case.precision, search=case.search, graphs=graphs)
    return cuda_backend_subject(backend, batches, case.copies, close=backend.close)


def cuda_backend_subject(
    backend: Any, batches: list[np.ndarray], copies: str, close: Callable[[], None] = lambda: None
) -> Subject:
    """An open cuda backend through its contract: uint8 host arrays in (``host``), or uint8 tensors already on the
    GPU (``device``); host results out either way."""
    inputs = batches if copies == "host" else [torch.from_numpy(batch).to(backend.device) for batch in batches]
    return Subject(
        run=lambda i: backend.predict(inputs[i]),
        outputs=lambda i: backend.predict(inputs[i]),
        uses_cuda=True,
        close=close,
    )


def _timing_first_call(forward: Callable[[torch.Tensor], Any], extra: dict[str, Any]) -> Callable[[torch.Tensor], Any]:
    """``forward``, recording its first call's seconds (the compilation, for a compiled module) as compile_s."""

    def timed(images: torch.Tensor) -> Any:
        if "compile_s" in extra:
            return forward(images)
        start = time.perf_counter()
        out = forward(images)
        if images.is_cuda:
            torch.cuda.synchronize()
        extra["compile_s"] = round(time.perf_counter() - start, 2)
        return out

    return timed


def _anomalib_subject(spec: PatchCoreSpec, case: Case, batches: list[np.ndarray], *, compiled: bool = False) -> Subject:
    """anomalib's module, eager or (``compiled``) under torch.compile(mode="reduce-overhead"): each subject is
    compiled afresh for its one input shape (the first ``outputs`` call pays for it: recorded as compile_s)."""
    from patchcore_trt.reference import AnomalibReference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if case.precision == "fp16" else torch.float32
    reference = AnomalibReference.from_spec(spec)
    reference.module.to(device=device, dtype=dtype)
    extra: dict[str, Any] = {}
    forward: Callable[[torch.Tensor], Any] = reference.forward

    def close() -> None:
        return None

    if compiled:
        torch._dynamo.reset()  # a fresh cache: no earlier subject's graphs held, no recompile limit reached
        forward = _timing_first_call(reference.compiled(COMPILE_MODE), extra)
        close = torch._dynamo.reset

    def upload(batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).to(dtype) / 255

    if case.copies == "host":

        def run(i: int) -> tuple[np.ndarray, np.ndarray]:
            out = forward(upload(batches[i]))
            return out.pred_score.cpu().numpy(), out.anomaly_map.cpu().numpy()

        def outputs(i: int) -> Prediction:
            return Prediction.from_outputs(forward(upload(batches[i])))

    else:
        resident = [upload(batch) for batch in batches]

        def run(i: int) -> Any:
            return forward(resident[i])

        def outputs(i: int) -> Prediction:
            return Prediction.from_outputs(forward(resident[i]))

    return Subject(
        run=_in_mode(run, case.precision),
        outputs=_in_mode(outputs, case.precision),
        uses_cuda=device.type == "cuda",
        close=close,
        extra=extra,
    )


def _onnxruntime_cuda_subject(onnx_path: Path, case: Case, batches: list[np.ndarray]) -> Subject:
    """ONNX Runtime's CUDA execution provider on the FP32 export, host float32 in and out (TF32 off for fp32)."""
    import onnxruntime

    from patchcore_trt.artifact import INPUT_NAME, OUTPUT_NAMES
    from patchcore_trt.errors import UserError

    cuda_build = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if cuda_build and hasattr(onnxruntime, "preload_dlls"):  # CUDA and cuDNN from the wheels torch loaded already
        onnxruntime.preload_dlls()
    session = ort_session(onnx_path, device="cuda", provider_options={"use_tf32": int(case.precision == "tf32")})
    if session.get_providers()[0] != "CUDAExecutionProvider":  # ONNX Runtime falls back to the CPU silently
        raise UserError(f"onnxruntime ran on {session.get_providers()[0]}, not the CUDA execution provider")
    floats = [as_float_nchw(batch) for batch in batches]
    names = list(OUTPUT_NAMES)

    def run(i: int) -> list[Any]:
        return session.run(names, {INPUT_NAME: floats[i]})

    return Subject(
        run=run,
        outputs=lambda i: Prediction.from_outputs(run(i)),
        uses_cuda=torch.cuda.is_available(),  # session.run returns host arrays: it has waited for the GPU already
        extra={"onnxruntime": onnxruntime.__version__},
    )


def _generic_subject(backend: Any, batches: list[np.ndarray], uses_cuda: bool) -> Subject:
    floats = [as_float_nchw(batch) for batch in batches]
    return Subject(
        run=lambda i: backend.predict(floats[i]),
        outputs=lambda i: backend.predict(floats[i]),
        uses_cuda=uses_cuda,
        close=backend.close,
    )


def make_subject(
    case: Case, spec: PatchCoreSpec, batches: list[np.ndarray], graphs: bool, artifact: Callable[[str], Path]
) -> Subject:
    """The system under test for ``case``: the CUDA backend, anomalib's module, or a registry backend."""
    if case.backend == "cuda":
        return _cuda_subject(spec, case, batches, graphs)
    if case.backend in ("anomalib", "anomalib-compile"):
        return _anomalib_subject(spec, case, batches, compiled=case.backend == "anomalib-compile")
    if case.backend == "onnxruntime-cuda":
        return _onnxruntime_cuda_subject(artifact("onnxruntime"), case, batches)
    from patchcore_trt.runtime import backend_info, open_backend

    devices = backend_info(case.backend).devices
    device = "cuda" if "cuda" in devices and torch.cuda.is_available() else devices[0]
    backend = open_backend(artifact(case.backend), case.backend, device=device)
    return _generic_subject(backend, batches, uses_cuda=device == "cuda")


def artifact_maker(spec: PatchCoreSpec, checkpoint: Path | None, work_dir: Path) -> Callable[[str], Path]:
    """backend name -> the file it runs, made in ``work_dir`` on first use: a .ckpt of a synthetic model, an ONNX
    export, or an FP32 engine built from that export."""
    from patchcore_trt.runtime import backend_info

    made: dict[str, Path] = {}
    stem = work_dir / f"{spec.source_name or 'model'}"

    def artifact(backend: str) -> Path:
        (suffix,) = backend_info(backend).suffixes
        if suffix in made:
            return made[suffix]
        if suffix == ".ckpt":
            from patchcore_trt.checkpoint import write_checkpoint

            made[suffix] = checkpoint or write_checkpoint(spec, stem.with_suffix(".ckpt"))
        elif suffix == ".onnx":
            from patchcore_trt.export import export_onnx

            made[suffix] = export_onnx(spec, stem.with_suffix(".onnx"), check=False)[0]
        else:
            from patchcore_trt.build import build

            made[suffix] = build(artifact("onnxruntime")).engine
        return made[suffix]

    return artifact
