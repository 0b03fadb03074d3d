"""The contract of every file patchcore-trt writes, without torch: tensor names, limits, metadata, file names.

A runtime that only reads artifacts (ONNX Runtime, OpenVINO, TensorRT, a Triton client) imports this module and
nothing heavier, so a mistake on a light path (a missing file, a wrong suffix) is answered at once.

- The ONNX graph takes ``image`` float32 RGB [N, 3, H, W] in [0, 1] and returns ``OUTPUT_NAMES``; its metadata
  (``ArtifactMetadata``) is JSON in ``metadata_props[METADATA_KEY]``, so the file needs no side file.
- A TensorRT engine stays a plain plan; its metadata is the JSON sidecar ``<engine>.json``, tied to the plan by
  its SHA-256.
- Reduced-precision variants live beside their FP32 export: ``variant_path``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from patchcore_trt.errors import MissingDependencyError, UserError
from patchcore_trt.files import naming, write_text_atomic
from patchcore_trt.outputs import Postprocess

INPUT_NAME = "image"
OUTPUT_NAMES = ("pred_score", "pred_label", "anomaly_map", "pred_mask")
OUTPUT_RANKS = (1, 1, 4, 4)
# A line model's extra outputs: which product answered (UTF-8 bytes) and its checkpoint's SHA-256 (32 bytes).
LINE_OUTPUT_NAMES = ("product", "product_sha256")
MIN_OPSET = 17
METADATA_KEY = "patchcore_trt"
METADATA_FORMAT = 2
# Format 1 (before the post-processing rules were recorded) computed anomalib 2.7's rules; it reads as such.
READABLE_FORMATS = (1, 2)
SIDECAR_FORMAT = 1
PRECISIONS = ("fp32", "fp16", "int8")

# Shapes the exported graph accepts (torch.export's dynamic dimension ranges) and that images may have.
MIN_SIDE = 32
MAX_SIDE = 8192
MAX_BATCH = 1024
# protobuf cannot hold a single message over 2 GiB; larger graphs keep their tensors in an external data file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

_INPUT_SPEC = {"name": INPUT_NAME, "layout": "NCHW", "channels": "RGB", "dtype": "float32", "range": [0.0, 1.0]}


@dataclass(frozen=True)
class ArtifactMetadata:
    """What an exported graph computes, stored inside the ONNX file.

    ``transform`` is the pre-processing the graph itself applies (resize without antialiasing, optional centre
    crop, normalisation): what a caller must reproduce to feed the backbone directly. ``postprocess`` holds the
    statistics and the release's rules (``normalize``, ``threshold_inclusive``, ``zero_range``: see
    outputs.Postprocess); ``written_by`` the anomalib release that wrote the source checkpoint and the evidence.
    """

    precision: str
    model_size: tuple[int, int]
    map_at_input_size: bool
    backbone: str
    layers: tuple[str, ...]
    bank_size: int
    embedding_dim: int
    num_neighbors: int
    transform: dict[str, Any]
    postprocess: Postprocess
    source_checkpoint: dict[str, str]
    producer: str
    versions: dict[str, str]
    details: dict[str, Any] = field(default_factory=dict)
    written_by: dict[str, str] = field(default_factory=dict)
    format: int = METADATA_FORMAT

    @property
    def input(self) -> dict[str, Any]:
        """The graph's input: name, layout, channel order, dtype and value range."""
        return dict(_INPUT_SPEC)

    @property
    def image_threshold(self) -> float:
        """The normalised score at which the label changes (``postprocess.rule`` says on which side)."""
        return self.postprocess.normalized_image_threshold

    def with_precision(self, precision: str, **details: Any) -> ArtifactMetadata:
        """The metadata of a reduced-precision variant of this graph."""
        return ArtifactMetadata(**{**self._fields(), "precision": precision, "details": {**self.details, **details}})

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def to_json(self) -> str:
        document = asdict(self)
        document.update(input=_INPUT_SPEC, outputs=list(OUTPUT_NAMES))
        # Strict JSON has no NaN (a zero range before 2.7, statistics never computed without normalisation); null
        # reads back as NaN.
        document["postprocess"] = {
            key: None if isinstance(value, float) and math.isnan(value) else value
            for key, value in document["postprocess"].items()
        }
        return json.dumps(document, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, where: Path) -> ArtifactMetadata:
        """Parse and check the stored JSON; any damage is a UserError naming ``where``."""
        try:
            raw = json.loads(text)
        except ValueError:
            raise UserError(f"{where}: its patchcore-trt metadata is not valid JSON; export it again") from None
        if not isinstance(raw, dict):
            raise UserError(f"{where}: its patchcore-trt metadata is not a JSON object; export it again")
        version = raw.get("format")
        if version not in READABLE_FORMATS:
            newer = isinstance(version, int) and version > METADATA_FORMAT
            reason = "a newer patchcore-trt; upgrade patchcore-trt" if newer else "an unknown writer; export it again"
            raise UserError(
                f"{where}: metadata format {version!r} comes from {reason} (this one reads {METADATA_FORMAT})"
            )
        try:
            metadata = cls(
                precision=_choice(raw["precision"], PRECISIONS),
                model_size=_size(raw["model_size"]),
                map_at_input_size=bool(raw["map_at_input_size"]),
                backbone=str(raw["backbone"]),
                layers=tuple(str(layer) for layer in raw["layers"]),
                bank_size=_positive(raw["bank_size"]),
                embedding_dim=_positive(raw["embedding_dim"]),
                num_neighbors=_positive(raw["num_neighbors"]),
                transform=dict(raw["transform"]),
                postprocess=Postprocess.from_dict(raw["postprocess"]),
                source_checkpoint=dict(raw["source_checkpoint"]),
                producer=str(raw["producer"]),
                versions=dict(raw["versions"]),
                details=dict(raw.get("details", {})),
                written_by={str(key): str(value) for key, value in dict(raw.get("written_by", {})).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise UserError(f"{where}: its patchcore-trt metadata is damaged ({problem}); export it again") from None
        return metadata


def _choice(value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _positive(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{value!r} is not a positive whole number")
    return value


def _size(value: Any) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"model_size {value!r} is not [height, width]")
    height, width = (_positive(side) for side in value)
    return height, width


def read_onnx_metadata(path: Path | str) -> ArtifactMetadata:
    """The patchcore-trt metadata of an exported ONNX file (its external weights are not loaded)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty; export it again")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends with no common base
        raise UserError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
    check_external_data(path, model)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return ArtifactMetadata.from_json(prop.value, path)
    raise UserError(f"{path}: not exported by patchcore-trt (no {METADATA_KEY!r} metadata); run 'patchcore-trt export'")


def external_data_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name + ".data")


def check_external_data(path: Path, model: Any) -> None:
    """Refuse a graph whose external data file is missing or shorter than its tensors need, in one line.

    Every backend would otherwise fail in its own words: ONNX Runtime logs a C++ exception, OpenVINO says only
    "Exception from src/inference/src/cpp/core.cpp".
    """
    import onnx

    needed: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        end = int(entries.get("offset") or 0) + int(entries.get("length") or 0)
        location = entries.get("location", "")
        needed[location] = max(needed.get(location, 0), end)
    for location, end in needed.items():
        data = path.parent / location
        if not data.is_file():
            raise UserError(f"{path}: its external data {location} is missing; export it again")
        size = data.stat().st_size
        if size < end:
            raise UserError(
                f"{path}: its external data {location} is truncated ({size:,} of {end:,} bytes); export it again"
            )


@contextlib.contextmanager
def staged_onnx(path: Path) -> Iterator[Path]:
    """Yield a path in a fresh folder beside ``path``; the graph (and its external data) move to ``path`` only if
    the block succeeds, so checks run on the staged file before it takes its final name.

    The external data file is named after the final graph (its name is written inside the graph), so it is
    staged under that name in the private folder and never appended to an earlier export's data.
    """
    path = Path(path)
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        staged = folder / path.name
        yield staged
        umask = os.umask(0)
        os.umask(umask)
        data = external_data_path(staged)
        for produced in (data, staged):
            if produced.exists():
                produced.chmod(0o666 & ~umask)
        if data.exists():
            os.replace(data, external_data_path(path))
        else:
            external_data_path(path).unlink(missing_ok=True)  # a stale one would be mistaken for this graph's
        os.replace(staged, path)
    except OSError as exc:
        # A full disk while the graph is written (onnx's writer names no file) or the staged files are moved
        # is about the user's output, never about the hidden folder it is staged in.
        if exc.filename is None or str(exc.filename).startswith(str(folder)):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_onnx(proto: Any, path: Path) -> None:
    """Write an onnx.ModelProto to ``path`` (inside ``staged_onnx``); tensors go to PATH.data near 2 GiB."""
    import onnx

    if proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        data_name = external_data_path(path).name
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
    else:
        onnx.save_model(proto, str(path))


def save_onnx(proto: Any, path: Path) -> None:
    """Write ``proto`` to ``path`` atomically, with its external data if it needs one."""
    with staged_onnx(path) as staged:
        write_onnx(proto, staged)


def check_opset(opset: int) -> None:
    """UserError for an opset the exporter does not write; needs onnx only, so it is answered before torch loads."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise UserError(f"opset {opset} is not supported: patchcore-trt exports opset {MIN_OPSET} to {newest}")


def check_graph_io(path: Path, inputs: dict[str, int | None], outputs: dict[str, int | None]) -> None:
    """UserError unless the graph (its tensor names and ranks, as a runtime loaded them) is what patchcore-trt
    metadata describes: one [N, 3, H, W] ``image`` in, the four PatchCore outputs out. Another network carrying
    copied metadata would otherwise fail deep inside the runtime on its first batch."""
    expected = {name: rank for name, rank in zip(OUTPUT_NAMES, OUTPUT_RANKS, strict=True)}
    wrong = set(inputs) != {INPUT_NAME} or inputs[INPUT_NAME] not in (4, None)
    wrong = wrong or any(name not in outputs or outputs[name] not in (rank, None) for name, rank in expected.items())
    if wrong:

        def shown(tensors: dict[str, int | None]) -> str:
            return ", ".join(f"{name} (rank {'?' if rank is None else rank})" for name, rank in tensors.items())

        raise UserError(
            f"{path}: the graph's inputs [{shown(inputs)}] and outputs [{shown(outputs)}] are not what its "
            f"patchcore-trt metadata says (input {INPUT_NAME} (rank 4); outputs {shown(expected)}): another "
            "network with copied metadata?"
        )


def ort_session(
    path: Path,
    *,
    device: str = "cpu",
    threads: int = 0,
    config: dict[str, str] | None = None,
    provider_options: dict[str, Any] | None = None,
) -> Any:
    """A quiet ONNX Runtime session on ``cpu`` or ``cuda[:N]``, or an install hint; ``provider_options`` go to the
    CUDA execution provider (e.g. ``{"use_tf32": 0}``)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime") from exc
    kind, _, index = device.partition(":")
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[kind]
    if provider not in ort.get_available_providers():
        raise UserError(
            f"onnxruntime: {provider} is not available in this onnxruntime build (pip install onnxruntime-gpu)"
        )
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: its errors are raised, and shown below in one line
    options.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    cuda_options = {"device_id": int(index or 0), **(provider_options or {})}
    providers: list[Any] = [provider] if kind == "cpu" else [(provider, cuda_options)]
    data = external_data_path(path)
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types with no common base
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if "external" in first_line.lower() or (data.exists() and "data" in first_line.lower()):
            raise UserError(f"{path}: its external data {data.name} is missing or truncated; export it again") from None
        raise UserError(f"{path}: onnxruntime cannot load the graph ({first_line})") from None


def variant_path(onnx_path: Path, precision: str, kind: str) -> Path:
    """Where ``build`` keeps what it derives from the FP32 export ``MODEL.onnx``.

    kind: ``onnx`` (MODEL.fp16.onnx), ``engine`` (MODEL.fp16.engine) or ``calibration`` (MODEL.int8.calib.json).
    """
    suffix = {"onnx": ".onnx", "engine": ".engine", "calibration": ".calib.json"}[kind]
    if kind == "onnx" and precision == "fp32":
        return onnx_path
    return onnx_path.with_name(f"{onnx_path.stem}.{precision}{suffix}")


def sidecar_path(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


def write_sidecar(engine: Path, document: dict[str, Any]) -> Path:
    path = sidecar_path(engine)
    write_text_atomic(path, json.dumps({"format": SIDECAR_FORMAT, **document}, indent=2))
    return path


def read_sidecar(engine: Path) -> dict[str, Any]:
    """The JSON written beside an engine by ``build``, checked for the keys a runtime relies on."""
    path = sidecar_path(Path(engine))
    if not path.is_file():
        raise UserError(f"{engine}: no metadata file {path.name} beside it; rebuild it with 'patchcore-trt build'")
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable engine metadata ({exc}); rebuild the engine") from None
    problems = []
    if not isinstance(document, dict):
        problems.append("not a JSON object")
    else:
        if document.get("format") != SIDECAR_FORMAT:
            problems.append(f"format {document.get('format')!r}, expected {SIDECAR_FORMAT}")
        for key in ("engine", "tensorrt", "profile", "model"):
            if not isinstance(document.get(key), dict):
                problems.append(f"no {key!r} section")
    if problems:
        raise UserError(f"{path}: damaged engine metadata ({'; '.join(problems)}); rebuild the engine")
    return document


def sidecar_model_metadata(engine: Path, document: dict[str, Any]) -> ArtifactMetadata:
    """The graph metadata a sidecar carries (what the engine computes)."""
    return ArtifactMetadata.from_json(json.dumps(document["model"]), sidecar_path(engine))
