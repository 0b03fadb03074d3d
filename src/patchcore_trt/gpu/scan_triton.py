"""The exact scan (knn.py's rescan): anomalib's FP32 search over the whole bank for the queries knn.py flags
(those the finish cannot certify, and each image's argmax patch), with IEEE FP32 products; the flagged queries
are moved to the front, so the other programs do nothing, and the grid has a fixed size (the launch can be
captured in a CUDA graph).

``pruned_scan``: the same search over the bank's rows in norm order (prune.NormTiles), skipping for each block of
queries (sorted by norm) the tiles that prune.py's norm bound proves cannot hold any of their nearest rows (nor
a tie with it); rows are reported by their original number and ties still go to the lowest one.

Imported only when a CUDA search runs; the tests run it on the CPU through Triton's interpreter.
"""

# ruff: noqa: N803 - Triton compile-time constants are upper case by convention
from __future__ import annotations

import torch
import triton
import triton.language as tl

from patchcore_trt.gpu.knn_triton import _offsets, check_bank_rows
from patchcore_trt.gpu.prune import UNIT, NormTiles, row_norms

# The kernel's skip test in FP32: its inputs' and operations' rounding (a few units) stays inside these.
SLACK = 4 * UNIT
SAFETY = 2.0**-20


@triton.jit
def _scan_kernel(
    q_ptr,
    q_sq_ptr,
    order_ptr,
    count_ptr,
    bank_ptr,
    bank_sq_ptr,
    out_ptr,
    rows_ptr,
    norm_ptr,
    upper_ptr,
    low_ptr,
    high_ptr,
    skipped_ptr,
    num_queries,
    bank_size,
    D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUPS: tl.constexpr,
    PRUNE: tl.constexpr,
):
    # One bank tile per program along axis 0; the flagged queries (the first ``count`` of ``order``) are
    # shared among GROUPS programs along axis 1, a block of BLOCK_P at a time.
    pid_m = tl.program_id(0)
    count = tl.load(count_ptr)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < bank_size
    rows = cols % bank_size  # wrapped: every load in bounds; the wrapped columns never win (distance +inf)
    if PRUNE:  # the tile's rows in the norm order, read in place (no sorted copy of the bank)
        rows = tl.load(rows_ptr + cols, mask=col_ok, other=0)
        low = tl.load(low_ptr + pid_m)
        high = tl.load(high_ptr + pid_m)
    bank_base = _offsets(rows, D)
    bank_sq = tl.load(bank_sq_ptr + rows, mask=col_ok, other=0.0)
    for first in range(tl.program_id(1) * BLOCK_P, num_queries, GROUPS * BLOCK_P):
        if first < count:
            slots = first + tl.arange(0, BLOCK_P)
            slot_ok = slots < count
            queries = tl.load(order_ptr + slots, mask=slot_ok, other=0)
            skip = False
            if PRUNE:
                # prune.skippable in FP32: gap^2 - margin > upper, each side moved by more than its rounding.
                # Empty slots get upper = -inf: they never keep a tile.
                norm = tl.load(norm_ptr + queries, mask=slot_ok, other=0.0)
                upper = tl.load(upper_ptr + queries, mask=slot_ok, other=float("-inf"))
                reach = norm + high
                gap = tl.maximum(tl.maximum(low - norm, norm - high) - SLACK * reach, 0.0)
                bound = ((2 * D + 8) * UNIT * reach * reach + upper) * (1 + SAFETY)
                skip = tl.min((gap * gap * (1 - SAFETY) > bound).to(tl.int32)) == 1
                if skip:
                    tl.atomic_add(skipped_ptr, 1)
            if not skip:
                _scan_block(q_ptr, q_sq_ptr, bank_ptr, out_ptr, queries, slot_ok, bank_base, bank_sq, col_ok, rows,
                            pid_m, D, BLOCK_P, BLOCK_M, BLOCK_K, PRUNE)  # fmt: skip


