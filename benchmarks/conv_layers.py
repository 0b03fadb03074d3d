"""Per-layer accuracy of the Triton convolutions (gpu/conv_triton.py): each convolution of the folded
backbone, fed the activations it sees in the model, run by the Triton kernel in each ``tl.dot`` precision and
by cuDNN's IEEE FP32 (the exact mode's convolution), against torch's float64 convolution of the same input.

Errors per layer: max |error|; max |error| / max |reference| (``max_rel``); and max |error| / (u * sum of
|products|) (``max_units``, u = 2**-24), the error in units of FP32's worst-case rounding per term: an FP32
sum of n products in any order stays within n of them, tf32x3 adds a few per product, one TF32 product
(``tf32``) thousands.

Used by backbone_error.py (part ``layers``); runs on a GPU, or on the CPU in Triton's interpreter
(``TRITON_INTERPRET=1``) on a tiny input, where every precision computes plain FP32 (the interpreter ignores
``input_precision``), so there the Triton columns check the indexing only; ``emulated_tf32x3``
(tf32x3_estimate.py's operand split, float64 sums) estimates tf32x3's rounding anywhere.
"""

from __future__ import annotations

import torch
from tf32x3_estimate import emulated
from torch import nn
from torch.nn import functional as F  # noqa: N812

from patchcore_trt.bench.matrix import input_pool
from patchcore_trt.bench.subjects import as_float_nchw
from patchcore_trt.demo.synthetic_model import synthetic_spec
from patchcore_trt.gpu.conv_triton import ConvConfig, conv2d, pack_weight
from patchcore_trt.gpu.fast_model import exact_convolutions, fold_batchnorm
from patchcore_trt.gpu.fused_resnet import triton_ready
from patchcore_trt.gpu.knn import float32_matmul
from patchcore_trt.model import PatchCoreDeploy

PRECISIONS = ("tf32x3", "ieee", "tf32")
UNIT = 2.0**-24


def _errors(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor) -> dict:
    error = (got.double() - want).abs()
    return {
        "max_abs": float(error.max()),
        "max_rel": float(error.max() / want.abs().max().clamp_min(1e-300)),
        "max_units": float((error / (magnitude * UNIT).clamp_min(1e-300)).max()),
    }


@torch.no_grad()
def layer_errors(
    backbone: str = "wide_resnet50_2", size: int = 256, batch: int = 4, only: tuple[str, ...] = (), device="cuda"
) -> list[dict]:
    """One row per convolution (those named in ``only``, or all), in the order the network runs them."""
    spec = synthetic_spec(64, (size, size), backbone=backbone, device=device)
    model = PatchCoreDeploy(spec).eval().to(device)
    features = exact_convolutions(fold_batchnorm(model.backbone))
    rows: list[dict] = []

    def study(name: str, conv: nn.Conv2d, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        x = inputs[0]
        geometry = (conv.stride, conv.padding)
        want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), *geometry)
        magnitude = F.conv2d(x.double().abs(), conv.weight.double().abs(), conv.bias.double().abs(), *geometry)
        row = {"layer": name, "input": list(x.shape), "weight": list(conv.weight.shape)}
        row["terms"] = conv.weight[0].numel()
        row["torch_fp32"] = _errors(output, want, magnitude)  # cuDNN's IEEE FP32 on a GPU
        nhwc, packed = x.contiguous(memory_format=torch.channels_last), pack_weight(conv.weight)
        for precision in PRECISIONS:
            got = conv2d(nhwc, packed, conv.kernel_size, conv.bias, None, False, conv.stride[0], conv.padding[0],
                         ConvConfig(precision=precision))  # fmt: skip
            row[f"triton_{precision}"] = _errors(got, want, magnitude)
        # tf32x3's operand split emulated in float64 (what the interpreter cannot show), on any device.
        row["emulated_tf32x3"] = _errors(emulated(3)(conv, x, relu=False), want, magnitude)
        rows.append(row)
        print(row, flush=True)

    for name, conv in features.named_modules():
        if isinstance(conv, nn.Conv2d) and triton_ready(conv) and (not only or name in only):
            conv.register_forward_hook(lambda module, inputs, output, name=name: study(name, module, inputs, output))
    images = torch.from_numpy(as_float_nchw(input_pool((size, size), batch))).to(device)
    with float32_matmul():
        features(model.preprocess(images))
    return rows
