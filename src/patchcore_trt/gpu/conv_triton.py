"""Triton kernels of the backbone's convolutions: the FP32 epilogue, and implicit-GEMM convolutions.

``epilogue``: ``relu((conv + bias) + residual)`` in one pass over a convolution's output, in that order and
with nothing but FP32 additions and a select, so its bits are those of the separate passes eager PyTorch runs
(``conv + bias``, ``x += shortcut``, ``relu``). Its ReLU keeps NaN and ``-0.0`` as torch's CPU ReLU does (a
select on ``x < 0``); a ReLU that turned ``-0.0`` into ``+0.0`` would differ in the sign bit only.

``conv2d``: an implicit-GEMM convolution of NHWC activations. The output pixels are the GEMM's rows, the
output channels its columns and (kernel row, kernel column, input channel) its reduction: a 3x3 convolution
is nine shifted loads of the input (zero outside the image), a 1x1 stride-1 convolution a plain GEMM (the
rows' addresses are computed once). The products run with ``tl.dot``'s ``input_precision`` (``tf32x3``: each
FP32 operand split into two TF32 parts, three tensor-core products, about FP32's accuracy); the same
epilogue (bias, residual, ReLU, in that order) is applied in the kernel. A grid with fewer programs than the
GPU has multiprocessors (small batches) splits the reduction (split-K): the partial sums go to a workspace
and ``epilogue`` adds them in a fixed order, so the result does not depend on scheduling.

Imported only when a CUDA backbone runs (``import triton`` needs the package, not a GPU); the tests run the
kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``) against their torch twins.
"""

# ruff: noqa: N803 - Triton compile-time constants are upper case by convention
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ConvConfig:
    """Block shapes, pipelining, the products' precision and the reduction split of ``conv2d`` (split_k None:
    enough parts to give every multiprocessor a program, at most ``max_split``)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 32
    num_warps: int = 8
    num_stages: int = 3
    precision: str = "tf32x3"
    split_k: int | None = None
    max_split: int = 8


@triton.jit
def _conv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    batch,
    height,
    width,
    out_h,
    out_w,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    C: tl.constexpr,
    K: tl.constexpr,
    R: tl.constexpr,
    S: tl.constexpr,
    STRIDE: tl.constexpr,
    PAD: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    num_rows = batch * out_h * out_w
    blocks_m = tl.cdiv(num_rows, BLOCK_M)
    # Row blocks vary fastest: programs running together share the same weight columns.
    pid_m = tl.program_id(0) % blocks_m
    pid_n = tl.program_id(0) // blocks_m
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    col_ok = cols < K
    image = rows // (out_h * out_w)
    pixel = rows % (out_h * out_w)
    top = (pixel // out_w) * STRIDE - PAD
    left = (pixel % out_w) * STRIDE - PAD
    image_base = image.to(tl.int64) * stride_n
    channels = tl.arange(0, BLOCK_K)
    if R * S == 1:  # 1x1: the rows' addresses do not move with the reduction
        inside = row_ok & (top >= 0) & (top < height) & (left >= 0) & (left < width)
        a_base = image_base + top.to(tl.int64) * stride_h + left.to(tl.int64) * stride_w
    channel_blocks = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(pid_k, R * S * channel_blocks, SPLIT_K):
        tap = step // channel_blocks
        channel = (step % channel_blocks) * BLOCK_K + channels
        channel_ok = channel < C
        if R * S != 1:  # the input shifted by the tap (kernel row, kernel column); zero padding outside
            h = top + tap // S
            w = left + tap % S
            inside = row_ok & (h >= 0) & (h < height) & (w >= 0) & (w < width)
            a_base = image_base + h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w
        a = tl.load(
            x_ptr + a_base[:, None] + channel[None, :] * stride_c,
            mask=inside[:, None] & channel_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + (tap * C + channel).to(tl.int64)[:, None] * K + cols[None, :],
            mask=channel_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out = rows.to(tl.int64)[:, None] * K + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K > 1:
        tl.store(out_ptr + pid_k.to(tl.int64) * num_rows * K + out, acc, mask=ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + out, mask=ok, other=0.0)
        if RELU:
            acc = tl.where(acc < 0, 0.0, acc)
        tl.store(out_ptr + out, acc, mask=ok)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[K, C, R, S] -> [R * S * C, K] float32: the reduction's rows in the kernel's order."""
    return weight.float().permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()


def _split(config: ConvConfig, programs: int, steps: int, device: torch.device) -> int:
    if config.split_k is not None:
        return max(1, min(config.split_k, steps))
    if device.type != "cuda":
        return 1
    processors = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(config.max_split, steps, processors // max(programs, 1)))


def conv2d(
    x: torch.Tensor,
    packed: torch.Tensor,
    kernel_size: tuple[int, int],
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    stride: int = 1,
    padding: int = 0,
    config: ConvConfig = ConvConfig(),
) -> torch.Tensor:
    """[relu]((conv2d(x, w) + bias) [+ residual]) -> [N, K, P, Q] float32, channels-last.

    Args:
        x: [N, C, H, W] float32, any strides (channels-last reads contiguous channels).
        packed: ``pack_weight(w)`` of the [K, C, R, S] weight; kernel_size: (R, S).
        bias: [K] or None. residual: [N, K, P, Q] or None. stride, padding: the same along both axes.
    """
    batch, channels, height, width = x.shape
    rows_r, cols_s = kernel_size
    out_channels = packed.shape[1]
    if packed.shape[0] != rows_r * cols_s * channels:
        raise ValueError(f"packed weight {list(packed.shape)} does not fit {channels} channels x {kernel_size}")
    out_h = (height + 2 * padding - rows_r) // stride + 1
    out_w = (width + 2 * padding - cols_s) // stride + 1
    shape = (batch, out_channels, out_h, out_w)
    blocks = triton.cdiv(batch * out_h * out_w, config.block_m) * triton.cdiv(out_channels, config.block_n)
    split = _split(config, blocks, rows_r * cols_s * triton.cdiv(channels, config.block_k), x.device)
    # Split-K: [split, N, P, Q, K] partial sums, seen as split channels-last [N, K, P, Q] tensors.
    if split == 1:
        target = torch.empty(shape, device=x.device, dtype=torch.float32, memory_format=torch.channels_last)
    else:
        target = torch.empty((split, batch, out_h, out_w, out_channels), device=x.device)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    _conv_kernel[(blocks, split)](
        x,
        packed,
        target if bias is None else bias,  # never read without HAS_BIAS; any pointer will do
        target if residual is None else residual,
        target,
        batch,
        height,
        width,
        out_h,
        out_w,
        *x.stride(),
        C=channels,
        K=out_channels,
        R=rows_r,
        S=cols_s,
        STRIDE=stride,
        PAD=padding,
        SPLIT_K=split,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        RELU=relu,
        PRECISION=config.precision,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split == 1:
        return target
    return epilogue(target.permute(0, 1, 4, 2, 3), bias, residual, relu, parts=split)
