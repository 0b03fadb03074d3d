"""Memory banks with planted ties for the exact-search tests (tests/test_exact_search.py, and the kernel check in
tests/test_cuda_backend.py, which imports this module in a subprocess).

The bank is random with a common offset (post-ReLU features have one: products large next to distances), and
holds, for ``tile``-row bank tiles:
- exact ties: row copies within one tile, across a tile boundary and tiles apart; each of the first queries
  lies near one copied row, so two or three bank rows share its smallest distance bit for bit;
- a five-way near-tie: five rows at distances 3 (1 + k 1e-4), k = 4..0, from one query, the nearest last, in
  different tiles: far apart in FP32 (squared gaps ~2e-3, rounding ~1e-5), inside FP16's rounding (~2e-2), so
  a search that trusted FP16's ranking of its top few would return the wrong row, and more rows tie than the
  exact search re-scores (knn.CANDIDATES_PER_TILE = 4), so its certificate must refuse the query.
That query is also the farthest from the bank, so in an image it is the argmax patch.
"""

from __future__ import annotations

import torch

COPIES = ((10, 20), (61, 67), (5, 129), (33, 3 * 64 + 7))  # (original, copy): same tile, boundary, tiles apart
NEAR_TIE_ROWS = (250, 130, 77, 280, 199)  # distances 3 (1 + 4e-4), ..., 3 (1 + 1e-4), 3: the nearest is 199


def planted(seed: int, rows: int = 300, dim: int = 40, queries: int = 23) -> tuple[torch.Tensor, torch.Tensor]:
    """(bank [rows, dim], queries [queries, dim]): the first len(COPIES) queries sit on exact ties, the next one on
    the near-tie, the rest are random."""
    generator = torch.Generator().manual_seed(seed)
    bank = torch.randn(rows, dim, generator=generator) + 2
    near = torch.randn(queries, dim, generator=generator) + 2
    for original, copy in COPIES:
        bank[copy] = bank[original]
    for i, (original, _) in enumerate(COPIES):
        near[i] = bank[original] + 0.01 * torch.randn(dim, generator=generator)
    tie_query = len(COPIES)
    gaussian = torch.randn(dim, len(NEAR_TIE_ROWS), generator=generator, dtype=torch.float64)
    directions = torch.linalg.qr(gaussian).Q.T
    stretches = [1e-4 * k for k in range(len(NEAR_TIE_ROWS) - 1, -1, -1)]
    for row, direction, stretch in zip(NEAR_TIE_ROWS, directions, stretches, strict=True):
        bank[row] = (near[tie_query].double() + 3 * (1 + stretch) * direction).float()
    return bank, near


def planted_images(bank: torch.Tensor, queries: torch.Tensor, patches: int = 12) -> torch.Tensor:
    """[2, patches, D]: image 0 holds the near-tie query (its argmax patch) among patches near bank rows; image 1
    holds the first exact-tie query as its argmax patch."""
    generator = torch.Generator().manual_seed(7)
    images = bank[torch.randint(0, len(bank), (2, patches), generator=generator)]
    images = images + 0.3 * torch.randn(images.shape, generator=generator)
    images[0, 5] = queries[len(COPIES)]
    images[1, 3] = bank[COPIES[0][0]] + 0.5 * torch.randn(bank.shape[1], generator=generator)
    return images
