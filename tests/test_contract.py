"""One contract for every registered backend and every input kind it declares (catches drift).

The test walks the registry, so a new backend is held to the contract as soon as it is registered: the triton
backend against a real Triton server on 127.0.0.1 (the CPU Python model of the same checkpoint); backends this
machine cannot run (no GPU, no TensorRT runtime) are skipped with the reason. float32 [N, 3, H, W] and uint8
[N, H, W, 3] inputs of the same pixels must give identical results: the base class converts uint8 exactly as
``images.load_image`` decodes a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from patchcore_trt.compare import PARITY_BAR, compare
from patchcore_trt.errors import UserError
from patchcore_trt.images import load_image, uint8_to_float
from patchcore_trt.runtime import REGISTRY, backend_info, backend_names, open_backend
from patchcore_trt.runtime.base import input_kind
from patchcore_trt.serve.server import TritonServer, free_ports

MODEL = "contract"


@pytest.fixture(scope="module")
def triton_url(resnet18_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real Triton server serving the checkpoint on CPU instances, for the triton backend's rows (CI always has
    one: .ci/serve-env; elsewhere, such as the GPU machine, its rows skip when no tritonserver is installed)."""
    from patchcore_trt.serve.server import find_distribution

    try:
        find_distribution()
    except UserError as exc:
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip(f"no tritonserver here: {exc}")
    repo = tmp_path_factory.mktemp("contract_repo")
    written = run_cli("triton", resnet18_checkpoint, "-o", repo, "--kind", "cpu", "--name", MODEL, "--max-batch", 4)
    assert written.returncode == 0, written.stderr
    server = TritonServer(repo, free_ports(), log_file=tmp_path_factory.mktemp("log") / "triton.log")
    with server:
        server.start(timeout_s=240)
        yield f"grpc://{server.grpc_url}"


@pytest.fixture(params=backend_names())
def backend(request, resnet18_checkpoint, resnet18_onnx):
    info = backend_info(request.param)
    if info.schemes:
        artifact, options = request.getfixturevalue("triton_url"), {"model": MODEL}
    else:
        artifacts = {".ckpt": resnet18_checkpoint, ".onnx": resnet18_onnx}
        if info.suffixes[0] not in artifacts:
            pytest.skip(f"{info.name} runs {info.suffixes[0]} files, which need a GPU with a TensorRT runtime")
        artifact, options = artifacts[info.suffixes[0]], {}
    try:
        opened = open_backend(artifact, info.name, **options)
    except UserError as exc:
        pytest.skip(f"{info.name} cannot run on this machine: {exc}")
    with opened:
        yield opened


def _uint8_images(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).integers(0, 256, (batch, 120, 90, 3), dtype=np.uint8)


def _as_kind(images: np.ndarray, kind: str) -> object:
    if kind == "float32":
        return uint8_to_float(images)
    if kind == "uint8":
        return images
    import torch

    return torch.from_numpy(images).cuda()


@pytest.mark.parametrize("kind", ["float32", "uint8", "device"])
@pytest.mark.parametrize("batch", [1, 3])
def test_outputs_have_one_shape_and_type_for_every_input_kind(backend, kind, batch):
    if kind == "device" and kind not in backend.native_inputs:
        pytest.skip(f"{backend.name} does not take device tensors")
    prediction = backend.predict(_as_kind(_uint8_images(batch), kind))
    assert prediction.pred_score.dtype == np.float32 and prediction.pred_score.shape == (batch,)
    assert prediction.pred_label.dtype == np.bool_ and prediction.pred_label.shape == (batch,)
    assert prediction.anomaly_map.dtype == np.float32 and prediction.anomaly_map.shape == (batch, 1, 256, 256)
    assert prediction.pred_mask.dtype == np.bool_ and prediction.pred_mask.shape == (batch, 1, 256, 256)
    np.testing.assert_array_equal(prediction.pred_label, backend.postprocess.label(prediction.pred_score))
    np.testing.assert_array_equal(prediction.pred_mask, backend.postprocess.mask(prediction.anomaly_map))


def test_float_and_uint8_inputs_give_identical_results(backend):
    images = _uint8_images(2)
    from_floats, from_uint8 = backend.predict(uint8_to_float(images)), backend.predict(images)
    if str(backend.device).startswith("cuda"):  # one graph per input kind: cuDNN may pick other kernels for each
        assert compare(from_uint8, from_floats, threshold=backend.image_threshold).within(PARITY_BAR)
        return
    for field in ("pred_score", "pred_label", "anomaly_map", "pred_mask"):
        np.testing.assert_array_equal(getattr(from_uint8, field), getattr(from_floats, field), err_msg=field)


