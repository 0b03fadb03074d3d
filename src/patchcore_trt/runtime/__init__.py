"""Runtime backends behind one contract (see base.py), created by name through one registry."""

from __future__ import annotations

import importlib
from pathlib import Path

from patchcore_trt.errors import UserError
from patchcore_trt.runtime.base import Backend, Capabilities, Prediction

# name -> "module:Class"; modules are imported on first use so optional dependencies stay optional.
_REGISTRY: dict[str, str] = {
    "torch": "patchcore_trt.runtime.torch_backend:TorchBackend",
    "cuda": "patchcore_trt.runtime.cuda_backend:CudaBackend",
    "onnxruntime": "patchcore_trt.runtime.onnxruntime_backend:OnnxRuntimeBackend",
    "openvino": "patchcore_trt.runtime.openvino_backend:OpenVinoBackend",
    "tensorrt": "patchcore_trt.runtime.tensorrt_backend:TensorRtBackend",
}

# The backend used when none is named, by artifact suffix.
DEFAULT_BACKEND = {".ckpt": "torch", ".onnx": "onnxruntime", ".engine": "tensorrt"}


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    if name not in _REGISTRY:
        raise UserError(f"unknown backend {name!r}; choose one of: {', '.join(backend_names())}")
    module_name, class_name = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def open_backend(
    artifact: Path | str, backend: str | None = None, *, device: str | None = None, **options: object
) -> Backend:
    """Load ``artifact`` with the named backend (or the default for its suffix) on ``device`` (or its first)."""
    artifact = Path(artifact)
    suffix = artifact.suffix.lower()
    name = backend or DEFAULT_BACKEND.get(suffix)
    if name is None:
        known = ", ".join(sorted({s for n in _REGISTRY for s in backend_class(n).capabilities.artifact_suffixes}))
        raise UserError(f"{artifact}: don't know how to run a {suffix or 'suffix-less'} file; expected one of {known}")
    cls = backend_class(name)
    if suffix not in cls.capabilities.artifact_suffixes:
        expected = ", ".join(cls.capabilities.artifact_suffixes)
        raise UserError(f"{artifact}: backend {name!r} runs {expected} files, not {suffix or 'this file'}")
    device = device or cls.capabilities.devices[0]
    if device not in cls.capabilities.devices:
        raise UserError(f"backend {name!r} runs on {', '.join(cls.capabilities.devices)}, not {device!r}")
    if not artifact.is_file():
        raise UserError(f"{artifact}: no such file")
    return cls(artifact, device=device, **options)


__all__ = ["Backend", "Capabilities", "Prediction", "backend_class", "backend_names", "open_backend"]
