"""Runtime backends behind one contract (see base.py), created by name through one registry.

The registry is the one place that knows each backend's facts: the files it runs, the devices it runs on, the
options it takes and the suffixes it is the default for. ``open_backend`` checks a request against them before
it imports anything, so a mistake is answered at once, and adding a backend is one new module plus one entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from patchcore_trt.errors import UserError
from patchcore_trt.runtime.base import Backend, NonFiniteOutputError, Prediction


@dataclass(frozen=True)
class BackendInfo:
    """What a backend is, as data.

    Attributes:
        target: ``module:Class``, imported on first use so optional dependencies stay optional.
        suffixes: Artifact files it runs.
        devices: Device kinds it runs on; the first is its default. ``cuda`` also admits ``cuda:N``.
        options: Keyword options its constructor takes besides the artifact and device.
        default_for: Suffixes it runs when no backend is named.
    """

    name: str
    target: str
    suffixes: tuple[str, ...]
    devices: tuple[str, ...]
    options: tuple[str, ...] = ()
    default_for: tuple[str, ...] = ()


_CHECKPOINT_OPTIONS = ("trust_pickled_code", "map_at_input_size", "anomalib_version")
REGISTRY: dict[str, BackendInfo] = {
    info.name: info
    for info in (
        BackendInfo(
            "torch", "patchcore_trt.runtime.torch_backend:TorchBackend", (".ckpt",), ("cpu",), _CHECKPOINT_OPTIONS,
            default_for=(".ckpt",),
        ),
        BackendInfo(
            "cuda", "patchcore_trt.runtime.cuda_backend:CudaBackend", (".ckpt",), ("cuda",),
            (*_CHECKPOINT_OPTIONS, "mode", "backbone_dtype", "search", "graphs"),
        ),
        BackendInfo(
            "onnxruntime", "patchcore_trt.runtime.onnxruntime_backend:OnnxRuntimeBackend", (".onnx",), ("cpu", "cuda"),
            ("threads", "qdq_fusion"), default_for=(".onnx",),
        ),
        BackendInfo("openvino", "patchcore_trt.runtime.openvino_backend:OpenVinoBackend", (".onnx",), ("cpu",)),
        BackendInfo(
            "tensorrt", "patchcore_trt.runtime.tensorrt_backend:TensorRtBackend", (".engine",), ("cuda",),
            ("cuda_graph",), default_for=(".engine",),
        ),
    )
}  # fmt: skip


def backend_names() -> list[str]:
    return sorted(REGISTRY)


def backend_info(name: str) -> BackendInfo:
    if name not in REGISTRY:
        raise UserError(f"unknown backend {name!r}; choose one of: {', '.join(backend_names())}")
    return REGISTRY[name]


def artifact_suffixes() -> list[str]:
    return sorted({suffix for info in REGISTRY.values() for suffix in info.suffixes})


def default_backend(artifact: Path) -> str:
    """The backend that runs ``artifact`` when none is named."""
    suffix = artifact.suffix.lower()
    for info in REGISTRY.values():
        if suffix in info.default_for:
            return info.name
    if artifact.is_dir():
        raise UserError(f"{artifact}: is a folder; expected a model file ({', '.join(artifact_suffixes())})")
    kind = f"a {suffix} file" if suffix else "a file without a suffix"
    raise UserError(f"{artifact}: don't know how to run {kind}; expected one of {', '.join(artifact_suffixes())}")


def check_device(info: BackendInfo, device: str | None) -> str:
    """``device`` (or the backend's default) if the backend runs there: ``cpu``, ``cuda`` or ``cuda:N``."""
    device = device or info.devices[0]
    kind, colon, index = device.partition(":")
    if kind not in info.devices or (colon and (kind != "cuda" or not index.isdigit())):
        hint = " (cuda:N picks GPU N)" if "cuda" in info.devices else ""
        raise UserError(f"backend {info.name!r} runs on {', '.join(info.devices)}, not {device!r}{hint}")
    return device


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def check_options(info: BackendInfo, options: dict[str, object]) -> None:
    unknown = sorted(set(options) - set(info.options))
    if not unknown:
        return
    owners = sorted({other.name for other in REGISTRY.values() for option in unknown if option in other.options})
    flags = ", ".join(_flag(option) for option in unknown)
    where = f"apply to --backend {' or '.join(owners)}" if owners else "are not options of any backend"
    raise UserError(f"{flags} {where}, not {info.name}")


def check_request(
    artifact: Path | str, backend: str | None = None, *, device: str | None = None, **options: object
) -> tuple[BackendInfo, str]:
    """The backend and device that will run ``artifact``, after every check the registry can make without importing
    anything (file, suffix, device, options): a caller can answer a mistake before any other work."""
    artifact = Path(artifact)
    info = backend_info(backend or default_backend(artifact))
    suffix = artifact.suffix.lower()
    if suffix not in info.suffixes:
        raise UserError(
            f"{artifact}: backend {info.name!r} runs {', '.join(info.suffixes)} files, not {suffix or 'this file'}"
        )
    device = check_device(info, device)
    check_options(info, options)
    if artifact.is_dir():
        raise UserError(f"{artifact}: is a folder; expected a {suffix} file")
    if not artifact.is_file():
        raise UserError(f"{artifact}: no such file")
    return info, device


def open_backend(
    artifact: Path | str, backend: str | None = None, *, device: str | None = None, **options: object
) -> Backend:
    """Load ``artifact`` with the named backend (or the default for its suffix) on ``device`` (or its first).

    Every fact the registry holds is checked (``check_request``) before the backend's module is imported.
    """
    info, device = check_request(artifact, backend, device=device, **options)
    module_name, class_name = info.target.split(":")
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls(Path(artifact), device=device, **options)


__all__ = [
    "REGISTRY",
    "Backend",
    "BackendInfo",
    "NonFiniteOutputError",
    "Prediction",
    "backend_info",
    "backend_names",
    "check_request",
    "open_backend",
]
