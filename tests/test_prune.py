"""The certified pruning of the exact scan (gpu/prune.py, gpu/scan_triton.pruned_scan): the bound against real
FP32 distances on the CPU, and the pruned kernel against the exhaustive FP32 search on planted exact ties and
near-ties (Triton's interpreter here, compiled on a GPU)."""

from __future__ import annotations

import torch
from interpreter import run_kernels
from planted import planted

from patchcore_trt.gpu.prune import norm_tiles, skippable, upper_bounds
from patchcore_trt.model import nearest_rows, squared_distances


def spread_bank(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The planted bank (ties, near-ties) with scaled copies of its rows appended: norms from about 0.2x to 3x
    the queries', so whole norm tiles are far from every query and others are not."""
    bank, queries = planted(seed, rows=300, dim=40, queries=70)
    return torch.cat([bank, bank[:150] * 3.0, bank[150:250] * 0.2, bank[:40] * 1.05]), queries


def test_skippable_tiles_hold_no_row_as_near_as_the_fp32_winner():
    """Every (query, tile) the bound excludes: each row there has an FP32 distance (anomalib's formula, any
    row guessed for the bound) strictly above the query's FP32 nearest distance, so it can neither win nor tie."""
    bank, queries = spread_bank(1)
    bank_sq = bank.pow(2).sum(-1)
    best, best_rows = nearest_rows(queries, bank, bank_sq)
    generator = torch.Generator().manual_seed(3)
    for guesses in (best_rows, torch.randint(0, len(bank), (len(queries),), generator=generator)):
        tiles = norm_tiles(bank, 16)
        skip = skippable(queries, upper_bounds(queries, guesses, bank), tiles)
        in_order = tiles.rows.long()
        distances = squared_distances(queries, bank[in_order], bank_sq[in_order]).clamp_min(0).sqrt()
        per_tile = torch.nn.functional.pad(distances, (0, skip.shape[1] * 16 - len(bank)), value=float("inf"))
        nearest_in_tile = per_tile.view(len(queries), -1, 16).amin(dim=2)
        assert (nearest_in_tile[skip] > best[:, None].expand_as(skip)[skip]).all()
        assert 0.2 < skip.float().mean() < 0.9  # the bound does exclude tiles, not all of them


PRUNED_CHECK = """
import sys
import torch
from planted import COPIES, NEAR_TIE_ROWS
from test_prune import spread_bank
from patchcore_trt.gpu.knn import BankIndex, nearest, rescan
from patchcore_trt.gpu.prune import norm_tiles, skippable, upper_bounds
from patchcore_trt.gpu.scan_triton import pruned_scan, scan
from patchcore_trt.model import nearest_rows
device = sys.argv[1]
bank, queries = spread_bank(5)
bank_sq = bank.pow(2).sum(-1)
query_sq = queries.pow(2).sum(-1)
expected, expected_rows = nearest_rows(queries, bank, bank_sq)
# The planted answers: the lower row of each exact tie, the nearest of the five near-tied rows.
assert expected_rows[: len(COPIES)].tolist() == [a for a, _ in COPIES]
assert expected_rows[len(COPIES)] == NEAR_TIE_ROWS[-1]
generator = torch.Generator().manual_seed(2)
guesses = torch.where(torch.rand(len(queries), generator=generator) < 0.5, expected_rows,
                      torch.randint(0, len(bank), (len(queries),), generator=generator))
guesses[: len(COPIES)] = torch.tensor([b for _, b in COPIES])  # the copy (higher row) as the guess
guesses[len(COPIES)] = NEAR_TIE_ROWS[0]  # the farthest of the near-tied rows
upper = upper_bounds(queries, guesses, bank)
flagged = torch.ones(len(queries), dtype=torch.bool)
flagged[-9:] = False
block_p = 8
for block_m in (16, 64):
    tiles = norm_tiles(bank, block_m)
    to = lambda t: t.to(device)
    moved = type(tiles)(*(to(v) if isinstance(v, torch.Tensor) else v for v in tiles.__dict__.values()))
    distances, rows, skipped = pruned_scan(
        to(queries), to(query_sq), to(flagged), to(bank), to(bank_sq), moved, to(upper), block_p, groups=2
    )
    plain, plain_rows = scan(to(queries), to(query_sq), to(flagged), to(bank), to(bank_sq), block_p, block_m, 2)
    rows, distances, plain_rows = rows.cpu(), distances.cpu(), plain_rows.cpu()
    assert torch.equal(rows[flagged], expected_rows[flagged]) and torch.equal(plain_rows[flagged], rows[flagged])
    torch.testing.assert_close(distances[flagged].square(), expected[flagged].square(), rtol=1e-5, atol=1e-4)
    # Skipped (query block, tile) pairs: some, and only where the float64 specification allows it for every
    # query of the block (the kernel's FP32 test is stricter).
    by_norm = torch.argsort(queries[flagged].double().norm(dim=1))  # pruned_scan's order of the queries
    allowed = skippable(queries[flagged][by_norm], upper[flagged][by_norm], tiles)
    blocks = torch.nn.functional.pad(allowed, (0, 0, 0, -len(allowed) % block_p), value=True)
    allowed_blocks = int(blocks.view(-1, block_p, allowed.shape[1]).all(dim=1).sum())
    assert 0 < int(skipped) <= allowed_blocks, (int(skipped), allowed_blocks)
    print(block_m, int(skipped), allowed_blocks, blocks.shape[0] // block_p * allowed.shape[1])
# The exact search on a bank large enough to be rescanned with pruning: the planted answers, and every query
# rescanned from a random row.
index = BankIndex(to(bank), 9, prune_from_rows=len(bank))
assert index.tiles is not None and BankIndex(to(bank), 9, prune_from_rows=len(bank) + 1).tiles is None
distances, rows = nearest(to(queries), index)
assert torch.equal(rows.cpu(), expected_rows)
everywhere = torch.ones(len(queries), dtype=torch.bool, device=device)
far = torch.full((len(queries),), float("inf"), device=device)
distances, rows = rescan(to(queries), to(query_sq), everywhere, far, to(guesses), index)
assert torch.equal(rows.cpu(), expected_rows)
torch.testing.assert_close(distances.cpu().square(), expected.square(), rtol=1e-5, atol=1e-4)
print("pruned scan agrees")
"""


def test_pruned_scan_is_the_exhaustive_fp32_search():
    """Planted exact ties (guessed by their higher copy), the five-way near-tie (guessed by its farthest row),
    random guesses and odd sizes: the pruned kernel returns the exhaustive search's rows, skips tiles, and only
    where the bound allows; the exact search on a bank it prunes (knn.nearest, knn.rescan) gives those rows."""
    run_kernels(PRUNED_CHECK, "pruned scan agrees")
