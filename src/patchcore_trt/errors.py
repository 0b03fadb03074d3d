"""One exception type for everything a user can fix: the CLI prints it as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, worded so the user can act on it."""


class MissingDependencyError(UserError):
    """An optional backend is not installed."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(f"{module} is not installed; install it with: pip install 'patchcore-trt[{extra}]'")
