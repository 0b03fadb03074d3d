"""Cheap checks come before slow work: a bad option, a file that is not a checkpoint, a GPU backend on a machine
without a GPU, or an output folder nothing can be written in is answered in one line before torch, anomalib or a
runtime is imported (each takes seconds to load), and before any warning about later steps.

Checked without timings: the command runs in a fresh process that reports, at exit, which heavy modules it
loaded.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import error_line

from patchcore_trt.runtime import GPU_NODES

HEAVY = ("torch", "anomalib", "onnxruntime", "openvino", "tensorrt", "tensorrt_rtx")
_REPORTING = f"""
import atexit, runpy, sys
atexit.register(lambda: print("loaded:", *sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr))
sys.argv = ["patchcore-trt", *sys.argv[1:]]
runpy.run_module("patchcore_trt", run_name="__main__")
"""


def _run(*args: object) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """``patchcore-trt ARGS`` in a fresh process, and the heavy modules it had imported when it exited."""
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", _REPORTING, *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    lines = result.stderr.splitlines()
    (loaded,) = [line.split()[1:] for line in lines if line.startswith("loaded:")]
    stderr = "\n".join(line for line in lines if not line.startswith("loaded:"))
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout, stderr), loaded


@pytest.fixture()
def png_named_ckpt(dataset, tmp_path: Path) -> Path:
    fake = tmp_path / "model.ckpt"
    shutil.copy(next(dataset.test_good.glob("*.png")), fake)
    return fake


def test_an_unsupported_opset_is_refused_before_torch_loads(resnet18_checkpoint, tmp_path):
    result, loaded = _run("export", resnet18_checkpoint, "-o", tmp_path / "out", "--opset", "13")
    assert error_line(result).startswith("error: opset 13 is not supported: patchcore-trt exports opset 17 to ")
    assert loaded == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["export", "predict", "verify"])
def test_a_png_named_ckpt_is_refused_before_torch_loads(command, png_named_ckpt, dataset, tmp_path):
    args = ("-o", tmp_path / "out") if command == "export" else (dataset.test_good,)
    result, loaded = _run(command, png_named_ckpt, *args)
    assert error_line(result) == (
        f"error: {png_named_ckpt}: not a PyTorch checkpoint (expected a Lightning .ckpt from anomalib)"
    )
    assert loaded == []


def test_an_output_folder_nothing_can_be_created_in_is_refused_before_torch_loads(resnet18_checkpoint):
    # /sys refuses every new file, even root's, whose os.access says writable; the probe made there fails.
    result, loaded = _run("export", resnet18_checkpoint, "-o", "/sys/patchcore-trt-out")
    assert error_line(result) == "error: /sys: cannot create files here (Operation not permitted); choose another "\
        "output location"  # fmt: skip
    assert loaded == []


@pytest.mark.parametrize(
    ("args", "backend"),
    [(("predict", "CKPT", "IMAGES", "--backend", "cuda"), "cuda"),
     (("predict", "ONNX", "IMAGES", "--device", "cuda:1"), "onnxruntime"),
     (("verify", "CKPT", "IMAGES", "--backends", "onnxruntime,cuda"), "cuda")],
)  # fmt: skip
def test_a_gpu_backend_without_a_gpu_is_refused_before_anything_loads(
    args, backend, resnet18_checkpoint, resnet18_onnx, dataset
):
    if glob.glob("/dev/nvidia[0-9]*") or any(map(os.path.exists, GPU_NODES)):
        pytest.skip("this machine has a GPU")
    named = {"CKPT": resnet18_checkpoint, "ONNX": resnet18_onnx, "IMAGES": dataset.test_good}
    result, loaded = _run(*(named.get(arg, arg) for arg in args))
    device = "cuda:1" if "cuda:1" in args else "cuda"
    assert (
        error_line(result) == f"error: backend '{backend}' on {device} needs an NVIDIA GPU, and this machine has none"
    )
    assert loaded == []


@pytest.mark.parametrize(
    ("args", "message"),
    [(("--precision", "fp99"), "error: --precision 'fp99': choose one of fp32, fp16, int8"),
     (("--workspace", "-1"), "error: --workspace must be a number of GiB in (0, 4096], got -1.0")],
)  # fmt: skip
def test_build_refuses_a_bad_option_before_any_warning(args, message, resnet18_onnx, tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copy(resnet18_onnx, model)
    result, loaded = _run("build", model, *args)
    assert error_line(result) == message
    assert result.stderr.strip() == message  # the one line: no TensorRT-RTX notice before it
    assert "torch" not in loaded
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]
