"""The backbone's Triton kernels (gpu/conv_triton.py) against their torch twins, on the CPU through Triton's
interpreter (compiled on a GPU where there is one), and the FP32 backbone's fused walk against the plain one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from interpreter import run_kernels

from patchcore_trt.demo.synthetic_model import synthetic_spec
from patchcore_trt.gpu.fast_model import FastPatchCore
from patchcore_trt.gpu.fused_resnet import FusedResNetFeatures, TritonConvAct, exact_conv_act

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

EPILOGUE_CHECK = """
import sys
import torch
from patchcore_trt.gpu.conv_triton import epilogue
device = sys.argv[1]
generator = torch.Generator().manual_seed(0)

def bits(tensor):
    return tensor.contiguous().view(torch.int32)

def activations(shape, layout):
    values = torch.randn(shape, generator=generator) * 3
    flat = values.view(-1)
    # Values whose sum is exactly 0 (+0.0), negative zeros, NaN and infinities: the select must keep each.
    special = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), float("-inf"), 1e-45, -1e-45])
    flat[: min(7, flat.numel())] = special[: flat.numel()]
    return values.contiguous(memory_format=layout)

checked = 0
# Odd shapes: channels and pixels that fill no block, a tensor smaller than one block, one channel.
for shape in [(3, 37, 7, 5), (1, 5, 1, 1), (2, 1, 9, 11), (2, 131, 13, 3)]:
    for layout in (torch.contiguous_format, torch.channels_last):
        for residual_layout in (layout, torch.contiguous_format):
            conv, residual = activations(shape, layout), activations(shape, residual_layout)
            bias = torch.randn(shape[1], generator=generator)
            bias[0] = -0.0
            for with_bias in (True, False):
                for with_residual in (True, False):
                    for relu in (True, False):
                        # Today's separate passes: conv + bias, x += shortcut, an in-place ReLU.
                        want = conv + bias.view(1, -1, 1, 1) if with_bias else conv.clone()
                        if with_residual:
                            want += residual
                        if relu:
                            torch.relu_(want)
                        got = epilogue(conv.to(device).clone(memory_format=torch.preserve_format),
                                       bias.to(device) if with_bias else None,
                                       residual.to(device) if with_residual else None, relu).cpu()
                        assert got.stride() == conv.stride()
                        assert torch.equal(bits(got), bits(want)), (shape, layout, with_bias, with_residual, relu)
                        checked += 1
    # Split-K partial sums, added in order before the bias.
    parts = torch.randn((3, *shape), generator=generator)
    bias = torch.randn(shape[1], generator=generator)
    want = torch.relu(((parts[0] + parts[1]) + parts[2]) + bias.view(1, -1, 1, 1))
    got = epilogue(parts.to(device), bias.to(device), None, True, parts=3).cpu()
    assert torch.equal(bits(got), bits(want))
assert checked == 4 * 2 * 2 * 8
print("epilogue agrees")
"""


def test_fp32_epilogue_has_the_bits_of_the_separate_passes():
    """relu((conv + bias) + residual) in one kernel, NCHW and NHWC, on odd shapes and special values (NaN,
    infinities, signed zeros, subnormals), bit for bit the separate bias, add and ReLU passes."""
    run_kernels(EPILOGUE_CHECK, "epilogue agrees")


def test_fp32_backbone_is_nchw_and_its_fused_walk_is_the_plain_walk():
    """Exact mode's backbone: NCHW (cuDNN's FP32 layout), each convolution through exact_conv_act, and the fused
    walk equal to timm's plain walk (the check before capture asks for equality in FP32)."""
    spec = synthetic_spec(50, (64, 80), backbone="resnet18", seed=2)
    model = FastPatchCore(spec, backbone_dtype="fp32").eval()
    assert isinstance(model.backbone, FusedResNetFeatures) and model.backbone.fused is exact_conv_act
    assert model.memory_format == torch.contiguous_format
    assert all(p.is_contiguous() for p in model.backbone.parameters())
    images = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        normalized = model.preprocess(images)
        assert model.backbone.agrees_with_plain(normalized, 0.0)
        model.check_fused_backbone(images)
        assert isinstance(model.backbone, FusedResNetFeatures)
        assert model.embed(normalized).is_contiguous()
        half = FastPatchCore(spec, backbone_dtype="fp16")
        assert half.memory_format == torch.channels_last and half.backbone.fused is not exact_conv_act
        triton = FastPatchCore(spec, backbone_dtype="fp32", convolutions="ieee")
        assert triton.memory_format == torch.channels_last and isinstance(triton.backbone.fused, TritonConvAct)
    for dtype, convolutions in (("fp16", "tf32x3"), ("fp32", "tf32")):
        with pytest.raises(ValueError, match="convolutions"):
            FastPatchCore(spec, backbone_dtype=dtype, convolutions=convolutions)


