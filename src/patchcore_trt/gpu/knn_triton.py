"""Triton kernels of the memory-bank search (knn.py): FP16 candidates, the FP32 finish, and the FP32 scan.

``tile_candidates``: each program multiplies a [BLOCK_P x D] block of queries with a [BLOCK_M x D] tile of
the memory bank on the tensor cores (FP16 operands, FP32 accumulation) and keeps, for every query row, the
``keep`` smallest values of ``||y||^2 - 2 x.y`` in the tile. Only those few (value, bank row) pairs leave the
chip: the [patches x bank] distance matrix is never written, in any precision.

``rescore`` (exact): anomalib's FP32 distances to a few picked bank rows per query and its tie rule among them,
without gathering the [P, R, D] rows. ``fast_finish`` (fast): the best FP16 value plus the query's FP32
squared norm.

``scan`` (scan_triton.py): anomalib's FP32 search over the whole bank for the queries the finish cannot certify.

Offsets into the query, bank and candidate arrays are computed in int64 (``_offsets``): a bank of more than
2**31 elements is searched; bank rows themselves are int32 (fewer than 2**31 rows).

Imported only when a CUDA search runs (``import triton`` needs the package, not a GPU); the tests run the
same kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

# ruff: noqa: N803 - Triton compile-time constants are upper case by convention
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from patchcore_trt.errors import UserError

MAX_BANK_ROWS = 2**31 - 1  # bank rows travel as int32 between the kernels


def check_bank_rows(bank_size: int) -> None:
    """The search's real size limit (memory aside): bank rows are int32."""
    if bank_size > MAX_BANK_ROWS:
        raise UserError(
            f"the memory bank has {bank_size:,} rows; the CUDA search numbers rows in 32 bits "
            f"(at most {MAX_BANK_ROWS:,}): subsample the bank (a smaller coreset ratio)"
        )


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
def _offsets(rows, width):
    """``rows * width`` in int64: element offsets of 2-D arrays larger than 2**31 elements."""
    return rows.to(tl.int64) * width


