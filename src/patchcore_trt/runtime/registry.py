"""Every backend's facts as data, torch-free: the one place the CLI, the serve checks, the bench and the contract
tests read what a backend runs, where, on which inputs and with which options.

Nothing here imports a backend: a request is checked against these facts before any heavy module loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Input kinds of Backend.predict: float32 [N, 3, H, W] in [0, 1]; uint8 [N, H, W, 3] as decoded; a CUDA tensor of
# either layout. Every backend takes the first two (the base class converts uint8 exactly as images.load_image
# does); ``inputs`` lists what a backend takes natively.
INPUT_KINDS = ("float32", "uint8", "device")
URL_SCHEMES = ("http://", "https://", "grpc://")
# A server named without a scheme (``host:8001``) is reached over gRPC: Triton's binary protocol, where one
# connection carries every request in flight and tensors are not text-encoded.
BARE_SCHEME = "grpc://"
BARE_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):[0-9]{1,5}$")


@dataclass(frozen=True)
class Option:
    """A keyword option of a backend's constructor, as the command line shows it.

    Attributes:
        help: One line for ``--help``.
        choices: The values it takes, where it is a choice.
        default: What it means when not given (shown in help; the backend applies it).
    """

    help: str
    choices: tuple[str, ...] = ()
    default: str | None = None

    def check(self, name: str, value: object) -> None:
        from patchcore_trt.errors import UserError

        if self.choices and value not in self.choices:
            raise UserError(f"{flag(name)} {value!r} is not one of {', '.join(self.choices)}")

    def help_text(self) -> str:
        choices = f" One of: {', '.join(self.choices)}." if self.choices else ""
        default = f" Default: {self.default}." if self.default else ""
        return f"{self.help}{choices}{default}"


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


# What each cuda mode runs: the backbone's arithmetic and the precision of the distances the search returns.
CUDA_MODES = {
    "exact": {"backbone_dtype": "fp32", "search": "certified"},
    "fast": {"backbone_dtype": "fp16", "search": "certified"},
}

OPTIONS: dict[str, Option] = {
    "trust_pickled_code": Option("Unpickle code objects a checkpoint carries (only for files you trust)."),
    "map_at_input_size": Option("Return maps at the input resolution instead of the model's."),
    "anomalib_version": Option("The anomalib release that wrote the checkpoint, where the file cannot tell."),
    "mode": Option(
        "exact gives anomalib's FP32 results; fast runs the backbone in FP16 (|d score| about 1e-3).",
        tuple(CUDA_MODES),
        "exact",
    ),
    "backbone_dtype": Option("The backbone's arithmetic, overriding the mode's.", ("fp32", "tf32", "fp16", "bf16")),
    "search": Option(
        "The bank search, overriding the mode's: certified (anomalib's FP32 nearest row and distance, proven from FP16"
        " candidates) or fp16 (the FP16 distances themselves).",
        ("certified", "fp16"),
    ),
    "graphs": Option("Replay CUDA graphs (off: eager launches, for profiling)."),
    "max_batch": Option(
        "The largest batch run as one CUDA graph: one graph per batch size up to it (a server passes its largest"
        " batch); larger batches run in chunks of it.",
        default="64",
    ),
    "threads": Option("Intra-op threads (0: ONNX Runtime's default)."),
    "qdq_fusion": Option("Fuse QuantizeLinear/DequantizeLinear pairs into INT8 kernels."),
    "cuda_graph": Option("Replay a CUDA graph per input shape."),
    "model": Option("The served model's name; default: the server's only ready model."),
    "product": Option("The product to score, on a line model (one served model for many products)."),
    "concurrency": Option("Requests in flight at once."),
    "timeout_s": Option("Seconds to wait for each answer."),
    "maps": Option("Ask the server for anomaly maps and masks, not only scores and labels (default: yes)."),
    "shm": Option(
        "How tensors reach the server: none (in the requests) or system (shared memory in /dev/shm; the server must"
        " run on this machine).",
        ("none", "system"),
        "none",
    ),
}


@dataclass(frozen=True)
class BackendInfo:
    """What a backend is, as data.

    Attributes:
        target: ``module:Class``, imported on first use so optional dependencies stay optional.
        suffixes: Artifact files it runs (none for a backend addressed by URL).
        devices: Device kinds it runs on; the first is its default. ``cuda`` also admits ``cuda:N``.
        options: Keyword options its constructor takes besides the artifact and device (see OPTIONS).
        default_for: Suffixes it runs when no backend is named.
        inputs: Input kinds it takes natively (INPUT_KINDS); the base class converts uint8 for the others.
        schemes: URL schemes of its artifact, for a backend that runs somewhere else (a server).
    """

    name: str
    target: str
    suffixes: tuple[str, ...]
    devices: tuple[str, ...]
    options: tuple[str, ...] = ()
    default_for: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ("float32",)
    schemes: tuple[str, ...] = ()


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
            (*_CHECKPOINT_OPTIONS, "mode", "backbone_dtype", "search", "graphs", "max_batch"),
            inputs=("float32", "uint8", "device"),
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
        BackendInfo(
            "triton", "patchcore_trt.runtime.triton_backend:TritonBackend", (), ("server",),
            ("model", "product", "concurrency", "timeout_s", "shm", "maps"), inputs=("float32", "uint8"),
            schemes=URL_SCHEMES,
        ),
    )
}  # fmt: skip


def options_of(backend: str) -> dict[str, Option]:
    """The options ``backend`` takes, with their help and choices."""
    return {name: OPTIONS[name] for name in REGISTRY[backend].options}
