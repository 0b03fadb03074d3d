"""Run Triton kernel checks: compiled on a GPU where there is one, else in Triton's CPU interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent


def run_kernels(code: str, marker: str) -> None:
    """Run ``code`` (its ``sys.argv[1]`` is the device) on the GPU where there is one (compiled kernels), else in
    Triton's CPU interpreter (which must be enabled before triton is imported, so in a fresh process)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), device], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0 and marker in result.stdout, result.stderr[-3000:]
