"""The Triton kernel of split_tf32.split_activations: one pass from x to ``[x_hi, x_lo, x_hi]``.

Imported only when a CUDA backbone splits its activations; the tests run it on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``) against the torch specification in split_tf32.py.
"""

# ruff: noqa: N803 - Triton compile-time constants are upper case by convention
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_tf32(x):
    # split_tf32.round_tf32 on the bit pattern: round to nearest, ties to even, 13 mantissa bits dropped.
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 4095 + ((bits >> 13) & 1)) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _split_kernel(x_ptr, out_ptr, total, C: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < total
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0)
    hi = _round_tf32(x)
    lo = _round_tf32(x - hi)
    # Value (row r, channel c) of [rows, C] goes to row r of [rows, 3C] at c (hi), C + c (lo) and 2C + c (hi).
    out = (offsets // C) * (3 * C) + offsets % C
    tl.store(out_ptr + out, hi, mask=ok)
    tl.store(out_ptr + out + C, lo, mask=ok)
    tl.store(out_ptr + out + 2 * C, hi, mask=ok)


def split_activations_cuda(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """split_tf32.split_activations for a float32 [N, C, H, W] tensor; channels-last in, channels-last out."""
    batch, channels, height, width = x.shape
    rows = x.float().permute(0, 2, 3, 1).contiguous()  # a view when x is channels-last, as the backbone's are
    total = rows.numel()
    if 3 * total >= 2**31:  # the kernel indexes in int32
        raise ValueError(f"activations {list(x.shape)} are too large to split at once: split the batch")
    out = torch.empty((batch, height, width, 3 * channels), dtype=torch.float32, device=x.device)
    _split_kernel[(triton.cdiv(total, block),)](rows, out, total, C=channels, BLOCK=block, num_warps=4)
    return out.permute(0, 3, 1, 2)