CONV_CHECK = """
import sys
import torch
from torch.nn import functional as F
from patchcore_trt.gpu.conv_triton import ConvConfig, conv2d, pack_weight
device = sys.argv[1]
generator = torch.Generator().manual_seed(1)
UNIT = 2.0**-24  # FP32's unit roundoff

def bound(precision, terms, magnitude):
    # Worst-case rounding of an FP32 sum of ``terms`` products (any order), + bias, + residual: one rounding
    # per addition. Tensor-core accumulators may truncate rather than round (2 units per addition), and tf32x3
    # drops the low x low product and rounds each low part to TF32: 3 * 2**-22 = 12 units per product, over
    # three products per term.
    additions = terms + 2 if precision == "ieee" else 3 * terms + 2
    per_product = 0 if precision == "ieee" else 12
    return (per_product + 2 * additions) * UNIT * magnitude

# (batch, channels, out channels, H, W, kernel, stride, padding, input layout, split, bias, residual, relu):
# channels and sizes that fill no block, odd H and W, stride 2, padding, split reductions.
cases = [
    (2, 37, 19, 9, 7, 3, 1, 1, torch.channels_last, 1, True, True, True),
    (1, 20, 33, 11, 8, 3, 2, 1, torch.contiguous_format, 3, True, False, True),
    (3, 45, 40, 5, 3, 1, 1, 0, torch.channels_last, 1, False, True, True),
    (3, 45, 40, 5, 3, 1, 1, 0, torch.channels_last, 2, True, True, False),
    (2, 24, 17, 7, 9, 1, 2, 0, torch.channels_last, 1, True, False, False),
    (1, 3, 16, 13, 11, 7, 2, 3, torch.contiguous_format, 2, True, False, True),
]
config = ConvConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)
for batch, c, k, h, w, size, stride, padding, layout, split, with_bias, with_residual, relu in cases:
    x = (torch.randn(batch, c, h, w, generator=generator) + 0.5).contiguous(memory_format=layout)
    weight = torch.randn(k, c, size, size, generator=generator) / (c * size * size) ** 0.5
    bias = torch.randn(k, generator=generator) if with_bias else None
    out_h, out_w = (h + 2 * padding - size) // stride + 1, (w + 2 * padding - size) // stride + 1
    residual = torch.randn(batch, k, out_h, out_w, generator=generator) if with_residual else None
    want = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding)
    magnitude = F.conv2d(x.double().abs(), weight.double().abs(), None, stride, padding)
    if bias is not None:
        magnitude += bias.double().abs().view(1, -1, 1, 1)
    if residual is not None:
        want += residual.double()
        magnitude += residual.double().abs()
    if relu:
        want = want.clamp_min(0)
    results = {}
    for precision in ("ieee", "tf32x3", "tf32"):
        got = conv2d(
            x.to(device), pack_weight(weight).to(device), (size, size),
            None if bias is None else bias.to(device), None if residual is None else residual.to(device),
            relu, stride, padding, ConvConfig(**{**config.__dict__, "precision": precision, "split_k": split}),
        ).cpu()
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
        if precision != "tf32":  # one TF32 product: 2**-11 per operand, no FP32 bound holds
            error = (got.double() - want).abs()
            assert (error <= bound(precision, c * size * size, magnitude)).all(), (precision, float(error.max()))
        results[precision] = got
    if device == "cpu":
        # The interpreter ignores input_precision (np.matmul in FP32): it checks indexing, masks, split-K and
        # the epilogue, never TF32 rounding; tf32x3's accuracy is measured on a GPU (backbone_error.py layers).
        assert torch.equal(results["ieee"], results["tf32x3"]) and torch.equal(results["ieee"], results["tf32"])
print("convolutions agree")
"""


def test_implicit_gemm_convolutions_match_float64():
    """conv2d (3x3 shifted loads, 1x1 GEMMs, stride 2, padding, the 7x7 stem, split-K, NCHW and NHWC inputs, the
    fused epilogue) against torch's float64 convolution, within FP32's worst-case rounding bound."""
    run_kernels(CONV_CHECK, "convolutions agree")


