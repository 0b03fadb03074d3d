"""How the served model splits what Triton's dynamic batcher merged: runs of at most a pixel budget.

The batcher merges up to max_batch requests into one call, and each request may carry up to ``max_request_pixels``;
without a split, one call could hold max_batch times that budget (and its maps) at once in the model process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

Item = TypeVar("Item")


def runs_within(items: Sequence[Item], budget: int, pixels: Callable[[Item], int]) -> list[list[Item]]:
    """``items`` in order, cut into consecutive runs whose ``pixels`` add up to at most ``budget`` (an item over the
    budget alone is a run of its own: requests are checked against the budget before they get here)."""
    runs: list[list[Item]] = []
    used = budget + 1
    for item in items:
        size = pixels(item)
        if used + size > budget:
            runs.append([])
            used = 0
        runs[-1].append(item)
        used += size
    return runs
