"""One exception type for everything a user can fix: the CLI prints it as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, worded so the user can act on it."""


class MissingDependencyError(UserError):
    """An optional (or broken) dependency is not importable; ``extra`` names the patchcore-trt extra, if any."""

    def __init__(self, module: str, extra: str | None = None) -> None:
        requirement = f"'patchcore-trt[{extra}]'" if extra else module
        super().__init__(f"{module} is not installed; install it with: pip install {requirement}")