def test_uint8_converts_exactly_as_a_file_decodes(dataset):
    path = next(dataset.test_good.glob("*.png"))
    from PIL import Image

    with Image.open(path) as image:
        decoded = np.asarray(image.convert("RGB"))[None]
    assert np.array_equal(uint8_to_float(decoded)[0], load_image(path))


def test_every_registry_entry_declares_what_its_class_implements():
    from patchcore_trt.runtime.base import Backend

    for info in REGISTRY.values():
        assert set(info.inputs) <= {"float32", "uint8", "device"} and "float32" in info.inputs, info.name
        module, name = info.target.split(":")
        try:
            cls = getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, UserError):
            continue  # an optional dependency (TensorRT) that is not here
        assert issubclass(cls, Backend) and cls.name == info.name
        for kind, hook in (("uint8", "_infer_uint8"), ("device", "_infer_device")):
            overridden = getattr(cls, hook) is not getattr(Backend, hook)
            assert overridden == (kind in info.inputs), (info.name, kind)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((3, 64, 64), dtype=np.float32), r"expected images as a \[N, 3, H, W\] array"),
        (np.zeros((1, 1, 64, 64), dtype=np.float32), r"got shape \(1, 1, 64, 64\)"),
        (np.zeros((0, 3, 64, 64), dtype=np.float32), "the batch is empty"),
        (np.zeros((0, 64, 64, 3), dtype=np.uint8), "the batch is empty"),
        (np.zeros((1, 16, 64, 3), dtype=np.uint8), "images of 16x64 pixels are too small"),
        (np.zeros((1, 3, 64, 64), dtype=np.uint8), r"uint8 images go in as decoded, \[N, H, W, 3\]"),
        ([[1.0]], r"got shape None"),
    ],
    ids=["no-batch-axis", "one-channel", "empty", "empty-uint8", "small-uint8", "uint8-nchw", "not-an-array"],
)
def test_bad_input_is_refused_the_same_way(backend, images, message):
    with pytest.raises(UserError, match=message):
        backend.predict(images)


def test_input_kinds_are_told_apart_without_torch():
    assert input_kind(np.zeros((1, 64, 64, 3), np.uint8)) == "uint8"
    assert input_kind(np.zeros((1, 3, 64, 64), np.uint8)) == "float32"  # refused later, with the layout hint
    assert input_kind(np.zeros((1, 3, 64, 64), np.float32)) == "float32"


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


@pytest.mark.parametrize(
    ("artifact", "backend", "options", "message"),
    [
        ("grpc://127.0.0.1:1", None, {"mode": "fast"}, "--mode apply to --backend cuda, not triton"),
        ("model.ckpt", "cuda", {"mode": "quick"}, "--mode 'quick' is not one of exact, fast"),
        ("model.ckpt", "cuda", {"backbone_dtype": "fp8"}, "--backbone-dtype 'fp8' is not one of fp32, tf32"),
        ("model.onnx", "triton", {}, "backend 'triton' runs a server"),
        ("http://127.0.0.1:1", "onnxruntime", {}, "backend 'onnxruntime' runs .onnx files"),
    ],
)
def test_the_registry_checks_urls_and_option_choices_before_importing(artifact, backend, options, message, tmp_path):
    from patchcore_trt.runtime import check_request

    if not artifact.startswith(("grpc", "http")):
        (tmp_path / artifact).write_bytes(b"")
        artifact = str(tmp_path / artifact)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        check_request(artifact, backend, **options)


def test_a_server_url_opens_the_triton_backend_like_a_file(triton_url, resnet18_checkpoint):
    with open_backend(triton_url, model=MODEL) as remote, open_backend(resnet18_checkpoint) as local:
        assert remote.name == "triton" and remote.postprocess == local.postprocess
        images = _uint8_images(2)
        served, reference = remote.predict(images), local.predict(images)
        np.testing.assert_array_equal(served.pred_score, reference.pred_score)
        np.testing.assert_array_equal(served.anomaly_map, reference.anomaly_map)
        described = remote.describe()
        assert described["model"] == MODEL and described["rule"] == local.postprocess.rule
