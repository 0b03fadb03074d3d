"""A ``tensorrt_plan`` repository, written from an engine whose metadata says full TensorRT, without a GPU: the
config Triton's full build would read, parsed back with Triton's own ModelConfig protobuf. The plan itself is
opaque bytes to the writer (it copies them), so any bytes stand in for it; the sidecar is the one ``build``
writes, with the library and version a full TensorRT build records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import error_line, run_cli

from patchcore_trt.artifact import read_onnx_metadata, write_sidecar
from patchcore_trt.serve.repository import parse_config, platform_of

PROFILE = {"min": [1, 3, 256, 256], "opt": [4, 3, 256, 256], "max": [8, 3, 256, 256]}


def engine_from(onnx_path: Path, folder: Path, library: str, version: str) -> Path:
    engine = folder / "model.fp16.engine"
    engine.write_bytes(b"serialized plan " * 64)
    write_sidecar(
        engine,
        {
            "engine": {"bytes": engine.stat().st_size, "sha256": hashlib.sha256(engine.read_bytes()).hexdigest()},
            "tensorrt": {"library": library, "version": version},
            "profile": PROFILE,
            "precision": "fp16",
            "model": json.loads(read_onnx_metadata(onnx_path).to_json()),
        },
    )
    return engine


def test_a_full_tensorrt_engine_becomes_a_tensorrt_plan_repository(resnet18_onnx, tmp_path):
    engine = engine_from(resnet18_onnx, tmp_path, "tensorrt", "10.13.3")
    written = run_cli("triton", engine, "-o", tmp_path / "repo", "--kind", "gpu", "--name", "plan")
    assert written.returncode == 0, written.stderr
    config = parse_config(tmp_path / "repo" / "plan" / "config.pbtxt")  # Triton's own ModelConfig protobuf
    assert platform_of(config) == "tensorrt_plan"
    assert config.max_batch_size == PROFILE["max"][0]
    (image,) = config.input
    assert list(image.dims) == PROFILE["max"][1:]  # fixed H and W: the profile's min and max agree
    assert {tensor.name for tensor in config.output} == {"pred_score", "pred_label", "anomaly_map", "pred_mask"}
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["tensorrt"] == "tensorrt 10.13.3" and json.loads(parameters["profile"]) == PROFILE
    assert (tmp_path / "repo" / "plan" / "1" / "model.plan").read_bytes() == engine.read_bytes()


def test_a_tensorrt_rtx_engine_is_refused_by_name(resnet18_onnx, tmp_path):
    """The branch above is the sidecar's library: the same files from TensorRT-RTX are refused."""
    engine = engine_from(resnet18_onnx, tmp_path, "tensorrt_rtx", "1.7.1.116")
    line = error_line(run_cli("triton", engine, "-o", tmp_path / "repo", "--kind", "gpu"))
    assert "TensorRT-RTX" in line and "tensorrt_plan" in line
    assert not (tmp_path / "repo" / "patchcore").exists()


def test_a_plan_is_not_served_on_cpu_instances(resnet18_onnx, tmp_path):
    engine = engine_from(resnet18_onnx, tmp_path, "tensorrt", "10.13.3")
    assert "runs on a GPU" in error_line(run_cli("triton", engine, "-o", tmp_path / "repo", "--kind", "cpu"))
