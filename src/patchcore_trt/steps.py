"""Long library calls report progress through a ``step(title)`` context manager (the CLI logs start, end and time)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

Step = Callable[[str], AbstractContextManager[None]]


@contextlib.contextmanager
def quiet(title: str) -> Iterator[None]:
    """The default ``step``: no output."""
    del title
    yield
