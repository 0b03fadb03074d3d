"""Memory-bank search for the fast model: FP16 tensor-core candidates, then an exact FP32 re-rank.

Two modes, same bank, same answer format (distance and bank row of each query's nearest neighbour):

- ``exact``: every bank tile reports its two smallest FP16 approximations of ``||y||^2 - 2 x.y``
  (FP16 operands, FP32 accumulation); the two best overall are re-scored in FP32 with
  ``model.squared_distances``'s formula and operation order. The result is the FP32 search's unless three
  bank rows tie within FP16 rounding (about 1e-5 of ``||x|| ||y||``), and then it is the distance to one
  of the tied rows.
- ``fast``: the best FP16 approximation itself, plus ``||x||^2`` in FP32.

On CUDA both steps are Triton kernels (knn_triton.py) and the [queries x bank] matrix is never written; on
the CPU torch code with the same contract stands in, so the whole fast model also runs, and is tested,
without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from patchcore_trt.model import DEFAULT_BANK_CHUNK, MemoryBankSearch, row_squared_norms

SEARCH_MODES = ("exact", "fast")
EXACT_CANDIDATES = 2


@contextlib.contextmanager
def float32_matmul(conv_tf32: bool = False) -> Iterator[None]:
    """IEEE FP32 matrix products (the reference's precision) for the block; cuDNN convolutions in TF32 or not.

    CUDA graphs keep the math mode they were captured with, so capture runs inside this block too.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = conv_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class BankIndex(nn.Module):
    """The memory bank in the forms the search needs, built once on the device that searches.

    Buffers: ``bank`` [M, D] float32, ``bank_sq`` [M] its squared norms, ``bank_half`` [M, D] float16, and
    ``neighbours`` [M, k]: each bank row's k nearest bank rows (itself first), the support set of anomalib's
    image-score re-weighting, which depends on the bank alone and so is searched once here, in FP32.
    """

    def __init__(self, memory_bank: torch.Tensor, num_neighbors: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        bank = memory_bank.to(device=device, dtype=torch.float32).contiguous()
        self.register_buffer("bank", bank)
        self.register_buffer("bank_sq", row_squared_norms(bank))
        self.register_buffer("bank_half", bank.to(torch.float16))
        k = min(num_neighbors, bank.shape[0]) if num_neighbors > 1 else 0
        self.register_buffer("neighbours", self._neighbour_table(bank, k))

    @property
    def bank_size(self) -> int:
        return int(self.bank.shape[0])

    @staticmethod
    @torch.no_grad()
    def _neighbour_table(bank: torch.Tensor, k: int) -> torch.Tensor:
        if k == 0:
            return torch.empty((bank.shape[0], 0), dtype=torch.long, device=bank.device)
        exact = MemoryBankSearch(bank)
        with float32_matmul():
            blocks = [
                exact.k_nearest_indices(bank[s : s + DEFAULT_BANK_CHUNK], k)
                for s in range(0, len(bank), DEFAULT_BANK_CHUNK)
            ]
        return torch.cat(blocks)


def candidates(queries: torch.Tensor, index: BankIndex, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP16 candidates: [P, C] approximate ``||y||^2 - 2 x.y`` and their bank rows.

    On CUDA, the ``keep`` best of every bank tile (knn_triton); on the CPU, of every chunk of
    DEFAULT_BANK_CHUNK rows, with FP16-rounded operands and FP32 sums like the kernel's.
    """
    half = queries.to(torch.float16)
    if half.is_cuda:
        from patchcore_trt.gpu.knn_triton import tile_candidates

        return tile_candidates(half, index.bank_half, index.bank_sq, keep)
    values, rows = [], []
    for start in range(0, index.bank_size, DEFAULT_BANK_CHUNK):
        tile = index.bank_half[start : start + DEFAULT_BANK_CHUNK].float()
        approx = index.bank_sq[start : start + DEFAULT_BANK_CHUNK] - 2.0 * (half.float() @ tile.T)
        best = approx.topk(min(keep, tile.shape[0]), dim=1, largest=False)
        values.append(best.values)
        rows.append(best.indices + start)
    return torch.cat(values, dim=1), torch.cat(rows, dim=1)


def _finish_cpu(
    queries: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, index: BankIndex, exact: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """knn_triton.finish in torch (the CPU path, and the kernel's specification in the tests)."""
    if not exact:
        best, column = values.min(dim=1)
        query_sq = queries.pow(2).sum(dim=-1)
        return (best + query_sq).clamp_min(0).sqrt(), rows.gather(1, column[:, None]).squeeze(1).long()
    if values.shape[1] > EXACT_CANDIDATES:
        rows = rows.gather(1, values.topk(EXACT_CANDIDATES, dim=1, largest=False).indices)
    rows = rows.long()
    # model.squared_distances's formula and order: -2 x.y + ||x||^2 + ||y||^2, clamped at 0.
    dots = torch.bmm(index.bank[rows], queries[:, :, None]).squeeze(-1)
    squared = (dots * -2 + queries.pow(2).sum(dim=-1)[:, None] + index.bank_sq[rows]).clamp_min(0)
    best, column = squared.min(dim=1)
    return best.sqrt(), rows.gather(1, column[:, None]).squeeze(1)


def nearest(queries: torch.Tensor, index: BankIndex, mode: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to, and bank row of, the nearest bank row for each FP32 query row [P, D]."""
    if mode not in SEARCH_MODES:
        raise ValueError(f"search mode must be one of {SEARCH_MODES}, got {mode!r}")
    exact = mode == "exact"
    values, rows = candidates(queries, index, EXACT_CANDIDATES if exact else 1)
    if not queries.is_cuda:
        return _finish_cpu(queries, values, rows, index, exact)
    from patchcore_trt.gpu.knn_triton import finish

    return finish(queries.contiguous(), values, rows, index.bank, index.bank_sq, exact)
