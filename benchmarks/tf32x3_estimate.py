"""A CPU estimate of what tf32x3 products do to the exact mode's outputs, before a GPU measures it.

Triton's interpreter computes every ``input_precision`` in plain FP32, so tests/test_conv_kernels.py cannot see
tf32x3's rounding. This emulates it: each FP32 operand is split as Triton's tf32x3 lowering does (``big`` =
TF32 rounding of the value, to nearest with ties away from zero, ``small`` = TF32 rounding of the remainder),
and each convolution is ``big*big + big*small + small*big`` (the dropped ``small*small`` and the rounding of
``small`` are tf32x3's own error), summed in float64 and rounded once to FP32. What it leaves out: the tensor
cores' FP32 accumulation order, an FP32-level effect like any other summation order.

The emulated backbone runs the fused walk (fused_resnet.FusedResNetFeatures) inside the fast model, whose
outputs are compared with the FP32 deploy model's on the same images: max |d score|, max |d map| (normalised)
and labels, against the exact bar (1e-5, 1e-4, identical labels). Beside it: the fast model's own FP32 walk
(summation order alone) and one TF32 product per term (a positive control: far outside the bar).

Usage: python benchmarks/tf32x3_estimate.py OUT.json [--size 128] [--images 4] [--bank 1024]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from patchcore_trt.bench.matrix import input_pool
from patchcore_trt.bench.subjects import as_float_nchw
from patchcore_trt.demo.synthetic_model import synthetic_spec
from patchcore_trt.gpu.fast_model import FastPatchCore
from patchcore_trt.gpu.fused_resnet import FusedResNetFeatures
from patchcore_trt.model import PatchCoreDeploy


def tf32(x: torch.Tensor) -> torch.Tensor:
    """FP32 -> TF32 (10 mantissa bits), to nearest with ties away from zero (PTX cvt.rna.tf32.f32)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    big = tf32(x)
    return big, tf32(x.float() - big)


def emulated(terms: int):
    """fused_resnet's conv_act contract with the first ``terms`` of big*big, big*small, small*big (3: tf32x3,
    1: one TF32 product), summed in float64 and rounded once to FP32."""

    def act(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = True):
        geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
        (xb, xs), (wb, ws) = split(x), split(conv.weight)
        pairs = ((xb, wb), (xb, ws), (xs, wb))[:terms]
        out = sum(F.conv2d(a.double(), b.double(), None, *geometry) for a, b in pairs).float()
        return _epilogue(conv, out, residual, relu)

    return act


def _epilogue(conv: nn.Conv2d, out: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    if conv.bias is not None:
        out = out + conv.bias.view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


# The fast model's own FP32 walk (the control: FP32 summation orders only), tf32x3, one TF32 product.
VARIANTS = {"fp32": None, "tf32x3": emulated(3), "tf32": emulated(1)}


@torch.no_grad()
def estimate(size: int, images: int, bank: int) -> list[dict]:
    spec = synthetic_spec(bank, (size, size))
    floats = torch.from_numpy(as_float_nchw(input_pool((size, size), images)))
    expected = PatchCoreDeploy(spec).eval()(floats)
    rows = []
    for name, act in VARIANTS.items():
        model = FastPatchCore(spec, backbone_dtype="fp32").eval()
        if act is not None:
            model.backbone = FusedResNetFeatures(model.backbone.features, act)
        got = model(floats)
        score = float((got.pred_score - expected.pred_score).abs().max())
        anomaly_map = float((got.anomaly_map - expected.anomaly_map).abs().max())
        labels = int((got.pred_label == expected.pred_label).sum())
        rows.append(
            {
                "products": name,
                "max_score_error": score,
                "max_map_error": anomaly_map,
                "labels": f"{labels}/{images}",
                "holds_exact_bar": score <= 1e-5 and anomaly_map <= 1e-4 and labels == images,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--bank", type=int, default=1024)
    args = parser.parse_args()
    rows = estimate(args.size, args.images, args.bank)
    settings = {"size": args.size, "images": args.images, "bank": args.bank}
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps({"device": "cpu (emulated products)", **settings, "rows": rows}, indent=1))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
