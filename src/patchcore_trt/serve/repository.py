"""Triton model repositories from patchcore-trt artifacts: REPO/NAME/config.pbtxt and REPO/NAME/1/<model files>.

- ``.engine`` -> platform ``tensorrt_plan`` (model.plan); batch and shapes from the engine's profile (its sidecar).
- ``.onnx`` (FP32, FP16 or INT8) -> platform ``onnxruntime_onnx`` (model.onnx plus its external data file).
- ``.ckpt`` -> backend ``python``: model.py (python_model.py) and model.ckpt; each instance loads the checkpoint
  once, on its GPU (the cuda backend) or on the CPU (the torch backend). Clients send uint8 [N, H, W, 3] images of
  any size.

Every config has dynamic batching (no queue delay by default: see build_config), an instance group, variable H/W
where the artifact allows it and the model's thresholds and metadata as parameters. The config is built as Triton's own
``ModelConfig`` protobuf (tritonclient ships model_config_pb2), written as text, then parsed back and checked before
the model folder takes its final name.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchcore_trt.artifact import INPUT_NAME, LINE_OUTPUT_NAMES, MAX_BATCH, MIN_SIDE, OUTPUT_NAMES
from patchcore_trt.errors import UserError
from patchcore_trt.images import MAX_PIXELS
from patchcore_trt.serve.sources import CHECKPOINT_FILE, MODEL_FILES, Source, describe

VERSION = "1"
DEFAULT_NAME = "patchcore"
DEFAULT_MAX_BATCH = 16
# A lone request is executed at once; requests that arrive while every instance is busy are merged into one batch
# (Triton's default). A delay only helps clients that trade latency for batch size, so it is theirs to ask for.
DEFAULT_QUEUE_DELAY_US = 0
INSTANCE_KINDS = ("gpu", "cpu")
# A GPU instance captures one CUDA graph per batch size 1..max batch at load (serve/python_model.py), so batches run
# unpadded; load time and graph memory grow with the maximum (gpu/executor.py).
MAX_PYTHON_GPU_BATCH = 128
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_VERSION = re.compile(r"^[1-9][0-9]*$")
MODEL_PY = '''"""Triton Python backend entry point for a patchcore-trt model (written by `patchcore-trt triton`)."""

from patchcore_trt.serve.python_model import TritonPythonModel  # noqa: F401
'''


def model_config_pb2() -> Any:
    """Triton's ModelConfig protobuf module, as tritonclient ships it."""
    try:
        from tritonclient.grpc import model_config_pb2 as module
    except ImportError:
        raise UserError("tritonclient is not installed; install it with: pip install 'patchcore-trt[serve]'") from None
    return module


@dataclass(frozen=True)
class ServeOptions:
    """How a model is served. None means the default: ``max_batch`` the engine's profile maximum, else
    DEFAULT_MAX_BATCH; ``max_pixels`` predict's own limit (images.MAX_PIXELS); on a GPU ``mode`` the cuda backend's
    default (exact), and ``backbone_dtype`` / ``search`` the mode's choices."""

    name: str = DEFAULT_NAME
    max_batch: int | None = None
    instances: int = 1
    kind: str = "gpu"
    gpus: tuple[int, ...] = ()
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    max_pixels: int | None = None
    mode: str | None = None
    backbone_dtype: str | None = None
    search: str | None = None
    trust_pickled_code: bool = False
    anomalib_version: str | None = None
    max_request_pixels: int | None = None

    def check(self) -> None:
        if not _NAME.match(self.name):
            raise UserError(f"model name {self.name!r} must be letters, digits, '_', '.' or '-' (not starting '.')")
        if self.max_batch is not None and not 1 <= self.max_batch <= MAX_BATCH:
            raise UserError(f"--max-batch {self.max_batch} must be between 1 and {MAX_BATCH}")
        if not 1 <= self.instances <= 64:
            raise UserError(f"--instances {self.instances} must be between 1 and 64")
        if self.kind not in INSTANCE_KINDS:
            raise UserError(f"--kind {self.kind!r} must be one of: {', '.join(INSTANCE_KINDS)}")
        if self.gpus and self.kind != "gpu":
            raise UserError("--gpus applies to --kind gpu")
        if any(gpu < 0 for gpu in self.gpus) or len(set(self.gpus)) != len(self.gpus):
            raise UserError(f"--gpus {','.join(map(str, self.gpus))} must be distinct GPU numbers (0, 1, ...)")
        if not 0 <= self.queue_delay_us <= 10_000_000:
            raise UserError(f"--queue-delay-us {self.queue_delay_us} must be between 0 and 10,000,000")
        if self.max_pixels is not None and self.max_pixels < MIN_SIDE * MIN_SIDE:
            raise UserError(f"--max-pixels {self.max_pixels} must be at least {MIN_SIDE * MIN_SIDE}")
        if self.max_request_pixels is not None and self.max_request_pixels < (self.max_pixels or MAX_PIXELS):
            raise UserError(
                f"--max-request-pixels {self.max_request_pixels} must be at least the largest image "
                f"(--max-pixels, {self.max_pixels or MAX_PIXELS})"
            )


