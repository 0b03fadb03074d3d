"""The README's code blocks run as written: every ``bash`` and ``python`` block, in order, in a fresh folder that
holds only what the README's examples name (``model.ckpt``, ``images/``, ``labelled/``) and the environments the
set-up made (``.venv``, ``.venv-triton``).

The set-up block's set-up is .ci/setup, which .ci/run calls too (checked here), and the test command is this run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)
SETUP = "bash .ci/setup"
TEST_COMMAND = ".venv/bin/python -m pytest -q"


def readme_blocks() -> list[tuple[str, str]]:
    return FENCE.findall(README.read_text())


def test_the_setup_and_test_commands_are_what_ci_runs():
    blocks = [code.strip() for _, code in readme_blocks()]
    (setup,) = [code for code in blocks if code.startswith(SETUP)]
    assert setup == f"{SETUP} && .venv/bin/patchcore-trt demo", setup
    ci = [line.strip() for line in CI.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert SETUP in ci and TEST_COMMAND in blocks, "the README's set-up or test command is not what .ci/run runs"
    # CI sets up exactly as the README does, then runs the README's test command last, with nothing in between
    # but the browser and the linters.
    assert ci[-1] == TEST_COMMAND and ci.index(SETUP) < ci.index(TEST_COMMAND)
    # The set-up makes every environment the documented commands use, the Triton server's included.
    assert "bash .ci/serve-env" in (ROOT / ".ci" / "setup").read_text()


@pytest.fixture()
def examples(resnet18_checkpoint, dataset, tmp_path) -> Path:
    """A folder with the files the README's examples name, and the repository's virtual environment."""
    for environment in (".venv", ".venv-triton"):  # what .ci/setup made
        if not (ROOT / environment / "bin" / "python").is_file():
            pytest.fail(f"{ROOT / environment} is not here: run the README's set-up (bash .ci/setup)", pytrace=False)
        (tmp_path / environment).symlink_to(ROOT / environment)
    shutil.copy(resnet18_checkpoint, tmp_path / "model.ckpt")
    shutil.copytree(dataset.root / "test", tmp_path / "images")
    shutil.copytree(dataset.root, tmp_path / "labelled")
    return tmp_path


def test_every_readme_block_runs_as_written(examples):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "1048576", "COLUMNS": "200"}
    ran = 0
    for language, code in readme_blocks():
        if code.strip().startswith(SETUP) or code.strip() == TEST_COMMAND:
            continue  # .ci/run runs these very commands (checked above)
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        result = subprocess.run(command, cwd=examples, env=env, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{result.stderr[-3000:]}"
        ran += 1
    assert ran >= 3
