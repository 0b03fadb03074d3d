"""``predict --server`` keeps its results when the server goes away mid-run: the images scored so far keep their
rows, the rest become error rows (one line each, no traceback), the files are whole, nothing hidden is left.

A real Triton server on 127.0.0.1 serves the checkpoint on CPU instances; it is killed (SIGKILL, as the OOM killer
would) once a few requests were answered, while the client talks gRPC (a bare HOST:PORT), with its tensors in the
requests or in shared memory. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

from patchcore_trt.serve.server import TritonServer, free_ports

MODEL = "line"
IMAGES = 24


@pytest.fixture()
def served(resnet18_checkpoint: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    written = run_cli("triton", resnet18_checkpoint, "-o", repo, "--kind", "cpu", "--name", MODEL, "--max-batch", 1)
    assert written.returncode == 0, written.stderr
    server = TritonServer(repo, free_ports(), log_file=tmp_path / "triton.log")
    with server:
        server.start(timeout_s=240)
        yield server


@pytest.mark.parametrize("shm", ["none", "system"])
def test_predict_keeps_every_result_when_the_server_dies_mid_run(served, dataset, tmp_path, shm):
    folder = tmp_path / "in"
    folder.mkdir()
    source = next(dataset.test_good.glob("*.png"))
    for number in range(IMAGES):
        shutil.copy(source, folder / f"part_{number:02d}.png")
    outputs = tmp_path / "out"
    outputs.mkdir()
    command = [
        sys.executable, "-m", "patchcore_trt", "predict", "--server", served.grpc_url, "--model", MODEL, "--shm", shm,
        "--batch-size", "1", "--timeout", "20", str(folder),
        "--json", str(outputs / "r.json"), "--csv", str(outputs / "r.csv"),
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if int(served.statistics(MODEL)["inference_count"]) >= 3:
            break
        time.sleep(0.05)
    os.killpg(served.process.pid, signal.SIGKILL)  # the server and its model processes, at once
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 1 and "Traceback" not in stderr, stderr
    rows = json.loads((outputs / "r.json").read_text())["results"]
    assert [row["file"] for row in rows] == [f"part_{number:02d}.png" for number in range(IMAGES)]
    scored = [row for row in rows if row["status"] == "ok"]
    failed = [row for row in rows if row["status"] == "error"]
    assert len(scored) >= 3 and len(failed) >= 1 and len(scored) + len(failed) == IMAGES
    assert rows[: len(scored)] == scored  # the scored ones are the first, in order
    # Three batches fail on their own (the server's or the transport's words), then the rest are not even tried.
    assert all(f"model '{MODEL}': inference: " in row["error"] for row in failed[:3])
    assert all(row["error"].startswith("not run: 3 batches in a row failed") for row in failed[3:])
    assert (outputs / "r.csv").read_text().count("\n") == IMAGES + 1
    assert sorted(path.name for path in outputs.iterdir()) == ["r.csv", "r.json"]  # no hidden .part left
    assert f"{len(scored)} scored" in stdout and f"{len(failed)} failed" in stdout
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(f"pctclient{process.pid}_")]