@dataclass(frozen=True)
class WrittenModel:
    folder: Path
    config: Any  # model_config_pb2.ModelConfig
    platform: str


def _max_batch(source: Source, options: ServeOptions) -> int:
    if source.max_batch is None:
        wanted = options.max_batch or DEFAULT_MAX_BATCH
    elif options.max_batch is None:
        wanted = source.max_batch
    elif options.max_batch > source.max_batch:
        raise UserError(f"--max-batch {options.max_batch} is over the engine's profile maximum of {source.max_batch}")
    else:
        wanted = options.max_batch
    if source.platform == "python" and options.kind == "gpu" and wanted > MAX_PYTHON_GPU_BATCH:
        raise UserError(f"--max-batch {wanted} is over {MAX_PYTHON_GPU_BATCH} for the GPU Python model")
    return wanted


def _check_source_options(source: Source, options: ServeOptions) -> None:
    if source.platform != "python":
        flags = (("--mode", options.mode), ("--backbone-dtype", options.backbone_dtype), ("--search", options.search))
        flags += (("--max-pixels", options.max_pixels), ("--max-request-pixels", options.max_request_pixels))
        flags += (("--anomalib-version", options.anomalib_version),)
        given = [flag for flag, value in flags if value is not None]
        if given:
            raise UserError(f"{', '.join(given)}: for .ckpt models only (an .onnx or .engine carries its own limits)")
    if source.platform == "tensorrt_plan" and options.kind == "cpu":
        raise UserError("a TensorRT engine runs on a GPU; use --kind gpu, or serve the .onnx with --kind cpu")
    if source.platform == "python":
        if options.kind == "cpu" and (options.mode or options.backbone_dtype or options.search):
            raise UserError(
                "--mode, --backbone-dtype and --search apply to --kind gpu (the CPU model is the reference)"
            )
        # Checked here, from the registry's data, rather than when an instance loads.
        from patchcore_trt.runtime import OPTIONS

        for name in ("mode", "backbone_dtype", "search"):
            value = getattr(options, name)
            if value is not None:
                OPTIONS[name].check(name, value)


