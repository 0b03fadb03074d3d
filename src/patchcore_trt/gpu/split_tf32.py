"""FP32-accurate convolutions on TF32 tensor cores: each operand split into two TF32 parts (3xTF32).

A TF32 tensor-core product keeps 10 of an FP32 operand's 23 mantissa bits (relative error 2^-11), which moves
PatchCore's scores by about 1e-3, a hundred times the parity bar. Splitting each operand into
``hi = tf32(v)`` and ``lo = tf32(v - hi)`` gives ``v = hi + lo`` to about 2^-22, and

    conv(x, w) ~ conv(x_hi, w_hi) + conv(x_lo, w_hi) + conv(x_hi, w_lo)

with ``lo * lo`` (2^-22 relative) dropped. Every product of TF32 values is exact in FP32, so with FP32 sums
the result is as accurate as an IEEE FP32 convolution (emulated on WRN50: 3.5e-6 of score against FP64, IEEE
FP32 5e-7, plain TF32 8.4e-4). Measured on an H200 (cuDNN 9.19) it is not: cuDNN's and cuBLAS's TF32 tensor-core
sums over a long K lose it (a layer3-sized split convolution 2.3e-5 from FP64, IEEE FP32 8.5e-7; the same GEMM
cut into 64 separately summed K parts 8.2e-7; Triton's own tf32x3 dot 3.0e-7), and the backbone's scores move by
5e-4. So FastPatchCore checks the split walk against IEEE FP32 features for each new input shape and falls back
to IEEE FP32 where it disagrees (on that H200: every shape); the exact mode stays IEEE FP32
(benchmarks/results/h200_exact_*.json). The three convolutions are one:
the activations are laid out as ``[x_hi, x_lo, x_hi]`` along the channels and the weights as
``[w_hi, w_hi, w_lo]``, so a single cuDNN call over three times the input channels sums all three products
and keeps the bias, residual-add and ReLU epilogue (fused_resnet.py).

Both parts are rounded here, to nearest, ties to even, so they are exact TF32 values: whether the tensor
cores truncate or round their inputs changes nothing, and a CPU FP32 convolution on the same parts computes
what the GPU does (up to summation order). That is how the CPU tests emulate the scheme.
"""

from __future__ import annotations

import torch

DROPPED_BITS = 13  # FP32 keeps 23 mantissa bits, TF32 10


def round_tf32(values: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32 (10 mantissa bits), to nearest, ties to even; still float32.

    Integer arithmetic on the bit pattern: the sign bit stays out of the way and a carry out of the mantissa
    correctly bumps the exponent. Finite inputs only (activations and weights are)."""
    bits = values.contiguous().view(torch.int32)
    half_ulp = (1 << (DROPPED_BITS - 1)) - 1  # plus the kept lowest bit: ties go to even
    rounded = (bits + half_ulp + ((bits >> DROPPED_BITS) & 1)) & -(1 << DROPPED_BITS)
    return rounded.view(torch.float32)


def split_parts(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo): TF32 values with hi + lo = values to about 2^-22 relative."""
    hi = round_tf32(values)
    return hi, round_tf32(values - hi)


def split_weight(weight: torch.Tensor) -> torch.Tensor:
    """Conv weight [O, I, kh, kw] float32 -> [O, 3I, kh, kw]: ``[w_hi, w_hi, w_lo]`` along the input channels."""
    hi, lo = split_parts(weight.float())
    return torch.cat([hi, hi, lo], dim=1)


def split_activations(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] float32 -> [N, 3C, H, W] channels-last: ``[x_hi, x_lo, x_hi]`` along the channels.

    On CUDA one Triton pass (read 4 bytes, write 12 per value); the torch code below is its specification."""
    if x.is_cuda:
        from patchcore_trt.gpu.split_tf32_triton import split_activations_cuda

        return split_activations_cuda(x)
    hi, lo = split_parts(x)
    return torch.cat([hi, lo, hi], dim=1).contiguous(memory_format=torch.channels_last)
