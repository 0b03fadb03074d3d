"""A certified bound that lets the exact scan skip bank tiles which cannot hold a query's nearest row.

For any x, y: ||x - y|| >= | ||x|| - ||y|| |. Sorting the bank by row norm gives tiles whose norms lie in a
narrow [low, high]; a query x whose norm is far outside it is far from every row there:
``||x - y||^2 >= gap^2`` with ``gap = max(low - ||x||, ||x|| - high, 0)``.

The scan does not compare true distances but anomalib's FP32 ones, ``sqrt(max(-2 x.y + ||x||^2 + ||y||^2, 0))``
with ``||x||^2``, ``||y||^2`` and ``x.y`` themselves FP32 sums of D terms. Whatever the summation order, such a
squared distance is within ``margin = (2 D + 8) u (||x|| + ||y||)^2`` of the true one (u = 2**-24; the
rounding analysis gives (D + 3) u (1 + O(D u)), doubled for safety). So with an upper bound ``U`` on the FP32
squared distance of the eventual winner (``upper_bounds``: the true squared distance of any one bank row plus
its margin) a tile can be skipped when ``gap^2 - margin(high) > U (1 + 8 u)``: each of its rows then has an
FP32 square above ``U (1 + 8 u)``, whose FP32 square root is strictly above the winner's (4 u apart after the
root, more than one rounding of each), so none of them can win or tie. Skipping is never required for the
result, only allowed; the kernel (scan_triton.py) evaluates the test in FP32 with extra slack, so it skips a
subset of what ``skippable`` (the float64 specification) allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNIT = 2.0**-24  # FP32's unit roundoff
TIE_FACTOR = 1 + 8 * UNIT  # squares this far apart have FP32 square roots that differ


@dataclass(frozen=True)
class NormTiles:
    """The bank's rows in increasing norm, cut into ``block_m``-row tiles with bounds on their norms (the rows
    are read in place: no sorted copy of the bank)."""

    rows: torch.Tensor  # [M] int32: the bank rows, by increasing norm
    low: torch.Tensor  # [tiles] float32, at most every norm in the tile
    high: torch.Tensor  # [tiles] float32, at least every norm in the tile
    low64: torch.Tensor  # [tiles] float64, the tile's smallest norm
    high64: torch.Tensor  # [tiles] float64, the tile's largest norm
    block_m: int


def margin(dim: int, x_norm: torch.Tensor, y_norm: torch.Tensor) -> torch.Tensor:
    """Worst-case |FP32 squared distance - true squared distance| (float64), see the module docstring."""
    return (2 * dim + 8) * UNIT * (x_norm + y_norm) ** 2


def row_norms(rows: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """[N] float64 norms of [N, D] rows, a chunk at a time (a float64 copy of a 1M-row bank would be 12 GB)."""
    return torch.cat([part.double().norm(dim=1) for part in rows.split(chunk)])


def norm_tiles(bank: torch.Tensor, block_m: int) -> NormTiles:
    """``bank`` [M, D] float32's rows by increasing norm, in tiles."""
    norms = row_norms(bank)
    order = torch.argsort(norms, stable=True)
    ordered = norms[order]
    tiles = -(-len(ordered) // block_m)
    padded = torch.cat([ordered, ordered[-1:].expand(tiles * block_m - len(ordered))]).view(tiles, block_m)
    low64, high64 = padded[:, 0].clone(), padded.amax(dim=1)
    # Rounded outward to FP32, so they stay bounds.
    low, high = low64.float(), high64.float()
    low = torch.where(low.double() > low64, torch.nextafter(low, torch.full_like(low, -torch.inf)), low)
    high = torch.where(high.double() < high64, torch.nextafter(high, torch.full_like(high, torch.inf)), high)
    return NormTiles(order.to(torch.int32), low, high, low64, high64, block_m)


def upper_bounds(queries: torch.Tensor, guesses: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """[P] float32, at least ``TIE_FACTOR`` times the FP32 squared distance of each query's nearest row, from
    any one bank row per query (``guesses`` [P]; the nearer, the more tiles are skipped)."""
    parts = []
    for x, rows in zip(queries.split(4096), guesses.split(4096), strict=True):  # float64 a chunk at a time
        x, y = x.double(), bank[rows].double()
        true = (x - y).pow(2).sum(dim=-1) * (1 + 1e-12)  # float64's own rounding, generously
        parts.append((true + margin(queries.shape[1], x.norm(dim=1), y.norm(dim=1))) * TIE_FACTOR)
    bound = torch.cat(parts)
    rounded = bound.float()
    return torch.where(rounded.double() < bound, torch.nextafter(rounded, torch.full_like(rounded, torch.inf)), rounded)


def skippable(queries: torch.Tensor, upper: torch.Tensor, tiles: NormTiles) -> torch.Tensor:
    """[P, tiles] bool: the float64 specification of the kernel's test (which skips a subset of these)."""
    norm = row_norms(queries)[:, None]
    gap = torch.maximum(tiles.low64[None, :] - norm, norm - tiles.high64[None, :]).clamp_min(0)
    return gap.square() - margin(queries.shape[1], norm, tiles.high64[None, :]) > upper.double()[:, None]
