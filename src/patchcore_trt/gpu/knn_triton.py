"""Triton kernels of the memory-bank search (knn.py): FP16 candidates, then the FP32 finish.

``tile_candidates``: each program multiplies a [BLOCK_P x D] block of queries with a
[BLOCK_M x D] tile of the memory bank on the tensor cores (FP16 operands, FP32 accumulation) and
keeps, for every query row, the smallest one or two values of ``||y||^2 - 2 x.y`` in the tile. Only those
few (value, bank row) pairs leave the chip: the [patches x bank] distance matrix is never written, in any
precision. At ``keep=2`` the union of per-tile top-2 holds the global top-2.

``finish``: per query, the best one or two candidates, then (exact) their FP32 distances by the reference's
formula, or (fast) the best FP16 value plus the query's FP32 squared norm; one pass, no [P, C, D] gather.

Imported only when a CUDA search runs (``import triton`` needs the package, not a GPU); the tests run the
same kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

# ruff: noqa: N803 - Triton compile-time constants are upper case by convention
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class TileConfig:
    """Block shapes and pipelining of the candidate kernel (measured best on an H100: check_search.py --tune)."""

    block_p: int = 128
    block_m: int = 256
    block_k: int = 64
    group_p: int = 8
    num_warps: int = 8
    num_stages: int = 3


@triton.jit
def _tile_candidates_kernel(
    q_ptr,
    bank_ptr,
    bank_sq_ptr,
    val_ptr,
    idx_ptr,
    num_queries,
    bank_size,
    D: tl.constexpr,
    KEEP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_P: tl.constexpr,
):
    # Grouped launch order: GROUP_P query blocks share each bank tile while it sits in L2.
    pid = tl.program_id(0)
    blocks_p = tl.cdiv(num_queries, BLOCK_P)
    tiles_m = tl.cdiv(bank_size, BLOCK_M)
    per_group = GROUP_P * tiles_m
    first_p = (pid // per_group) * GROUP_P
    group_size = tl.minimum(blocks_p - first_p, GROUP_P)
    pid_p = first_p + (pid % per_group) % group_size
    pid_m = (pid % per_group) // group_size

    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries
    col_ok = cols < bank_size
    # Wrapped indices keep every load in bounds without masks; the wrapped rows and columns are never kept.
    a_ptrs = q_ptr + (rows % num_queries)[:, None] * D + tl.arange(0, BLOCK_K)[None, :]
    b_ptrs = bank_ptr + (cols % bank_size)[:, None] * D + tl.arange(0, BLOCK_K)[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_M], dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        if D % BLOCK_K == 0:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = (k + tl.arange(0, BLOCK_K)) < D
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    # Rows past the bank's end get +inf, so they never win.
    bank_sq = tl.load(bank_sq_ptr + cols, mask=col_ok, other=float("inf"))
    values = bank_sq[None, :] - 2.0 * acc
    width = tiles_m * KEEP
    best, best_col = tl.min(values, axis=1, return_indices=True)
    out = rows * width + pid_m * KEEP
    tl.store(val_ptr + out, best, mask=row_ok)
    tl.store(idx_ptr + out, pid_m * BLOCK_M + best_col, mask=row_ok)
    if KEEP == 2:
        local = tl.arange(0, BLOCK_M)
        second_values = tl.where(local[None, :] == best_col[:, None], float("inf"), values)
        second, second_col = tl.min(second_values, axis=1, return_indices=True)
        tl.store(val_ptr + out + 1, second, mask=row_ok)
        # A tile with one valid column has no second: its +inf value never wins, its row must still exist.
        tl.store(idx_ptr + out + 1, tl.minimum(pid_m * BLOCK_M + second_col, bank_size - 1), mask=row_ok)


def tile_candidates(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_sq_norm: torch.Tensor,
    keep: int,
    config: TileConfig = TileConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bank tile, the ``keep`` smallest ``||y||^2 - 2 x.y`` of each query row, and their bank rows.

    Args:
        queries: [P, D] float16, contiguous.
        bank: [M, D] float16, contiguous.
        bank_sq_norm: [M] float32, ``||y||^2`` of the float32 bank.
        keep: 1 or 2 candidates per tile.

    Returns:
        values [P, tiles * keep] float32 and bank rows [P, tiles * keep] int32.
    """
    if keep not in (1, 2):
        raise ValueError("keep must be 1 or 2")
    num_queries, dim = queries.shape
    bank_size = bank.shape[0]
    tiles = triton.cdiv(bank_size, config.block_m)
    if max(queries.numel(), bank.numel(), num_queries * tiles * keep) >= 2**31:  # the kernels index in int32
        raise ValueError(f"{num_queries} queries x {bank_size} bank rows x {dim} is too large at once: split the batch")
    values = torch.empty((num_queries, tiles * keep), device=queries.device, dtype=torch.float32)
    rows = torch.empty((num_queries, tiles * keep), device=queries.device, dtype=torch.int32)
    grid = (triton.cdiv(num_queries, config.block_p) * tiles,)
    _tile_candidates_kernel[grid](
        queries,
        bank,
        bank_sq_norm,
        values,
        rows,
        num_queries,
        bank_size,
        D=dim,
        KEEP=keep,
        BLOCK_P=config.block_p,
        BLOCK_M=config.block_m,
        BLOCK_K=config.block_k,
        GROUP_P=config.group_p,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return values, rows


@triton.jit
def _finish_kernel(
    val_ptr,
    idx_ptr,
    q_ptr,
    bank_ptr,
    bank_sq_ptr,
    dist_ptr,
    row_ptr,
    num_queries,
    num_candidates,
    D: tl.constexpr,
    EXACT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_queries
    local = tl.arange(0, BLOCK_C)
    # The best two candidates of each query (one in fast mode), scanning the candidate list in chunks.
    best = tl.full([BLOCK_R], float("inf"), tl.float32)
    second = tl.full([BLOCK_R], float("inf"), tl.float32)
    best_col = tl.zeros([BLOCK_R], tl.int32)
    second_col = tl.zeros([BLOCK_R], tl.int32)
    for start in range(0, num_candidates, BLOCK_C):
        ok = row_ok[:, None] & ((start + local) < num_candidates)[None, :]
        values = tl.load(val_ptr + rows[:, None] * num_candidates + start + local[None, :], mask=ok, other=float("inf"))
        low, low_col = tl.min(values, axis=1, return_indices=True)
        low_col += start
        if EXACT:
            rest = tl.where(local[None, :] == (low_col - start)[:, None], float("inf"), values)
            next_low, next_col = tl.min(rest, axis=1, return_indices=True)
            next_col += start
            # Merge the sorted pairs (best, second) and (low, next_low).
            new_second = tl.where(low < best, tl.minimum(best, next_low), tl.minimum(second, low))
            new_second_col = tl.where(
                low < best, tl.where(best <= next_low, best_col, next_col), tl.where(second <= low, second_col, low_col)
            )
            second, second_col = new_second, new_second_col
        best_col = tl.where(low < best, low_col, best_col)
        best = tl.minimum(best, low)
    first_row = tl.load(idx_ptr + rows * num_candidates + best_col, mask=row_ok, other=0)
    second_row = tl.load(idx_ptr + rows * num_candidates + second_col, mask=row_ok, other=0)
    dims = tl.arange(0, BLOCK_D)
    query_sq = tl.zeros([BLOCK_R], tl.float32)
    first_dot = tl.zeros([BLOCK_R], tl.float32)
    second_dot = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & ((start + dims) < D)[None, :]
        x = tl.load(q_ptr + rows[:, None] * D + start + dims[None, :], mask=ok, other=0.0)
        query_sq += tl.sum(x * x, axis=1)
        if EXACT:
            y = tl.load(bank_ptr + first_row[:, None] * D + start + dims[None, :], mask=ok, other=0.0)
            first_dot += tl.sum(x * y, axis=1)
            y = tl.load(bank_ptr + second_row[:, None] * D + start + dims[None, :], mask=ok, other=0.0)
            second_dot += tl.sum(x * y, axis=1)
    if EXACT:
        # model.squared_distances's formula and order: -2 x.y + ||x||^2 + ||y||^2, clamped at 0.
        first = tl.maximum(first_dot * -2 + query_sq + tl.load(bank_sq_ptr + first_row, mask=row_ok, other=0.0), 0.0)
        second_sq = second_dot * -2 + query_sq + tl.load(bank_sq_ptr + second_row, mask=row_ok, other=0.0)
        second = tl.maximum(second_sq, 0.0)
        take_second = second < first
        distance = tl.sqrt(tl.where(take_second, second, first))
        row = tl.where(take_second, second_row, first_row)
    else:
        distance = tl.sqrt(tl.maximum(best + query_sq, 0.0))
        row = first_row
    tl.store(dist_ptr + rows, distance, mask=row_ok)
    tl.store(row_ptr + rows, row.to(tl.int64), mask=row_ok)


def finish(
    queries: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    bank: torch.Tensor,
    bank_sq_norm: torch.Tensor,
    exact: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest distance and bank row per query from its candidates (see knn.nearest for the two modes).

    Args:
        queries: [P, D] float32. values, rows: [P, C] from ``tile_candidates``.
        bank: [M, D] float32. bank_sq_norm: [M].
    """
    num_queries, dim = queries.shape
    distances = torch.empty(num_queries, device=queries.device, dtype=torch.float32)
    nearest = torch.empty(num_queries, device=queries.device, dtype=torch.int64)
    block_r = 16
    _finish_kernel[(triton.cdiv(num_queries, block_r),)](
        values,
        rows,
        queries,
        bank,
        bank_sq_norm,
        distances,
        nearest,
        num_queries,
        values.shape[1],
        D=dim,
        EXACT=exact,
        BLOCK_R=block_r,
        BLOCK_C=128,
        BLOCK_D=128,
        num_warps=4,
    )
    return distances, nearest
