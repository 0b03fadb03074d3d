"""Every generated table of README.md and docs/ is what its committed result file gives
(benchmarks/readme_tables.py), so no figure there is hand-typed or left behind by a new run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme_tables  # noqa: E402


@pytest.mark.parametrize("document", readme_tables.DOCUMENTS, ids=lambda path: path.name)
def test_the_generated_tables_are_their_sources(document):
    text = document.read_text()
    assert readme_tables.REGION.search(text), f"{document} has no generated table"
    assert readme_tables.render(text, relative_to=document.parent) == text, (
        f"{document}: run python3 benchmarks/readme_tables.py"
    )


def test_a_hand_edited_figure_is_caught(tmp_path):
    text = (ROOT / "README.md").read_text()
    edited = text.replace("| 16 | 1,656 |", "| 16 | 1,984 |", 1)
    assert edited != text
    assert readme_tables.render(edited) == text
    check = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), "--check"], cwd=ROOT)
    assert check.returncode == 0


def test_the_served_rate_is_tritons_count_of_the_window():
    """246 / 1,089 / 1,656 img/s: the images of Triton's batch histogram over the 15 s window, not the requests the
    clients counted from the warm-up on."""
    results = json.loads((readme_tables.RESULTS / "h200_serve.json").read_text())
    rows = readme_tables.served_loads(results)
    assert [round(row["served"]) for row in rows] == [246, 1089, 1656]
    assert [row["clients"] for row in rows] == [1, 4, 16]
    for row, load in zip(rows, results["loads"], strict=True):
        assert row["served"] < load["requests"] / load["seconds"]
