"""Split TF32 (gpu/split_tf32.py) on the CPU: the rounding, the split, the Triton kernel (interpreter), and the
scheme's accuracy emulated exactly. Every part the split makes is a TF32 value, so a CPU FP32 convolution of
the parts computes what the tensor cores do (up to the order of the sum); zeroing the low parts turns the same
code into plain TF32, which each accuracy test must catch (so that the tests can fail). Nothing is timed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from patchcore_trt.demo.synthetic_model import synthetic_spec, texture_images
from patchcore_trt.gpu import split_tf32
from patchcore_trt.gpu.fast_model import FastPatchCore, fold_batchnorm
from patchcore_trt.gpu.fused_resnet import FusedResNetFeatures, fuse_resnet
from patchcore_trt.gpu.split_tf32 import round_tf32, split_activations, split_parts, split_weight
from patchcore_trt.model import PatchCoreDeploy, create_backbone

SRC = Path(__file__).resolve().parents[1] / "src"
BAR_SCORE, BAR_MAP = 1e-5, 1e-4


def _values(seed: int, count: int = 20000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, generator=generator) * torch.logspace(-6, 6, count).roll(seed)


def _tf32_by_numpy(x: torch.Tensor) -> np.ndarray:
    """Round to 11 significant bits in float64, ties to even: an independent statement of TF32 rounding."""
    mantissa, exponent = np.frexp(x.numpy().astype(np.float64))
    return np.ldexp(np.rint(mantissa * 2**11) / 2**11, exponent)


@pytest.mark.parametrize("seed", [0, 1])
def test_round_tf32_is_round_to_nearest_even_on_11_bits(seed):
    x = _values(seed)
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 2 - 2**-12], dtype=torch.float32)
    x = torch.cat([x, ties])
    rounded = round_tf32(x)
    assert np.array_equal(rounded.numpy().astype(np.float64), _tf32_by_numpy(x))
    assert (rounded.view(torch.int32) & 0x1FFF).eq(0).all()  # a TF32 value: the 13 low mantissa bits are zero


def test_split_parts_are_tf32_values_that_sum_to_the_input():
    x = _values(2)
    hi, lo = split_parts(x)
    assert torch.equal(round_tf32(hi), hi) and torch.equal(round_tf32(lo), lo)
    error = (hi.double() + lo.double() - x.double()).abs() / x.double().abs()
    assert error.max() <= 2**-22


def test_split_layouts_line_up_the_three_products():
    x = torch.rand(2, 5, 4, 3).contiguous(memory_format=torch.channels_last)
    w = torch.randn(7, 5, 3, 3)
    xs, ws = split_activations(x), split_weight(w)
    assert xs.shape == (2, 15, 4, 3) and xs.is_contiguous(memory_format=torch.channels_last)
    assert ws.shape == (7, 15, 3, 3)
    (x_hi, x_lo), (w_hi, w_lo) = split_parts(x), split_parts(w)
    # One convolution over the split channels is the sum of the three products.
    three = F.conv2d(x_hi, w_hi, padding=1) + F.conv2d(x_lo, w_hi, padding=1) + F.conv2d(x_hi, w_lo, padding=1)
    torch.testing.assert_close(F.conv2d(xs, ws, padding=1), three, rtol=1e-6, atol=1e-6)


def _split_conv_error(monkeypatch, plain: bool) -> float:
    if plain:  # zero low parts: the same code computes plain TF32
        monkeypatch.setattr(split_tf32, "split_parts", lambda v: (round_tf32(v), torch.zeros_like(v)))
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(2, 64, 12, 12, generator=generator) + 0.5  # post-ReLU-like: products do not cancel
    w = torch.randn(32, 64, 3, 3, generator=generator) * 0.05
    want = F.conv2d(x.double(), w.double(), padding=1)
    got = F.conv2d(split_tf32.split_activations(x), split_tf32.split_weight(w), padding=1)
    return float((got.double() - want).norm() / want.norm())


def test_split_convolution_is_fp32_accurate_and_plain_tf32_is_not(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(2, 64, 12, 12, generator=generator) + 0.5
    w = torch.randn(32, 64, 3, 3, generator=generator) * 0.05
    want = F.conv2d(x.double(), w.double(), padding=1)
    fp32 = float((F.conv2d(x, w, padding=1).double() - want).norm() / want.norm())
    split = _split_conv_error(monkeypatch, plain=False)
    plain = _split_conv_error(monkeypatch, plain=True)
    assert split <= 10 * fp32 + 1e-7, (split, fp32)
    assert plain >= 30 * split, (plain, split)


@pytest.fixture(scope="module")
def spec():
    return synthetic_spec(200, (64, 80), backbone="resnet18", seed=5)


@pytest.fixture(scope="module")
def images():
    return torch.cat([texture_images(3, (64, 80), seed=31), texture_images(3, (64, 80), seed=32, defects=True)])


def _errors_vs_fp64(spec, images, backbone_dtype: str) -> tuple[float, float, bool]:
    floats = images.permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want = PatchCoreDeploy(spec).double().eval()(floats.double())
        model = FastPatchCore(spec, backbone_dtype=backbone_dtype).eval()
        assert isinstance(model.backbone, FusedResNetFeatures) and model.backbone.split_tf32
        got = model.forward_uint8(images)
    score = float((got.pred_score.double() - want.pred_score).abs().max())
    anomaly_map = float((got.anomaly_map.double() - want.anomaly_map).abs().max())
    return score, anomaly_map, bool(torch.equal(got.pred_label, want.pred_label))


def test_split_backbone_meets_the_parity_bar_against_fp64(spec, images):
    score, anomaly_map, labels = _errors_vs_fp64(spec, images, "split_tf32")
    assert score <= BAR_SCORE / 2 and anomaly_map <= BAR_MAP / 2 and labels, (score, anomaly_map)


def test_the_parity_check_catches_plain_tf32(spec, images, monkeypatch):
    monkeypatch.setattr(split_tf32, "split_parts", lambda v: (round_tf32(v), torch.zeros_like(v)))
    score, anomaly_map, _ = _errors_vs_fp64(spec, images, "split_tf32")
    assert score > BAR_SCORE or anomaly_map > BAR_MAP, (score, anomaly_map)


def test_the_fused_check_accepts_the_split_and_rejects_plain_tf32(monkeypatch):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        split = fuse_resnet(fold_batchnorm(create_backbone("resnet18", ("layer2", "layer3")).eval()), split_tf32=True)
        assert split.agrees_with_plain(images)
        monkeypatch.setattr(split_tf32, "split_parts", lambda v: (round_tf32(v), torch.zeros_like(v)))
        plain = fuse_resnet(fold_batchnorm(create_backbone("resnet18", ("layer2", "layer3")).eval()), split_tf32=True)
        assert not plain.agrees_with_plain(images)


def test_a_network_that_is_not_a_resnet_runs_split_tf32_in_ieee_fp32():
    model = FastPatchCore(
        synthetic_spec(60, (64, 64), backbone="efficientnet_b0", layers=("blocks.2", "blocks.4"), seed=2),
        backbone_dtype="split_tf32",
    )
    assert not isinstance(model.backbone, FusedResNetFeatures) and not model.conv_tf32


TRITON_CHECK = """
import torch
from patchcore_trt.gpu.split_tf32 import split_parts
from patchcore_trt.gpu.split_tf32_triton import split_activations_cuda
generator = torch.Generator().manual_seed(7)
# A block size that leaves a tail, channels that divide no block, values over many binades, ties.
x = torch.randn(2, 5, 3, 7, generator=generator) * torch.logspace(-4, 4, 210).view(2, 5, 3, 7)
x.view(-1)[:3] = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11)])
x = x.contiguous(memory_format=torch.channels_last)
hi, lo = split_parts(x)
got = split_activations_cuda(x, block=64)
assert got.is_contiguous(memory_format=torch.channels_last)
assert torch.equal(got, torch.cat([hi, lo, hi], dim=1))
print("kernel agrees")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernel (benchmarks/backbone_error.py)")
def test_triton_split_kernel_matches_its_torch_specification():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(TRITON_CHECK)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0 and "kernel agrees" in result.stdout, result.stderr[-3000:]
