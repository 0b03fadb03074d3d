"""ONNX -> TensorRT engine, one code path for TensorRT 10.x/11.x and TensorRT-RTX, modern API only.

The library is picked once, on first use: full ``tensorrt`` (10 or newer) if it imports, else
``tensorrt_rtx_bindings`` (TensorRT-RTX, which builds engines on a machine without a GPU). Only APIs both have
are used: strongly typed networks (precision comes from the ONNX, see precision.py), ``set_memory_pool_limit``,
``build_serialized_network`` and tensor names. The ``.engine`` file stays a plain plan; what a runtime needs to
know about it goes to the sidecar ``MODEL.<precision>.engine.json`` beside it (artifact.py).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from patchcore_trt.artifact import (
    INPUT_NAME,
    MAX_BATCH,
    MAX_SIDE,
    MIN_SIDE,
    OUTPUT_NAMES,
    ArtifactMetadata,
    read_onnx_metadata,
    write_sidecar,
)
from patchcore_trt.errors import MissingDependencyError, UserError
from patchcore_trt.files import sha256_of, write_bytes_atomic

DEFAULT_MAX_BATCH = 32
# TensorRT-RTX's default targets when no compute capability is set (its "CPU-only AOT" documentation).
RTX_DEFAULT_TARGETS = "8.0, 8.6, 8.9, 12.0 and later"


@dataclass(frozen=True)
class TensorRT:
    """The TensorRT flavour this process uses."""

    module: ModuleType
    library: str
    version: str


def _import_candidate(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except (ImportError, OSError):  # a stub wheel or missing shared libraries also land here
        return None


@functools.cache
def load_tensorrt() -> TensorRT:
    """The installed TensorRT, full (10.x/11.x) preferred over TensorRT-RTX."""
    full = _import_candidate("tensorrt")
    if full is not None:
        version = str(getattr(full, "__version__", "0"))
        if int(version.split(".")[0]) >= 10:
            return TensorRT(full, "tensorrt", version)
    rtx = _import_candidate("tensorrt_rtx_bindings")
    if rtx is not None:
        return TensorRT(rtx, "tensorrt_rtx", str(rtx.__version__))
    if full is not None:
        raise UserError(
            f"TensorRT {full.__version__} is too old; patchcore-trt needs TensorRT 10 or newer, or TensorRT-RTX"
        )
    raise MissingDependencyError("TensorRT (or TensorRT-RTX)", "tensorrt-rtx")


@dataclass(frozen=True)
class Shape:
    """One input shape of an optimisation profile (channels are always 3)."""

    batch: int
    height: int
    width: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``BATCHxHEIGHTxWIDTH``, e.g. ``1x512x512``."""
        parts = text.lower().split("x")
        if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
            raise UserError(f"shape {text!r} is not BATCHxHEIGHTxWIDTH (for example 1x512x512)")
        return cls(*(int(part) for part in parts))

    def dims(self) -> tuple[int, int, int, int]:
        return (self.batch, 3, self.height, self.width)

    def __str__(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}"


@dataclass(frozen=True)
class Profile:
    """The input shapes an engine accepts (min, max) and is tuned for (opt)."""

    min: Shape
    opt: Shape
    max: Shape

    def validate(self) -> None:
        """Raise UserError unless min <= opt <= max and every size is one the exported graph accepts."""
        limits = {"batch": (1, MAX_BATCH), "height": (MIN_SIDE, MAX_SIDE), "width": (MIN_SIDE, MAX_SIDE)}
        for name, (low, high) in limits.items():
            small, tuned, large = (getattr(shape, name) for shape in (self.min, self.opt, self.max))
            if not small <= tuned <= large:
                raise UserError(f"profile {self}: {name} must satisfy min <= opt <= max, got {small}, {tuned}, {large}")
            if small < low or large > high:
                raise UserError(f"profile {self}: {name} must lie within {low}..{high}, got {small}..{large}")

    def __str__(self) -> str:
        return f"{self.min} {self.opt} {self.max}"