def build_config(source: Source, options: ServeOptions) -> Any:
    """The ModelConfig protobuf for ``source`` served as ``options`` say."""
    pb = model_config_pb2()
    max_batch = _max_batch(source, options)
    config = pb.ModelConfig(name=options.name, max_batch_size=max_batch)
    height, width = (side if side is not None else -1 for side in source.input_size)
    if source.platform == "python":
        config.backend = "python"
        config.input.add(name=INPUT_NAME, data_type=pb.TYPE_UINT8, dims=[-1, -1, 3])
    else:
        config.platform = source.platform
        config.input.add(name=INPUT_NAME, data_type=pb.TYPE_FP32, dims=[3, height, width])
    line = source.parameters.get("line") == "true"
    # A line's products may differ in model size (-1 x -1 then), as a map at the input's size does.
    map_dims = [1, -1, -1] if source.map_at_input_size else [1, *source.model_size]
    score, label, anomaly_map, mask = OUTPUT_NAMES
    config.output.add(name=score, data_type=pb.TYPE_FP32, dims=[1], reshape=pb.ModelTensorReshape(shape=[]))
    config.output.add(name=label, data_type=pb.TYPE_BOOL, dims=[1], reshape=pb.ModelTensorReshape(shape=[]))
    config.output.add(name=anomaly_map, data_type=pb.TYPE_FP32, dims=map_dims)
    config.output.add(name=mask, data_type=pb.TYPE_BOOL, dims=map_dims)
    if line:
        product, sha256 = LINE_OUTPUT_NAMES
        config.output.add(name=product, data_type=pb.TYPE_UINT8, dims=[-1])
        config.output.add(name=sha256, data_type=pb.TYPE_UINT8, dims=[32])
    # No preferred sizes: with them, seven queued requests would run as 4 + 2 + 1 (the largest preferred size
    # first) instead of one batch of 7.
    config.dynamic_batching.max_queue_delay_microseconds = options.queue_delay_us
    kind = pb.ModelInstanceGroup.KIND_GPU if options.kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=options.instances, gpus=list(options.gpus))
    parameters = dict(source.parameters)
    if source.platform == "python":
        gpu = options.kind == "gpu"
        cuda = gpu and not line
        if not line:
            parameters["artifact"] = CHECKPOINT_FILE
        parameters.update(
            # A line runs the torch model on its instance's device: FP32, the reference's arithmetic.
            runtime="cuda" if cuda else "torch",
            # The cuda backend's mode and overrides as given ("" = the mode's own choice).
            mode=(options.mode or "exact") if cuda else "",
            backbone_dtype=(options.backbone_dtype or "") if cuda else "fp32",
            search=(options.search or "") if cuda else "certified",
            max_pixels=str(options.max_pixels or MAX_PIXELS),
            # A whole request (every image of it) is bounded too: the model process holds it and its maps at once.
            max_request_pixels=str(options.max_request_pixels or max(options.max_pixels or MAX_PIXELS, MAX_PIXELS)),
            anomalib_version=options.anomalib_version or "",
            trust_pickled_code=str(options.trust_pickled_code).lower(),
        )
    for key, value in sorted(parameters.items()):
        config.parameters[key].string_value = value
    return config