@triton.jit
def _scan_block(
    q_ptr, q_sq_ptr, bank_ptr, out_ptr, queries, slot_ok, bank_base, bank_sq, col_ok, rows, pid_m,
    D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRUNE: tl.constexpr,
):  # fmt: skip
    """One block of queries against one bank tile: the FP32 distances and an atomic minimum per query."""
    dims = tl.arange(0, BLOCK_K)
    query_base = _offsets(queries, D)
    acc = tl.zeros([BLOCK_P, BLOCK_M], dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        k_ok = (k + dims) < D
        a = tl.load(q_ptr + query_base[:, None] + k + dims[None, :], mask=k_ok[None, :], other=0.0)
        b = tl.load(bank_ptr + bank_base[:, None] + k + dims[None, :], mask=k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    query_sq = tl.load(q_sq_ptr + queries, mask=slot_ok, other=0.0)
    # anomalib's euclidean_dist; + 0.0 turns a -0.0 into +0.0, so the bit patterns order like the values.
    distance = tl.sqrt(tl.maximum(acc * -2 + query_sq[:, None] + bank_sq[None, :], 0.0)) + 0.0
    distance = tl.where(col_ok[None, :], distance, float("inf"))
    # (distance bits, row) as one int64: its minimum is the smaller distance, then the lower row.
    if PRUNE:  # sorted rows: the lowest column among equal distances need not be the lowest row
        bits = distance.to(tl.int32, bitcast=True).to(tl.int64) << 32
        packed = tl.min(bits | rows.to(tl.int64)[None, :], axis=1)
    else:
        best, best_col = tl.min(distance, axis=1, return_indices=True)  # lowest column among equals
        best_bits = best.to(tl.int32, bitcast=True).to(tl.int64) << 32
        packed = best_bits | (pid_m * BLOCK_M + best_col).to(tl.int64)
    tl.atomic_min(out_ptr + queries, packed, mask=slot_ok)


def scan(
    queries: torch.Tensor,
    query_sq: torch.Tensor,
    flagged: torch.Tensor,
    bank: torch.Tensor,
    bank_sq_norm: torch.Tensor,
    block_p: int = 32,
    block_m: int = 64,
    groups: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """anomalib's FP32 nearest neighbour over the whole bank for the ``flagged`` queries (no host sync).

    Args:
        queries: [P, D] float32. query_sq: [P] ``||x||^2``. flagged: [P] bool.
        bank: [M, D] float32. bank_sq_norm: [M].

    Returns:
        distances [P] float32 and rows [P] int64; meaningful where ``flagged``.
    """
    order = torch.argsort(flagged.logical_not().to(torch.int8), stable=True)  # the flagged queries first
    distances, rows, _ = _launch(queries, query_sq, flagged, order, bank, bank_sq_norm, None, block_p, block_m, groups)
    return distances, rows


def pruned_scan(
    queries: torch.Tensor,
    query_sq: torch.Tensor,
    flagged: torch.Tensor,
    bank: torch.Tensor,
    bank_sq_norm: torch.Tensor,
    tiles: NormTiles,
    upper: torch.Tensor,
    block_p: int = 32,
    groups: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``scan``'s answer, the bank read tile by tile in ``tiles``' norm order (prune.norm_tiles of ``bank``),
    skipping the tiles prune.py's bound excludes given ``upper`` (prune.upper_bounds, [P] float32).

    Returns:
        distances [P], original bank rows [P] (meaningful where ``flagged``), and the number of (query block,
        tile) pairs skipped ([1] int32).
    """
    norms = row_norms(queries)
    # The flagged queries by norm: a block of queries with similar norms is far from the same tiles (on the
    # golden banks, 36-47% of (block, tile) pairs are skipped so, against 1-6% in image order).
    order = torch.argsort(torch.where(flagged, norms, torch.inf), stable=True)
    pruning = (tiles.rows, norms.float(), upper, tiles.low, tiles.high)
    return _launch(queries, query_sq, flagged, order, bank, bank_sq_norm, pruning, block_p, tiles.block_m, groups)


def _launch(queries, query_sq, flagged, order, bank, bank_sq_norm, pruning, block_p, block_m, groups):
    """``order``: the queries' order in the scan, the flagged ones first."""
    num_queries, dim = queries.shape
    bank_size = bank.shape[0]
    check_bank_rows(bank_size)
    queries = queries.contiguous()
    count = flagged.sum(dtype=torch.int32).reshape(1)
    packed = torch.full((num_queries,), torch.iinfo(torch.int64).max, device=queries.device, dtype=torch.int64)
    skipped = torch.zeros(1, device=queries.device, dtype=torch.int32)
    grid = (triton.cdiv(bank_size, block_m), min(groups, triton.cdiv(num_queries, block_p)))
    _scan_kernel[grid](
        queries,
        query_sq,
        order,
        count,
        bank,
        bank_sq_norm,
        packed,
        *(pruning or (packed,) * 5),  # never read without PRUNE; any pointer will do
        skipped,
        num_queries,
        bank_size,
        D=dim,
        BLOCK_P=block_p,
        BLOCK_M=block_m,
        BLOCK_K=32,
        GROUPS=grid[1],
        PRUNE=pruning is not None,
        num_warps=4,
    )
    distances = (packed >> 32).to(torch.int32).view(torch.float32)
    return distances, packed & 0xFFFFFFFF, skipped
