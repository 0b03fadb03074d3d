"""The exported ONNX graph: dynamic shapes, metadata inside, external data for big banks, self-check."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import onnx
import pytest

from patchcore_trt import artifact as artifact_module
from patchcore_trt.artifact import read_onnx_metadata
from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.errors import UserError
from patchcore_trt.export import export_onnx
from patchcore_trt.files import sha256_of
from patchcore_trt.report import json_ready
from patchcore_trt.runtime import open_backend


def test_graph_has_dynamic_batch_height_and_width(resnet18_onnx):
    model = onnx.load(str(resnet18_onnx), load_external_data=False)
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "image"
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert outputs["pred_score"] == ["batch"]
    assert outputs["anomaly_map"] == ["batch", 1, 256, 256]
    # The README says opset 18: the exported graph declares exactly that.
    assert [op.version for op in model.opset_import if op.domain in ("", "ai.onnx")] == [18]


def test_metadata_is_inside_the_file(resnet18_checkpoint, resnet18_onnx):
    spec = read_checkpoint(resnet18_checkpoint)
    meta = read_onnx_metadata(resnet18_onnx)
    assert meta.source_checkpoint["sha256"] == sha256_of(resnet18_checkpoint)
    assert meta.postprocess.image_threshold == pytest.approx(spec.postprocess.image_threshold)
    assert list(meta.model_size) == [256, 256]
    assert meta.input == {"name": "image", "layout": "NCHW", "channels": "RGB", "dtype": "float32", "range": [0, 1]}
    assert meta.bank_size == spec.bank_size and meta.precision == "fp32"
    # The graph resizes as anomalib's exported model does (no antialiasing), whatever the training transform did;
    # the training transform is kept beside it.
    training = asdict(spec.preprocess)
    assert meta.transform["antialias"] is False
    assert {k: v for k, v in meta.transform.items() if k != "antialias"} == json_ready(
        {k: v for k, v in training.items() if k != "antialias"}
    )
    assert meta.details["training_transform"] == json_ready(training)


def test_runs_at_any_batch_and_size(resnet18_onnx):
    backend = open_backend(resnet18_onnx)
    rng = np.random.default_rng(0)
    for batch, height, width in ((1, 64, 64), (4, 512, 384), (2, 257, 1001)):
        prediction = backend.predict(rng.random((batch, 3, height, width), dtype=np.float32))
        assert prediction.pred_score.shape == (batch,)
        assert prediction.anomaly_map.shape == (batch, 1, 256, 256)
        assert ((prediction.pred_score >= 0) & (prediction.pred_score <= 1)).all()


def test_large_banks_use_external_data(resnet18_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(artifact_module, "EXTERNAL_DATA_THRESHOLD", 1000)
    path, checks = export_onnx(read_checkpoint(resnet18_checkpoint), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > path.stat().st_size
    # ONNX Runtime loaded the external weights and matched the deploy model at the three shapes the README names.
    assert [(check.batch, check.height, check.width) for check in checks] == [
        (1, 256, 256),
        (2, 300, 200),
        (3, 180, 333),
    ]
    assert not list(tmp_path.glob("*.part"))


def test_old_opset_is_refused(resnet18_checkpoint, tmp_path):
    with pytest.raises(UserError, match="opset 16 is not supported"):
        export_onnx(read_checkpoint(resnet18_checkpoint), tmp_path / "m.onnx", opset=16)


def test_foreign_onnx_is_named(tmp_path):
    graph = onnx.helper.make_graph([], "empty", [], [])
    path = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(UserError, match="not exported by patchcore-trt"):
        read_onnx_metadata(path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 100)
    with pytest.raises(UserError, match="not a readable ONNX file"):
        read_onnx_metadata(garbage)