def parse_config(path: Path) -> Any:
    """Parse a config.pbtxt with Triton's ModelConfig protobuf; a UserError names the file and the problem."""
    from google.protobuf import text_format

    pb = model_config_pb2()
    try:
        return text_format.Parse(Path(path).read_text(), pb.ModelConfig())
    except text_format.ParseError as exc:
        raise UserError(f"{path}: not a valid Triton model config ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def platform_of(config: Any) -> str:
    """``python``, ``tensorrt_plan``, ``onnxruntime_onnx`` (or whatever else the config names)."""
    if config.backend:
        return {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}.get(config.backend, config.backend)
    return config.platform


def versions(folder: Path) -> list[int]:
    """The numbered version folders of a model, oldest first (staging and failed folders are hidden, not numbers)."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name))


def check_model_folder(folder: Path, *, name: str | None = None) -> Any:
    """Parse and check REPO/NAME (config.pbtxt and version 1); returns the config."""
    path = folder / "config.pbtxt"
    if not path.is_file():
        raise UserError(f"{folder}: no config.pbtxt; write the model with 'patchcore-trt triton'")
    config = parse_config(path)
    problems = []
    if config.name != (name or folder.name):
        problems.append(f"name {config.name!r} differs from its folder {name or folder.name!r}")
    if config.max_batch_size < 1:
        problems.append("max_batch_size must be at least 1 (patchcore-trt models batch)")
    big = [size for size in config.dynamic_batching.preferred_batch_size if size > config.max_batch_size]
    if big:
        problems.append(f"preferred batch sizes {big} exceed max_batch_size {config.max_batch_size}")
    if not config.instance_group or any(group.count < 1 for group in config.instance_group):
        problems.append("every instance group needs a count of at least 1")
    for tensor in [*config.input, *config.output]:
        if not tensor.dims or any(dim == 0 or dim < -1 for dim in tensor.dims):
            problems.append(f"tensor {tensor.name!r} has invalid dims {list(tensor.dims)}")
    names = [tensor.name for tensor in [*config.input, *config.output]]
    if len(set(names)) != len(names):
        problems.append(f"tensor names repeat: {names}")
    expected = MODEL_FILES.get(platform_of(config))
    newest = str(versions(folder)[-1]) if versions(folder) else VERSION
    if expected and not (folder / newest / expected).is_file():
        problems.append(f"version {newest} has no {expected}")
    if problems:
        raise UserError(f"{path}: {'; '.join(problems)}")
    return config


def check_output_folder(repository: Path, name: str, *, force: bool) -> Path:
    """Where the model goes, checked before any work: REPO must be a folder, REPO/NAME new unless ``force``."""
    for folder in (repository, *repository.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"{folder}: is a file, not a folder")
            break
    final = repository / name
    if final.exists() and not force:
        raise UserError(f"{final}: already exists; pass --force to replace it")
    return final


def write_model(artifact: Path, repository: Path, options: ServeOptions, *, force: bool = False) -> WrittenModel:
    """Write REPO/NAME for ``artifact``; the folder appears under its name only once its config checks pass."""
    from google.protobuf import text_format

    options.check()
    repository = Path(repository)
    final = check_output_folder(repository, options.name, force=force)
    source = describe(
        Path(artifact), trust_pickled_code=options.trust_pickled_code, anomalib_version=options.anomalib_version
    )
    _check_source_options(source, options)
    config = build_config(source, options)
    repository.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{options.name}.", suffix=".part", dir=repository))
    try:
        version = staged / VERSION
        version.mkdir()
        for file_name, origin in source.files.items():
            shutil.copyfile(origin, version / file_name)
        if source.platform == "python":
            (version / MODEL_FILES["python"]).write_text(MODEL_PY)
        (staged / "config.pbtxt").write_text(text_format.MessageToString(config, use_short_repeated_primitives=True))
        if check_model_folder(staged, name=options.name) != config:
            raise RuntimeError(f"{staged / 'config.pbtxt'} does not parse back to the config that was written")
        staged.chmod(0o755)
        _replace(staged, final)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return WrittenModel(final, config, source.platform)


def _replace(staged: Path, final: Path) -> None:
    if not final.exists():
        os.rename(staged, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.rename(final, old / final.name)
    os.rename(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def read_repository(repository: Path, problems: dict[str, str] | None = None) -> dict[str, Any]:
    """Every model of a repository, name -> checked config; a UserError for anything Triton would not load.

    With ``problems``, a damaged model folder is recorded there (name -> the reason) and left out instead, so the
    other models can still be served. Folders starting with '.' (a staging folder left by a crash) are no models.
    """
    repository = Path(repository)
    if not repository.is_dir():
        raise UserError(f"{repository}: no such folder")
    folders = sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{repository}: holds no model; write one with 'patchcore-trt triton MODEL -o {repository}'")
    configs = {}
    for folder in folders:
        try:
            configs[folder.name] = check_model_folder(folder)
        except UserError as exc:
            if problems is None:
                raise
            problems[folder.name] = str(exc)
    return configs


def machine_kind() -> str:
    """Where this machine can run a model instance: gpu when torch sees a CUDA GPU, else cpu."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return "gpu" if torch.cuda.is_available() else "cpu"
