"""One contract for every registered backend: same input checks, same output types and shapes (catches drift).

The test walks the registry, so a new backend is held to the contract as soon as it is registered; backends
this machine cannot run (no GPU, no TensorRT runtime) are skipped with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest

from patchcore_trt.errors import UserError
from patchcore_trt.runtime import backend_info, backend_names, open_backend


@pytest.fixture(params=backend_names())
def backend(request, resnet18_checkpoint, resnet18_onnx):
    info = backend_info(request.param)
    artifacts = {".ckpt": resnet18_checkpoint, ".onnx": resnet18_onnx}
    if info.suffixes[0] not in artifacts:
        pytest.skip(f"{info.name} runs {info.suffixes[0]} files, which need a GPU with a TensorRT runtime")
    try:
        opened = open_backend(artifacts[info.suffixes[0]], info.name)
    except UserError as exc:
        pytest.skip(f"{info.name} cannot run on this machine: {exc}")
    with opened:
        yield opened


@pytest.mark.parametrize("batch", [1, 3])
def test_outputs_have_one_shape_and_type(backend, batch):
    images = np.random.default_rng(batch).random((batch, 3, 120, 90), dtype=np.float32)
    prediction = backend.predict(images)
    assert prediction.pred_score.dtype == np.float32 and prediction.pred_score.shape == (batch,)
    assert prediction.pred_label.dtype == np.bool_ and prediction.pred_label.shape == (batch,)
    assert prediction.anomaly_map.dtype == np.float32 and prediction.anomaly_map.shape == (batch, 1, 256, 256)
    assert prediction.pred_mask.dtype == np.bool_ and prediction.pred_mask.shape == (batch, 1, 256, 256)
    np.testing.assert_array_equal(prediction.pred_label, prediction.pred_score > backend.image_threshold)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((3, 64, 64), dtype=np.float32), r"expected images as a \[N, 3, H, W\] array"),
        (np.zeros((1, 1, 64, 64), dtype=np.float32), r"got shape \(1, 1, 64, 64\)"),
        (np.zeros((0, 3, 64, 64), dtype=np.float32), "the batch is empty"),
        ([[1.0]], r"got shape None"),
    ],
    ids=["no-batch-axis", "one-channel", "empty", "not-an-array"],
)
def test_bad_input_is_refused_the_same_way(backend, images, message):
    with pytest.raises(UserError, match=message):
        backend.predict(images)


@pytest.mark.parametrize(
    ("backend", "device"),
    [("onnxruntime", "cuda:1"), ("onnxruntime", "cuda:0"), ("cuda", "cuda:3"), ("tensorrt", "cuda:12")],
)
def test_the_registry_admits_cuda_n_for_gpu_backends(backend, device):
    from patchcore_trt.runtime import check_device

    # The registry's check needs no GPU: it answers from the backend's facts, before anything is imported.
    assert check_device(backend_info(backend), device) == device


@pytest.mark.parametrize(
    ("backend", "device"),
    [
        ("onnxruntime", "cuda:x"),
        ("onnxruntime", "cpu:0"),
        ("onnxruntime", "cuda:"),
        ("torch", "cuda:1"),
        ("openvino", "gpu"),
    ],
)
def test_the_registry_refuses_devices_a_backend_does_not_run_on(backend, device):
    from patchcore_trt.runtime import check_device

    info = backend_info(backend)
    with pytest.raises(UserError, match=f"backend '{backend}' runs on {', '.join(info.devices)}, not '{device}'"):
        check_device(info, device)
