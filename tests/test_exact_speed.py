"""benchmarks/exact_speed.py without a GPU: its arguments (defaults, lists, one-line mistakes) and the one line
it stops with where torch sees no GPU. Nothing is timed here (timings belong to benchmarks/)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

exact_speed = pytest.importorskip("exact_speed")


def test_defaults_are_the_two_exact_targets_and_every_variant(tmp_path):
    args = exact_speed.parse_args(["--out", str(tmp_path / "r.json")])
    assert args.out == tmp_path / "r.json"
    assert args.workloads == ("256-16k", "512-32k")
    assert args.variants == ("cudnn-nhwc-plain", "cudnn-nchw-fused", "triton-tf32x3", "triton-ieee")
    assert args.reps == 50
    # Every default workload has both exact targets in the GPU table's list.
    for key in args.workloads:
        assert {"latency_ms", "img_per_s"} <= {metric for (w, metric) in exact_speed.TARGETS if w == key}


def test_lists_and_counts_are_parsed():
    args = exact_speed.parse_args(
        ["--out", "x.json", "--workloads", "512-32k, 256-16k", "--variants", "triton-ieee", "--reps", "3"]
    )
    assert args.workloads == ("512-32k", "256-16k") and args.variants == ("triton-ieee",) and args.reps == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: --out"),
        (["--out", "x", "--variants", "cudnn,triton-ieee"], "unknown variant ['cudnn']"),
        (["--out", "x", "--workloads", "1024-1k"], "unknown workload ['1024-1k']"),
        (["--out", "x", "--workloads", ","], "unknown workload ','"),
        (["--out", "x", "--reps", "0"], "must be a positive whole number, got '0'"),
        (["--out", "x", "--reps", "-2"], "must be a positive whole number, got '-2'"),
    ],
)
def test_mistakes_are_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        exact_speed.parse_args(argv)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_stops_with_one_line(tmp_path):
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "exact_speed.py"), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: exact_speed.py times CUDA graphs and needs a CUDA GPU; torch sees none here\n"
    assert not out.exists()