@triton.jit
def _tile_candidates_kernel(
    q_ptr,
    bank_ptr,
    bank_sq_ptr,
    factor_ptr,
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
    a_ptrs = q_ptr + _offsets(rows % num_queries, D)[:, None] + tl.arange(0, BLOCK_K)[None, :]
    b_ptrs = bank_ptr + _offsets(cols % bank_size, D)[:, None] + tl.arange(0, BLOCK_K)[None, :]
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

    # The operands were scaled by powers of two (knn.py); factor = 2 / (scale_x * scale_y) undoes it exactly.
    # Rows past the bank's end get +inf, so they never win.
    bank_sq = tl.load(bank_sq_ptr + cols, mask=col_ok, other=float("inf"))
    values = bank_sq[None, :] - acc * tl.load(factor_ptr)
    out = _offsets(rows, tiles_m * KEEP) + pid_m * KEEP
    local = tl.arange(0, BLOCK_M)
    for rank in tl.static_range(KEEP):
        best, best_col = tl.min(values, axis=1, return_indices=True)
        tl.store(val_ptr + out + rank, best, mask=row_ok)
        # A tile with fewer valid columns than KEEP: the extra values are +inf (never win), the rows must exist.
        tl.store(idx_ptr + out + rank, tl.minimum(pid_m * BLOCK_M + best_col, bank_size - 1), mask=row_ok)
        values = tl.where(local[None, :] == best_col[:, None], float("inf"), values)


def tile_candidates(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_sq_norm: torch.Tensor,
    keep: int,
    factor: torch.Tensor,
    config: TileConfig = TileConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bank tile, the ``keep`` smallest ``||y||^2 - factor * x.y`` of each query row, and their bank rows.

    Args:
        queries: [P, D] float16, contiguous (scaled, see knn.py).
        bank: [M, D] float16, contiguous (scaled).
        bank_sq_norm: [M] float32, ``||y||^2`` of the float32 rows the bank was cast from.
        keep: candidates per tile (at most BLOCK_M).
        factor: [1] float32 on the device, ``2 / (query scale * bank scale)``.

    Returns:
        values [P, tiles * keep] float32 and bank rows [P, tiles * keep] int32.
    """
    if not 1 <= keep <= config.block_m:
        raise ValueError(f"keep must be between 1 and {config.block_m}")
    num_queries, dim = queries.shape
    bank_size = bank.shape[0]
    check_bank_rows(bank_size)
    tiles = triton.cdiv(bank_size, config.block_m)
    values = torch.empty((num_queries, tiles * keep), device=queries.device, dtype=torch.float32)
    rows = torch.empty((num_queries, tiles * keep), device=queries.device, dtype=torch.int32)
    grid = (triton.cdiv(num_queries, config.block_p) * tiles,)
    _tile_candidates_kernel[grid](
        queries,
        bank,
        bank_sq_norm,
        factor,
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
def _fast_finish_kernel(
    val_ptr,
    idx_ptr,
    q_sq_ptr,
    dist_ptr,
    row_ptr,
    num_queries,
    num_candidates,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_queries
    local = tl.arange(0, BLOCK_C)
    candidate_base = _offsets(rows, num_candidates)
    best = tl.full([BLOCK_R], float("inf"), tl.float32)
    best_col = tl.zeros([BLOCK_R], tl.int32)
    for start in range(0, num_candidates, BLOCK_C):
        ok = row_ok[:, None] & ((start + local) < num_candidates)[None, :]
        values = tl.load(val_ptr + candidate_base[:, None] + start + local[None, :], mask=ok, other=float("inf"))
        low, low_col = tl.min(values, axis=1, return_indices=True)
        best_col = tl.where(low < best, low_col + start, best_col)
        best = tl.minimum(best, low)
    row = tl.load(idx_ptr + candidate_base + best_col, mask=row_ok, other=0)
    query_sq = tl.load(q_sq_ptr + rows, mask=row_ok, other=0.0)
    tl.store(dist_ptr + rows, tl.sqrt(tl.maximum(best + query_sq, 0.0)), mask=row_ok)
    tl.store(row_ptr + rows, row.to(tl.int64), mask=row_ok)


@triton.jit
def _rescore_kernel(
    picked_ptr,
    q_ptr,
    q_sq_ptr,
    bank_ptr,
    bank_sq_ptr,
    dist_ptr,
    row_ptr,
    num_queries,
    D: tl.constexpr,
    R: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_queries
    dims = tl.arange(0, BLOCK_D)
    query_base = _offsets(rows, D)
    query_sq = tl.load(q_sq_ptr + rows, mask=row_ok, other=0.0)
    best = tl.full([BLOCK_R], float("inf"), tl.float32)
    best_row = tl.zeros([BLOCK_R], tl.int64)
    for rank in tl.static_range(R):
        row = tl.load(picked_ptr + _offsets(rows, R) + rank, mask=row_ok, other=0)
        bank_base = _offsets(row, D)
        dot = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, D, BLOCK_D):
            ok = row_ok[:, None] & ((start + dims) < D)[None, :]
            x = tl.load(q_ptr + query_base[:, None] + start + dims[None, :], mask=ok, other=0.0)
            y = tl.load(bank_ptr + bank_base[:, None] + start + dims[None, :], mask=ok, other=0.0)
            dot += tl.sum(x * y, axis=1)
        # anomalib's euclidean_dist: x.y * -2 + ||x||^2 + ||y||^2, clamped at 0, square-rooted; then its min's
        # tie rule: the smaller distance, the lower bank row among equal distances.
        squared = dot * -2 + query_sq + tl.load(bank_sq_ptr + row, mask=row_ok, other=0.0)
        distance = tl.sqrt(tl.maximum(squared, 0.0))
        take = (distance < best) | ((distance == best) & (row < best_row))
        best = tl.where(take, distance, best)
        best_row = tl.where(take, row, best_row)
    tl.store(dist_ptr + rows, best, mask=row_ok)
    tl.store(row_ptr + rows, best_row, mask=row_ok)


def fast_finish(query_sq: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast mode's answer per query: the best candidate's value plus ``query_sq``, square-rooted, and its row.

    Args:
        query_sq: [P] the term the candidate values lack. values, rows: [P, C] from ``tile_candidates``.
    """
    num_queries = values.shape[0]
    distances = torch.empty(num_queries, device=values.device, dtype=torch.float32)
    nearest = torch.empty(num_queries, device=values.device, dtype=torch.int64)
    block_r = 16
    _fast_finish_kernel[(triton.cdiv(num_queries, block_r),)](
        values, rows, query_sq, distances, nearest, num_queries, values.shape[1], BLOCK_R=block_r, BLOCK_C=128
    )
    return distances, nearest


def rescore(
    queries: torch.Tensor, query_sq: torch.Tensor, picked: torch.Tensor, bank: torch.Tensor, bank_sq_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """anomalib's FP32 distance to each ``picked`` bank row and its ``min(1)`` over them (the lower row among
    equal distances), without gathering the [P, R, D] rows.

    Args:
        queries: [P, D] float32. query_sq: [P] ``||x||^2``. picked: [P, R] int64 bank rows.
        bank: [M, D] float32. bank_sq_norm: [M].
    """
    num_queries, dim = queries.shape
    distances = torch.empty(num_queries, device=queries.device, dtype=torch.float32)
    nearest = torch.empty(num_queries, device=queries.device, dtype=torch.int64)
    block_r = 16
    _rescore_kernel[(triton.cdiv(num_queries, block_r),)](
        picked.contiguous(),
        queries,
        query_sq,
        bank,
        bank_sq_norm,
        distances,
        nearest,
        num_queries,
        D=dim,
        R=picked.shape[1],
        BLOCK_R=block_r,
        BLOCK_D=128,
        num_warps=4,
    )
    return distances, nearest