WALK_CHECK = """
import sys
import torch
from patchcore_trt.demo.synthetic_model import synthetic_spec, texture_images
from patchcore_trt.gpu.fast_model import FastPatchCore
from patchcore_trt.gpu.fused_resnet import FusedResNetFeatures, TritonConvAct
from patchcore_trt.model import PatchCoreDeploy
device = sys.argv[1]
spec = synthetic_spec(150, (64, 80), backbone="resnet18", seed=3)
images = torch.cat([texture_images(2, (64, 80), seed=11), texture_images(2, (64, 80), seed=12, defects=True)])
floats = images.permute(0, 3, 1, 2).float() / 255
with torch.no_grad():
    expected = PatchCoreDeploy(spec).eval()(floats)
    model = FastPatchCore(spec, backbone_dtype="fp32", convolutions="tf32x3", device=device).eval()
    assert isinstance(model.backbone, FusedResNetFeatures) and isinstance(model.backbone.fused, TritonConvAct)
    model.check_fused_backbone(floats.to(device))  # agrees with the cuDNN walk, or it would have fallen back
    assert isinstance(model.backbone, FusedResNetFeatures)
    got = model(floats.to(device))
# The exact bar: anomalib's FP32 results within 1e-5 (score), 1e-4 (map), the same labels.
assert (got.pred_score.cpu() - expected.pred_score).abs().max() <= 1e-5
assert (got.anomaly_map.cpu() - expected.anomaly_map).abs().max() <= 1e-4
assert torch.equal(got.pred_label.cpu(), expected.pred_label)
print("walk agrees")
"""


def test_triton_backbone_walk_holds_the_exact_bar():
    """The whole fast model with the Triton convolutions (every ResNet-18 convolution, downsample shortcuts
    included) against the FP32 deploy model. In the interpreter the products are FP32 whatever the precision
    asked for: this checks the walk, not tf32x3's rounding (that needs a GPU run of this test)."""
    run_kernels(WALK_CHECK, "walk agrees")


def test_layer_study_runs_and_records_each_layer(tmp_path):
    """benchmarks/backbone_error.py's ``layers`` part on a tiny input (the interpreter without a GPU): the stem,
    a 3x3 and a strided 1x1 shortcut of wide_resnet50_2, the Triton kernels within FP32's worst-case bound (in
    units of u; on a GPU tf32x3 must hold it too, the interpreter computes FP32 for every precision)."""
    out = tmp_path / "layers.json"
    only = "conv1,layer1.0.conv2,layer2.0.downsample.0"
    command = f"""
import sys
sys.argv = ["backbone_error.py", {str(out)!r}, "layers", "--size", "32", "--batch", "1", "--only", {only!r}]
sys.path.insert(0, {str(BENCHMARKS)!r})
import backbone_error
backbone_error.main()
print("study done")
"""
    run_kernels(command, "study done")
    rows = json.loads(out.read_text())["layers"]
    assert [row["layer"] for row in rows] == only.split(",")
    assert [row["weight"][1:] for row in rows] == [[3, 7, 7], [128, 3, 3], [256, 1, 1]]
    for row in rows:
        # torch's own FP32 (cuDNN on a GPU may pick Winograd or FFT, outside this bound) is recorded, not bounded.
        assert 0 <= row["torch_fp32"]["max_abs"] < 1e-3
        for column in ("triton_ieee", "triton_tf32x3"):
            assert 0 <= row[column]["max_units"] <= 2 * (row["terms"] + 2), (row["layer"], column)
        # tf32x3's operand split: within the kernel test's tf32x3 bound (12 units per product, one rounding).
        assert 0 < row["emulated_tf32x3"]["max_units"] <= 12 + 1, row["layer"]


def test_tf32x3_emulation_rounds_as_the_tensor_cores_split():
    """benchmarks/tf32x3_estimate.py's emulation: TF32 keeps 10 mantissa bits, to nearest with ties away from
    zero; big + small recovers the value to 2**-22; a tf32x3 convolution lands near FP32's accuracy and one
    TF32 product near TF32's."""
    sys.path.insert(0, str(BENCHMARKS))
    from tf32x3_estimate import emulated, split, tf32

    ones = torch.tensor([1.0, -1.0])
    half_ulp = ones * (1 + 2.0**-11)  # exactly halfway between two TF32 values: away from zero
    assert torch.equal(tf32(half_ulp), ones * (1 + 2.0**-10))
    assert torch.equal(tf32(ones * (1 + 2.0**-11 - 2.0**-23)), ones)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    assert ((tf32(x).view(torch.int32) & 0x1FFF) == 0).all()
    big, small = split(x)
    assert ((big.double() + small.double() - x.double()).abs() <= 2.0**-22 * x.double().abs()).all()
    conv = torch.nn.Conv2d(64, 8, 3, padding=1)
    images = torch.rand(2, 64, 9, 7, generator=torch.Generator().manual_seed(1))
    want = torch.nn.functional.conv2d(images.double(), conv.weight.double(), conv.bias.double(), padding=1)
    with torch.no_grad():
        errors = [float((emulated(terms)(conv, images, relu=False).double() - want).abs().max()) for terms in (3, 1)]
    scale = float(want.abs().max())
    assert errors[0] < 1e-6 * scale and errors[1] > 1e-5 * scale
