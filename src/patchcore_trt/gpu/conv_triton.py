"""Triton kernels of the backbone's convolutions: the FP32 epilogue (bias, residual, ReLU in one pass).

``epilogue``: ``relu((conv + bias) + residual)`` in one pass over a convolution's output, in that order and
with nothing but FP32 additions and a select, so its bits are those of the separate passes eager PyTorch runs
(``conv + bias``, ``x += shortcut``, ``relu``). Its ReLU keeps NaN and ``-0.0`` as torch's CPU ReLU does (a
select on ``x < 0``); a ReLU that turned ``-0.0`` into ``+0.0`` would differ in the sign bit only.

Imported only when a CUDA backbone runs (``import triton`` needs the package, not a GPU); the tests run the
kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``) against their torch twins.
"""

# ruff: noqa: N803 - Triton compile-time constants are upper case by convention
from __future__ import annotations

import torch
import triton
import triton.language as tl

EPILOGUE_BLOCK = 1024


@triton.jit
def _epilogue_kernel(
    acc_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    numel,
    channels,
    channel_stride,
    part_stride,
    PARTS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    value = tl.load(acc_ptr + offsets, mask=ok, other=0.0)
    # Split-K partial sums are added in a fixed order: the result does not depend on scheduling.
    for part in tl.static_range(1, PARTS):
        value += tl.load(acc_ptr + part * part_stride + offsets, mask=ok, other=0.0)
    if HAS_BIAS:
        value += tl.load(bias_ptr + (offsets // channel_stride) % channels, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        value += tl.load(res_ptr + offsets, mask=ok, other=0.0)
    if RELU:
        value = tl.where(value < 0, 0.0, value)
    tl.store(out_ptr + offsets, value, mask=ok)


def _dense_layout(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last)


def epilogue(
    conv: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    parts: int = 1,
) -> torch.Tensor:
    """``relu((conv + bias) + residual)`` over [N, C, H, W] float32 in NCHW or NHWC, in place for one part.

    Args:
        conv: the convolution's output; with ``parts`` > 1, [parts, N, C, H, W] split-K partial sums, added
            in order (the result is a new tensor).
        bias: [C] or None. residual: like one part of ``conv`` or None. relu: whether to clamp at 0.
    """
    first = conv if parts == 1 else conv[0]
    if not _dense_layout(first) or first.dtype != torch.float32:
        raise ValueError("the epilogue takes dense float32 NCHW or NHWC activations")
    if residual is not None and residual.stride() != first.stride():
        residual = torch.empty_like(first).copy_(residual)  # element offsets must coincide with the output's
    out = first if parts == 1 else torch.empty_like(first)
    numel = first.numel()
    _epilogue_kernel[(triton.cdiv(numel, EPILOGUE_BLOCK),)](
        conv,
        first if bias is None else bias,  # never read without HAS_BIAS; any pointer will do
        first if residual is None else residual,
        out,
        numel,
        first.shape[1],
        first.stride(1),
        numel,
        PARTS=parts,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        RELU=relu,
        BLOCK=EPILOGUE_BLOCK,
    )
    return out
