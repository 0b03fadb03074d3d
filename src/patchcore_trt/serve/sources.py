"""What a Triton model needs to know about each artifact: tensor shapes, batch limits, files, thresholds.

One reader per artifact kind, each returning a ``Source``; repository.py turns a Source into a config. Only the
checkpoint reader imports torch (it reads the checkpoint, as every runtime does); ONNX and engines are read from
their own metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import patchcore_trt
from patchcore_trt.artifact import ArtifactMetadata, read_onnx_metadata, read_sidecar, sidecar_model_metadata
from patchcore_trt.errors import UserError
from patchcore_trt.files import sha256_of

# The Triton platform that serves what each local backend runs (the registry decides which backend runs a file).
PLATFORMS = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx", "torch": "python"}
# The file Triton loads from the version folder, per platform (Triton's default_model_filename).
MODEL_FILES = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx", "python": "model.py"}
CHECKPOINT_FILE = "model.ckpt"


@dataclass(frozen=True)
class Source:
    """An artifact as a Triton model sees it.

    Attributes:
        platform: ``tensorrt_plan``, ``onnxruntime_onnx`` or ``python``.
        model_size: The resolution the model resizes to (the map's size unless ``map_at_input_size``).
        map_at_input_size: Maps come back at the input's size (variable) instead of the model's.
        input_size: (height, width) of the input when the artifact fixes them; None where it is variable.
        max_batch: The largest batch the artifact accepts (an engine's profile), None where it has no limit.
        files: Version-folder file name -> the file to copy there.
        parameters: Metadata for the config's ``parameters`` (strings, as Triton stores them).
    """

    platform: str
    model_size: tuple[int, int]
    map_at_input_size: bool
    input_size: tuple[int | None, int | None]
    max_batch: int | None
    files: dict[str, Path]
    parameters: dict[str, str] = field(default_factory=dict)


def check_artifact(artifact: Path) -> Path:
    """``artifact`` if it is a file Triton can serve, else a UserError: a folder is named as a folder (whatever its
    name looks like), then a wrong suffix, then a missing file."""
    from patchcore_trt.runtime import REGISTRY

    artifact = Path(artifact)
    suffix = artifact.suffix.lower()
    served = [suffix for name in PLATFORMS for suffix in REGISTRY[name].default_for]
    if artifact.is_dir():
        raise UserError(f"{artifact}: is a folder; expected a model file ({', '.join(served)})")
    if suffix not in served:
        raise UserError(f"{artifact}: cannot serve a {suffix or 'suffix-less'} file; expected {', '.join(served)}")
    if not artifact.is_file():
        raise UserError(f"{artifact}: no such file")
    return artifact


def describe(artifact: Path, *, trust_pickled_code: bool = False, anomalib_version: str | None = None) -> Source:
    """Read ``artifact`` (.engine, .onnx or .ckpt) into a Source, or raise a UserError saying why not."""
    artifact = check_artifact(artifact)
    suffix = artifact.suffix.lower()
    if suffix == ".engine":
        return _engine(artifact)
    if suffix == ".onnx":
        return _onnx(artifact)
    return _checkpoint(artifact, trust_pickled_code, anomalib_version)


def _common(metadata: ArtifactMetadata, source_file: Path, sha256: str) -> dict[str, str]:
    post = metadata.postprocess
    return {
        "patchcore_trt_version": patchcore_trt.__version__,
        "source_file": source_file.name,
        "source_sha256": sha256,
        "precision": metadata.precision,
        "backbone": metadata.backbone,
        "layers": ",".join(metadata.layers),
        "bank_size": str(metadata.bank_size),
        "embedding_dim": str(metadata.embedding_dim),
        "num_neighbors": str(metadata.num_neighbors),
        "model_size": "x".join(map(str, metadata.model_size)),
        "map_at_input_size": str(metadata.map_at_input_size).lower(),
        # Normalised thresholds and the label rule, for operators reading the config; clients read ``metadata``.
        "image_threshold": repr(post.normalized_image_threshold),
        "pixel_threshold": repr(post.normalized_pixel_threshold),
        "rule": post.rule,
        "metadata": metadata.to_json(),
    }


def _engine(path: Path) -> Source:
    document = read_sidecar(path)
    metadata = sidecar_model_metadata(path, document)
    library, version = document["tensorrt"].get("library"), document["tensorrt"].get("version")
    if library == "tensorrt_rtx":
        raise UserError(
            f"{path}: built by TensorRT-RTX {version}, whose plans only TensorRT-RTX runs; Triton's tensorrt_plan "
            "backend runs full TensorRT plans: build the engine with the TensorRT of the Triton you deploy on, or "
            "serve the .onnx (onnxruntime) or the .ckpt (Python backend) instead"
        )
    expected = document["engine"].get("sha256")
    if expected and sha256_of(path) != expected:
        raise UserError(
            f"{path}: does not match its metadata file (another build?); rebuild it with 'patchcore-trt build'"
        )
    profile = document["profile"]
    low, high = profile["min"], profile["max"]
    if low[0] != 1:
        raise UserError(
            f"{path}: its profile starts at batch {low[0]}; Triton needs batch 1 in it (rebuild with 1xHxW)"
        )
    height = low[2] if low[2] == high[2] else None
    width = low[3] if low[3] == high[3] else None
    parameters = {**_common(metadata, path, expected or sha256_of(path)), "tensorrt": f"{library} {version}"}
    parameters["profile"] = json.dumps(profile)
    return Source(
        "tensorrt_plan", metadata.model_size, metadata.map_at_input_size, (height, width), int(high[0]),
        {MODEL_FILES["tensorrt_plan"]: path}, parameters,
    )  # fmt: skip


def _external_files(path: Path) -> list[str]:
    """The external data files the graph names (their names are written inside it, so they keep them)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.update(entry.value for entry in tensor.external_data if entry.key == "location")
    for name in names:
        if Path(name).is_absolute() or ".." in Path(name).parts or not (path.parent / name).is_file():
            raise UserError(f"{path}: its external data {name} is missing beside it; export it again")
    return sorted(names)


def _onnx(path: Path) -> Source:
    metadata = read_onnx_metadata(path)
    files = {MODEL_FILES["onnxruntime_onnx"]: path, **{name: path.parent / name for name in _external_files(path)}}
    return Source(
        "onnxruntime_onnx", metadata.model_size, metadata.map_at_input_size, (None, None), None, files,
        _common(metadata, path, sha256_of(path)),
    )  # fmt: skip


def _checkpoint(path: Path, trust_pickled_code: bool, anomalib_version: str | None) -> Source:
    from patchcore_trt.checkpoint import read_checkpoint
    from patchcore_trt.export import build_metadata

    spec = read_checkpoint(path, trust_pickled_code=trust_pickled_code, anomalib_version=anomalib_version)
    metadata = build_metadata(spec, map_at_input_size=False)
    parameters = _common(metadata, path, spec.source_sha256)
    del parameters["precision"]  # the instance kind and backbone_dtype decide it (repository.py)
    return Source("python", spec.preprocess.model_size, False, (None, None), None, {CHECKPOINT_FILE: path}, parameters)
