"""Runtime backends behind one contract (see base.py), created by name through one registry (registry.py).

The registry is the one place that knows each backend's facts: the files (or server URLs) it runs, the devices it
runs on, the input kinds it takes, the options it takes with their choices, and the suffixes it is the default
for. ``open_backend`` checks a request against them before it imports anything, so a mistake is answered at
once, and adding a backend is one new module plus one entry.
"""

from __future__ import annotations

import glob
import importlib
import os
from pathlib import Path

from patchcore_trt.archive import check_checkpoint_file
from patchcore_trt.errors import UserError
from patchcore_trt.outputs import NonFiniteOutputError, Prediction
from patchcore_trt.runtime.base import Backend
from patchcore_trt.runtime.registry import (
    BARE_ADDRESS,
    BARE_SCHEME,
    OPTIONS,
    REGISTRY,
    BackendInfo,
    flag,
    options_of,
)


def backend_names() -> list[str]:
    return sorted(REGISTRY)


def backend_info(name: str) -> BackendInfo:
    if name not in REGISTRY:
        raise UserError(f"unknown backend {name!r}; choose one of: {', '.join(backend_names())}")
    return REGISTRY[name]


def artifact_suffixes() -> list[str]:
    return sorted({suffix for info in REGISTRY.values() for suffix in info.suffixes})


def is_url(artifact: Path | str) -> bool:
    """Whether ``artifact`` names a server (http://, https://, grpc://, or a bare HOST:PORT that is no file) rather
    than a file. A Path is always a file."""
    if not isinstance(artifact, str):
        return False
    if any(artifact.startswith(scheme) for info in REGISTRY.values() for scheme in info.schemes):
        return True
    return bool(BARE_ADDRESS.match(artifact)) and not Path(artifact).exists()


def default_backend(artifact: Path | str) -> str:
    """The backend that runs ``artifact`` when none is named."""
    if is_url(artifact):
        address = str(artifact) if "://" in str(artifact) else BARE_SCHEME + str(artifact)
        return next(info.name for info in REGISTRY.values() if any(map(address.startswith, info.schemes)))
    artifact = Path(artifact)
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


GPU_NODES = ("/dev/nvmap", "/dev/dxg")  # a Jetson's GPU memory node (no /dev/nvidia0 there); WSL's GPU


def check_gpu_present(info: BackendInfo, device: str) -> None:
    """A local ``device`` of kind cuda needs an NVIDIA GPU: without one (no /dev/nvidia0.. node, nor a Jetson's
    /dev/nvmap, nor WSL's /dev/dxg) this is answered from the device nodes alone, before torch or a runtime spends
    seconds loading to find out."""
    if device.partition(":")[0] != "cuda":
        return
    if glob.glob("/dev/nvidia[0-9]*") or any(map(os.path.exists, GPU_NODES)):
        return
    raise UserError(f"backend {info.name!r} on {device} needs an NVIDIA GPU, and this machine has none")


def check_options(info: BackendInfo, options: dict[str, object]) -> None:
    """Every option is one ``info``'s backend takes, with a value among its choices."""
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        owners = sorted({other.name for other in REGISTRY.values() for option in unknown if option in other.options})
        flags = ", ".join(flag(option) for option in unknown)
        where = f"apply to --backend {' or '.join(owners)}" if owners else "are not options of any backend"
        raise UserError(f"{flags} {where}, not {info.name}")
    for name, value in options.items():
        OPTIONS[name].check(name, value)


def check_request(
    artifact: Path | str, backend: str | None = None, *, device: str | None = None, **options: object
) -> tuple[BackendInfo, str]:
    """The backend and device that will run ``artifact``, after every check the registry can make without importing
    anything (file or URL, suffix, device, options): a caller can answer a mistake before any other work."""
    info = backend_info(backend or default_backend(artifact))
    if info.schemes or is_url(artifact):
        if not (is_url(artifact) and info.schemes):
            schemes = ", ".join(info.schemes)
            what = f"a server (HOST:PORT for gRPC, {schemes})" if info.schemes else f"{', '.join(info.suffixes)} files"
            raise UserError(f"{artifact}: backend {info.name!r} runs {what}")
        check_options(info, options)
        return info, check_device(info, device)
    artifact = Path(artifact)
    suffix = artifact.suffix.lower()
    if suffix not in info.suffixes:
        raise UserError(
            f"{artifact}: backend {info.name!r} runs {', '.join(info.suffixes)} files, not {suffix or 'this file'}"
        )
    device = check_device(info, device)
    check_options(info, options)
    check_gpu_present(info, device)
    if artifact.is_dir():
        raise UserError(f"{artifact}: is a folder; expected a {suffix} file")
    if not artifact.is_file():
        raise UserError(f"{artifact}: no such file")
    if suffix == ".ckpt":  # a PNG renamed .ckpt is answered before torch loads
        check_checkpoint_file(artifact)
    return info, device


def open_backend(
    artifact: Path | str, backend: str | None = None, *, device: str | None = None, **options: object
) -> Backend:
    """Load ``artifact`` with the named backend (or the default for its suffix) on ``device`` (or its first).

    ``artifact`` is a file, or a server URL for the triton backend (``open_backend("host:8001", model="line")``:
    a bare HOST:PORT is gRPC; ``http://host:8000`` for HTTP). Every fact the registry holds is checked
    (``check_request``) before the backend's module is imported.
    """
    info, device = check_request(artifact, backend, device=device, **options)
    module_name, class_name = info.target.split(":")
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls(artifact if info.schemes else Path(artifact), device=device, **options)


__all__ = [
    "OPTIONS",
    "REGISTRY",
    "Backend",
    "BackendInfo",
    "NonFiniteOutputError",
    "Prediction",
    "backend_info",
    "backend_names",
    "check_request",
    "is_url",
    "open_backend",
    "options_of",
]