def default_profile(model_size: tuple[int, int]) -> Profile:
    """Half to twice the model resolution, tuned for it at batch 1 (256/512/1024 for a 512 model)."""
    height, width = model_size
    return Profile(
        min=Shape(1, max(MIN_SIDE, height // 2), max(MIN_SIDE, width // 2)),
        opt=Shape(1, height, width),
        max=Shape(DEFAULT_MAX_BATCH, min(MAX_SIDE, height * 2), min(MAX_SIDE, width * 2)),
    )


@dataclass(frozen=True)
class BuildPlan:
    """A build checked before its long steps: the TensorRT to use and the options it was given."""

    trt: TensorRT
    profile: Profile
    workspace_gib: float | None = None
    timing_cache: Path | None = None


MAX_WORKSPACE_GIB = 4096


def check_build(
    path: Path, profile: Profile, *, workspace_gib: float | None = None, timing_cache: Path | None = None
) -> BuildPlan:
    """Everything that can be checked before a long step: options, TensorRT, the profile against the graph."""
    profile.validate()
    if workspace_gib is not None and not 0 < workspace_gib <= MAX_WORKSPACE_GIB:  # NaN fails both comparisons
        raise UserError(f"--workspace must be a number of GiB in (0, {MAX_WORKSPACE_GIB}], got {workspace_gib}")
    trt = load_tensorrt()
    if timing_cache is not None and trt.library == "tensorrt_rtx":
        raise UserError(
            "--timing-cache: TensorRT-RTX has no timing cache (it compiles kernels on the GPU at run time); drop it"
        )
    _check_io(path, profile)
    return BuildPlan(trt, profile, workspace_gib, timing_cache)


def _check_io(path: Path, profile: Profile) -> None:
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {value.name: value for value in graph.input}
    if INPUT_NAME not in inputs:
        raise UserError(f"{path}: the graph has no input named {INPUT_NAME!r} (it has {sorted(inputs)})")
    outputs = [value.name for value in graph.output]
    if sorted(outputs) != sorted(OUTPUT_NAMES):
        raise UserError(f"{path}: the graph's outputs are {outputs}, not {list(OUTPUT_NAMES)}; export it again")
    dims = inputs[INPUT_NAME].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise UserError(f"{path}: input {INPUT_NAME!r} has {len(dims)} dimensions; expected [N, 3, H, W]")
    for axis, name in enumerate(("batch", "channels", "height", "width")):
        static = dims[axis].dim_value if dims[axis].HasField("dim_value") else None
        wanted = {shape.dims()[axis] for shape in (profile.min, profile.opt, profile.max)}
        if static is not None and wanted != {static}:
            raise UserError(
                f"{path}: input {name} is fixed at {static} in the graph, but the profile asks {sorted(wanted)}"
            )


def _make_logger(trt: ModuleType) -> Any:
    class Logger(trt.ILogger):
        """Keeps TensorRT's errors, so a failed build can say why in one line."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg.strip())

    return Logger()


def _parse(trt: TensorRT, builder: Any, logger: Any, path: Path) -> Any:
    # STRONGLY_TYPED: required on 10.x for ONNX precision to be obeyed, ignored on 11.x (always on), native on RTX.
    network = builder.create_network(1 << int(trt.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.module.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = [parser.get_error(index) for index in range(parser.num_errors)]
        described = [
            f"node {error.node()} {error.node_name() or '?'!r} ({error.node_operator() or '?'}): {error.desc()}"
            for error in errors
        ]
        if not described:
            described = logger.errors[-1:] or ["unknown parser error"]
        raise UserError(f"{path}: {trt.library} {trt.version} cannot parse the graph: {'; '.join(described)}")
    return network


def layer_precisions(network: Any) -> dict[str, int]:
    """How many layers of each type produce each data type, e.g. ``CONVOLUTION:HALF``: the network's real precision."""
    counts: Counter[str] = Counter()
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        counts[f"{layer.type.name}:{layer.get_output_type(0).name}"] += 1
    return dict(sorted(counts.items()))


@dataclass(frozen=True)
class BuildResult:
    engine: Path
    sidecar: Path
    seconds: float


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    profile: Profile,
    *,
    workspace_gib: float | None = None,
    timing_cache: Path | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> BuildResult:
    """Build a TensorRT plan from a patchcore-trt ONNX (any precision) with one dynamic optimisation profile.

    Args:
        onnx_path: FP32, FP16 or INT8 ONNX from ``export``/precision.py; the precision comes from the graph.
        engine_path: Where the plan goes; its metadata goes to the sidecar ``<engine_path>.json``.
        profile: Input shapes (validated against the graph before anything is built).
        workspace_gib: Cap on TensorRT's scratch memory (default: TensorRT's, the whole device).
        timing_cache: Kernel timing cache to reuse and update (full TensorRT only).
        extra_metadata: More keys for the sidecar (build.py stores the accuracy gate's figures there).
    """
    plan = check_build(Path(onnx_path), profile, workspace_gib=workspace_gib, timing_cache=timing_cache)
    return run_build(plan, Path(onnx_path), Path(engine_path), read_onnx_metadata(onnx_path), extra_metadata)


def run_build(
    plan: BuildPlan,
    onnx_path: Path,
    engine_path: Path,
    model_metadata: ArtifactMetadata,
    extra_metadata: dict[str, Any] | None = None,
) -> BuildResult:
    """The TensorRT build of a checked ``plan`` (see ``check_build``); writes the sidecar, then the plan."""
    trt, profile, workspace_gib, timing_cache = plan.trt, plan.profile, plan.workspace_gib, plan.timing_cache
    started = time.perf_counter()
    logger = _make_logger(trt.module)
    builder = trt.module.Builder(logger)
    network = _parse(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.module.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    # TF32 rounds FP32 matmul inputs to a 10-bit mantissa, like FP16, and TensorRT enables it by default. A
    # strongly typed network forbids per-layer precision, so the flag is the only lever: clearing it keeps the
    # distance MatMul (FP32 in every precision's ONNX) in true FP32. FP32 backbone convs lose TF32 too; the
    # FP16/INT8 engines are the fast ones.
    tf32_flag = getattr(trt.module.BuilderFlag, "TF32", None)
    if tf32_flag is not None:
        config.clear_flag(tf32_flag)
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(INPUT_NAME, profile.min.dims(), profile.opt.dims(), profile.max.dims())
    config.add_optimization_profile(trt_profile)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        reason = logger.errors[-1] if logger.errors else "no reason given"
        raise UserError(f"{onnx_path}: {trt.library} {trt.version} could not build the engine: {reason}")
    seconds = time.perf_counter() - started
    data = bytes(serialized)
    document = {
        "engine": {"name": engine_path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        "precision": model_metadata.precision,
        "onnx": {"name": onnx_path.name, "sha256": sha256_of(onnx_path)},
        "tensorrt": {"library": trt.library, "version": trt.version},
        "device": _build_device(trt),
        "input": INPUT_NAME,
        "outputs": list(OUTPUT_NAMES),
        "profile": {name: list(getattr(profile, name).dims()) for name in ("min", "opt", "max")},
        "tf32": False if tf32_flag is not None else "not controllable in this TensorRT",
        "workspace_bytes": None if workspace_gib is None else int(workspace_gib * (1 << 30)),
        "layers": layer_precisions(network),
        "build_seconds": round(seconds, 3),
        "model": json.loads(model_metadata.to_json()),
        **(extra_metadata or {}),
    }
    # The sidecar first: an engine on disk always has its metadata beside it (a stale one fails the hash check).
    sidecar = write_sidecar(engine_path, document)
    write_bytes_atomic(engine_path, data)
    if cache is not None:
        write_bytes_atomic(timing_cache, bytes(cache.serialize()))
    return BuildResult(engine_path, sidecar, seconds)


def _build_device(trt: TensorRT) -> dict[str, Any]:
    """What the plan is tied to: the build GPU (full TensorRT) or TensorRT-RTX's portable targets."""
    if trt.library == "tensorrt_rtx":
        return {"compute_capability": None, "targets": RTX_DEFAULT_TARGETS}
    import torch

    if not torch.cuda.is_available():
        return {"compute_capability": None, "targets": "unknown (no CUDA device visible to torch)"}
    major, minor = torch.cuda.get_device_capability()
    return {"compute_capability": [major, minor], "name": torch.cuda.get_device_name(), "targets": f"{major}.{minor}"}
