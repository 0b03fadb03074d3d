"""Memory-bank search for the fast model: FP16 tensor-core candidates, then a certified FP32 answer.

Two modes, same bank, same answer format (distance and bank row of each query's nearest neighbour):

- ``certified``: anomalib's answer, proven. Queries and bank are centred on the bank's mean and scaled by powers
  of two (exact, and no FP16 overflow whatever the features' range); every bank tile reports its
  CANDIDATES_PER_TILE smallest FP16 approximations of ``||y||^2 - 2 x.y`` (FP16 operands, FP32 accumulation);
  as many best overall are re-scored in FP32 by anomalib's ``euclidean_dist`` (``x.y * -2 + ||x||^2 +
  ||y||^2``, clamped, square-rooted) and the winner chosen by anomalib's ``min(1)`` rule: the smaller
  distance, the lower row among equal distances. ``certified()`` then proves, from a worst-case bound on the FP16
  and FP32 rounding errors (``BankIndex.error_bound``), that every bank row not re-scored is strictly farther;
  a query it cannot prove
  is searched again over the whole bank in FP32 (``rescan``), by the same formula and rule (on banks of
  PRUNE_FROM_ROWS rows or more, skipping the tiles a certified norm bound excludes: prune.py). So the row and
  distance are those of an FP32 search of the whole bank by anomalib's formula and tie rule: rows with equal
  FP32 distances (identical features, anywhere in the bank) resolve to the lowest index, as anomalib's do.
  What no FP32 search can promise is kept out of the claim: two rows whose distances differ by a few FP32 ulps
  can swap between any two summation orders (anomalib's own CPU and GPU runs included).
- ``fp16``: the best FP16 approximation itself, plus ``||x||^2`` in FP32.

On CUDA the steps are Triton kernels (knn_triton.py) and the [queries x bank] matrix is never written; on the
CPU the torch code here, with the same contract, stands in (it is the kernels' specification in the tests).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
from torch import nn

from patchcore_trt.gpu.prune import norm_tiles, upper_bounds
from patchcore_trt.model import DEFAULT_BANK_CHUNK, MemoryBankSearch, nearest_rows

SEARCH_MODES = ("certified", "fp16")
# Kept per tile and re-scored per query: the rows not re-scored are then no nearer than the last re-scored
# candidate. 4 certifies 97% of the patches of a trained ResNet-18 bank (2: 65%, 8: 100%; exact_stress.py).
CANDIDATES_PER_TILE = 4
SCAN_BLOCK_M = 64  # bank rows per tile of the FP32 scan
NEIGHBOUR_CANDIDATES = 24  # per tile, for the neighbour table's k (<= 12 or so) nearest
U16 = 2.0**-11  # FP16 unit roundoff
U32 = 2.0**-24  # FP32 unit roundoff
# Banks this large are rescanned tile by tile in norm order, skipping the tiles prune.py's bound excludes (the
# golden banks' features: about half of them per query); below it the plain scan reads the bank in order.
PRUNE_FROM_ROWS = 2**18
SQRT_MARGIN = 2.0**-18  # r > d^2 (1 + this) guarantees fl(sqrt(r)) > d for d = fl(sqrt(r_best))


@contextlib.contextmanager
def float32_matmul(conv_tf32: bool = False) -> Iterator[None]:
    """IEEE FP32 matrix products (the reference's precision) for the block; cuDNN convolutions in TF32 or not.

    These are process-wide switches: for set-up, references and benchmarks, never around a served call."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = conv_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def runs_kernels(tensor: torch.Tensor) -> bool:
    """Whether the search of ``tensor`` runs the Triton kernels: on CUDA, or anywhere under Triton's CPU
    interpreter (``TRITON_INTERPRET=1``, how the tests run them without a GPU)."""
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def power_of_two_scale(max_abs: torch.Tensor) -> torch.Tensor:
    """2**(14 - e) with ``max_abs < 2**e``: values up to ``max_abs`` scale exactly to below 2**14 (FP16's largest
    finite value is 65504), and keep FP16's full relative precision down to 2**-24 of the largest."""
    _, exponent = torch.frexp(max_abs)
    return torch.ldexp(torch.ones_like(max_abs), (14 - exponent).clamp(-126, 126))


class BankIndex(nn.Module):
    """The memory bank in the forms the search needs, built once on the device that searches.

    Buffers: ``bank`` [M, D] float32, ``bank_sq`` [M] its squared norms (anomalib's ``y.pow(2).sum(-1)``),
    ``centre`` [D] the bank's mean, ``centred_sq`` [M] the squared norms of ``bank - centre``, ``bank_half``
    [M, D] float16 ``(bank - centre) * bank_scale``, and ``neighbours`` [M, k]: each bank row's k nearest bank
    rows, the support set of anomalib's image-score re-weighting, which depends on the bank alone.

    Args:
        memory_bank: [M, D] the fitted bank.
        num_neighbors: anomalib's k (1: no table).
        device: Where the search runs.
        prune_from_rows: Banks with this many rows or more get ``tiles`` (prune.NormTiles), which ``rescan`` uses.
        neighbours: A precomputed table (``neighbour_table``'s result for this bank and k). Building it is an FP16
            k-NN of the bank against itself on the candidate kernel (M^2 D multiply-adds, 24 candidates kept per
            tile), a top-k and an FP32 re-rank per block of rows: estimated at 10-30 s for M=1M, D=1536 on an H100,
            against 115-120 s for the FP32 M x M search it replaces (not yet measured on a GPU:
            ``python benchmarks/exact_stress.py --out OUT --table-reference`` times both and checks them equal).
    """

    def __init__(
        self,
        memory_bank: torch.Tensor,
        num_neighbors: int,
        device: torch.device | str = "cpu",
        neighbours: torch.Tensor | None = None,
        prune_from_rows: int = PRUNE_FROM_ROWS,
    ) -> None:
        super().__init__()
        bank = memory_bank.to(device=device, dtype=torch.float32).contiguous()
        self.tiles = norm_tiles(bank, SCAN_BLOCK_M) if len(bank) >= prune_from_rows else None
        chunks = range(0, len(bank), 65536)  # no FP32 or FP64 copy of a million-row bank at once
        centre = sum(bank[s : s + 65536].sum(dim=0, dtype=torch.float64) for s in chunks) / max(len(bank), 1)
        centre = torch.as_tensor(centre, device=bank.device).float()
        self.register_buffer("bank", bank)
        self.register_buffer("bank_sq", torch.cat([bank[s : s + 65536].pow(2).sum(dim=-1) for s in chunks]))
        self.register_buffer("centre", centre)
        self.register_buffer("centred_sq", torch.cat([(bank[s : s + 65536] - centre).pow(2).sum(-1) for s in chunks]))
        max_abs = max((bank[s : s + 65536] - centre).abs().amax() for s in chunks)
        self.register_buffer("bank_scale", power_of_two_scale(max_abs.reshape(())))
        half = [((bank[s : s + 65536] - centre) * self.bank_scale).half() for s in chunks]
        self.register_buffer("bank_half", torch.cat(half))
        self.norm_max = math.sqrt(float(self.bank_sq.max()))
        self.centred_norm_max = math.sqrt(float(self.centred_sq.max()))
        k = min(num_neighbors, bank.shape[0]) if num_neighbors > 1 else 0
        if neighbours is None:
            neighbours = neighbour_table(self, k)
        elif neighbours.shape != (len(bank), k):
            raise ValueError(f"the neighbour table is {list(neighbours.shape)}, this bank needs {[len(bank), k]}")
        self.register_buffer("neighbours", neighbours.to(device=bank.device, dtype=torch.long))

    @property
    def bank_size(self) -> int:
        return int(self.bank.shape[0])

    def error_bound(self, centred_sq: torch.Tensor, query_sq: torch.Tensor) -> torch.Tensor:
        """A worst-case bound [P] (float64) on |candidate value + ||x - c||^2 - r| for every bank row, where r is
        the row's FP32 ``x.y * -2 + ||x||^2 + ||y||^2`` in any summation order.

        Terms (X, Y: norms of the query and of the largest bank row; X', Y' the same after centring; D features):
        FP16 rounding of both centred operands, relative ``eps`` each (with FP16 subnormals below the scaled
        2**13); the FP32 accumulation of D products (``g_acc``, unit 2**-22: tensor cores may truncate); the
        FP32 norms and sums on both sides (``g``). The whole is doubled for the rounding of the bound itself.
        """
        dim = self.bank.shape[1]
        eps = U16 + U32 + math.sqrt(dim) * 2.0**-38
        g_acc = dim * 2.0**-22 / (1 - dim * 2.0**-22)
        g = dim * U32 / (1 - dim * U32)
        xc, x = centred_sq.double().clamp_min(0).sqrt(), query_sq.double().clamp_min(0).sqrt()
        yc, y = self.centred_norm_max, self.norm_max
        candidate = 2 * ((2 * eps + eps**2) + g_acc * (1 + eps) ** 2) * xc * yc + (g + 4 * U32) * (xc + yc) ** 2
        reference = 2 * g * x * y + g * (x**2 + y**2) + 2.02 * U32 * (x + y) ** 2
        return 2 * (candidate + reference)


def _centred_half(queries: torch.Tensor, index: BankIndex) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries as the candidate pass takes them: FP16 ``(x - centre) * scale``, the factor ``2 / (scale *
    bank_scale)`` that undoes both scales exactly, and ``||x - centre||^2`` in FP32."""
    centred = queries - index.centre
    scale = power_of_two_scale(centred.abs().amax())
    factor = (2.0 / (scale * index.bank_scale)).reshape(1)
    return (centred * scale).half(), factor, centred.pow(2).sum(dim=-1)


def candidates(queries: torch.Tensor, index: BankIndex, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FP16 candidates: [P, C] approximate ``||y - c||^2 - 2 (x - c).(y - c)``, their bank rows, and [P]
    ``||x - c||^2`` (c: the bank's centre; the three add up to ``||x - y||^2``).

    On CUDA, the ``keep`` best of every bank tile (knn_triton); on the CPU, of every chunk of
    DEFAULT_BANK_CHUNK rows, with FP16-rounded operands and FP32 sums like the kernel's.
    """
    half, factor, centred_sq = _centred_half(queries, index)
    if runs_kernels(half):
        from patchcore_trt.gpu.knn_triton import tile_candidates

        return (*tile_candidates(half, index.bank_half, index.centred_sq, keep, factor), centred_sq)
    values, rows = [], []
    for start in range(0, index.bank_size, DEFAULT_BANK_CHUNK):
        tile = index.bank_half[start : start + DEFAULT_BANK_CHUNK].float()
        approx = index.centred_sq[start : start + DEFAULT_BANK_CHUNK] - (half.float() @ tile.T) * factor
        best = approx.topk(min(keep, tile.shape[0]), dim=1, largest=False)
        values.append(best.values)
        rows.append(best.indices + start)
    return torch.cat(values, dim=1), torch.cat(rows, dim=1), centred_sq


def rescore_cpu(
    queries: torch.Tensor, query_sq: torch.Tensor, picked: torch.Tensor, index: BankIndex
) -> tuple[torch.Tensor, torch.Tensor]:
    """knn_triton.rescore in torch (the CPU path, and the kernel's specification in the tests): anomalib's
    euclidean_dist to each picked row (x.y * -2 + ||x||^2 + ||y||^2, clamped, square-rooted), then min(1)'s rule:
    the smaller distance, the lower row among equals (sorting by row first makes min's first index the lowest)."""
    picked = picked.sort(dim=1).values
    dots = torch.bmm(index.bank[picked], queries[:, :, None]).squeeze(-1)
    distances = (dots * -2 + query_sq[:, None] + index.bank_sq[picked]).clamp_min(0).sqrt()
    distance, column = distances.min(dim=1)
    return distance, picked.gather(1, column[:, None]).squeeze(1)


def certified(
    distances: torch.Tensor, runner_up: torch.Tensor, centred_sq: torch.Tensor, query_sq: torch.Tensor, index: BankIndex
) -> torch.Tensor:
    """[P] bool: every bank row the first pass did not re-score is provably strictly farther than the answer.

    Each such row's candidate value is at least ``runner_up`` (a tile keeps its CANDIDATES_PER_TILE smallest,
    and the first pass re-scores the CANDIDATES_PER_TILE smallest of all, the largest of them ``runner_up``),
    so its FP32 squared distance is at least ``runner_up + ||x - c||^2 - error_bound``; when that exceeds the
    answer's squared distance with a margin, its square root exceeds the answer's too (equal roots would tie,
    and anomalib would take the lower row).
    """
    lower = runner_up.double() + centred_sq.double() - index.error_bound(centred_sq, query_sq)
    return lower > distances.double().square() * (1 + SQRT_MARGIN)


def rescan(
    queries: torch.Tensor,
    query_sq: torch.Tensor,
    flagged: torch.Tensor,
    distances: torch.Tensor,
    rows: torch.Tensor,
    index: BankIndex,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``distances`` and ``rows`` with each ``flagged`` query's answer replaced by anomalib's FP32 search of the
    whole bank (scan_triton.scan on CUDA, without a host sync; model.nearest_rows on the CPU)."""
    if runs_kernels(queries):
        from patchcore_trt.gpu.scan_triton import pruned_scan, scan

        if index.tiles is None:
            full, full_rows = scan(queries, query_sq, flagged, index.bank, index.bank_sq, block_m=SCAN_BLOCK_M)
        else:  # each query's current row bounds its answer
            upper = upper_bounds(queries, rows, index.bank)
            found = pruned_scan(queries, query_sq, flagged, index.bank, index.bank_sq, index.tiles, upper)
            full, full_rows = found[:2]
        return torch.where(flagged, full, distances), torch.where(flagged, full_rows, rows)
    which = flagged.nonzero()[:, 0]
    if len(which) == 0:
        return distances, rows
    full, full_rows = nearest_rows(queries[which], index.bank, index.bank_sq, DEFAULT_BANK_CHUNK)
    return distances.index_put((which,), full), rows.index_put((which,), full_rows)


def certified_pass(
    queries: torch.Tensor, index: BankIndex
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact mode's first pass: distances [P], rows [P], which queries the certificate could not prove
    (``flagged`` [P] bool: ``rescan`` answers them) and ``||x||^2`` [P].

    The CANDIDATES_PER_TILE best candidates of all are re-scored in FP32 (``rescore``); their largest candidate
    value is the runner-up ``certified`` needs."""
    values, rows, centred_sq = candidates(queries, index, CANDIDATES_PER_TILE)
    best = values.topk(min(CANDIDATES_PER_TILE, values.shape[1]), dim=1, largest=False)
    picked = rows.gather(1, best.indices).long()
    query_sq = queries.pow(2).sum(dim=-1)
    if runs_kernels(queries):
        from patchcore_trt.gpu.knn_triton import rescore

        distances, found = rescore(queries.contiguous(), query_sq, picked, index.bank, index.bank_sq)
    else:
        distances, found = rescore_cpu(queries, query_sq, picked, index)
    runner_up = (
        best.values[:, -1] if best.values.shape[1] == CANDIDATES_PER_TILE else torch.full_like(query_sq, math.inf)
    )
    return distances, found, ~certified(distances, runner_up, centred_sq, query_sq, index), query_sq


def nearest(queries: torch.Tensor, index: BankIndex, mode: str = "certified") -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to, and bank row of, the nearest bank row for each FP32 query row [P, D] (see the module
    docstring for what each mode guarantees)."""
    if mode not in SEARCH_MODES:
        raise ValueError(f"search mode must be one of {SEARCH_MODES}, got {mode!r}")
    if mode == "certified":
        distances, found, flagged, query_sq = certified_pass(queries, index)
        return rescan(queries, query_sq, flagged, distances, found, index)
    values, rows, centred_sq = candidates(queries, index, 1)
    if runs_kernels(queries):
        from patchcore_trt.gpu.knn_triton import fast_finish

        return fast_finish(centred_sq, values, rows)
    best, column = values.min(dim=1)
    return (best + centred_sq).clamp_min(0).sqrt(), rows.gather(1, column[:, None]).squeeze(1).long()


@torch.no_grad()
def neighbour_table(index: BankIndex, k: int, chunk: int = 4096) -> torch.Tensor:
    """[M, k]: each bank row's k nearest bank rows by anomalib's distances, nearest first, lower row first among
    equal distances; certified equal to the FP32 k-NN search of the bank against itself.

    Per block of bank rows: the NEIGHBOUR_CANDIDATES best FP16 candidates per tile (the candidate kernel), the
    best of them all re-scored in FP32 and ordered by anomalib's rule; a row whose k-th distance the error
    bound cannot separate from every row not re-scored gets the exact FP32 k-NN (MemoryBankSearch) instead.
    """
    bank = index.bank
    if k == 0:
        return torch.empty((len(bank), 0), dtype=torch.long, device=bank.device)
    keep = min(max(NEIGHBOUR_CANDIDATES, k + 1), index.bank_size)
    exact: MemoryBankSearch | None = None
    blocks = []
    for start in range(0, len(bank), chunk):
        queries = bank[start : start + chunk]
        query_sq = index.bank_sq[start : start + chunk]
        values, rows, centred_sq = candidates(queries, index, keep)
        best = values.topk(keep, dim=1, largest=False)
        picked = rows.gather(1, best.indices).long().sort(dim=1).values  # by row: the stable sort below keeps
        dots = torch.bmm(bank[picked], queries[:, :, None]).squeeze(-1)
        distances = (dots * -2 + query_sq[:, None] + index.bank_sq[picked]).clamp_min(0).sqrt()
        order = distances.sort(dim=1, stable=True).indices[:, :k]  # ... the lower row first among equals
        table, kth = picked.gather(1, order), distances.gather(1, order[:, -1:]).squeeze(1)
        if keep < index.bank_size:
            lower = best.values[:, -1].double() + centred_sq.double() - index.error_bound(centred_sq, query_sq)
            flagged = (lower <= kth.double().square() * (1 + SQRT_MARGIN)).nonzero()[:, 0]
            if len(flagged):
                exact = exact or MemoryBankSearch(bank)
                table[flagged] = exact.k_nearest_indices(queries[flagged], k)
        blocks.append(table)
    return torch.cat(blocks)
