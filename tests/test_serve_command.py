"""``patchcore-trt serve`` as a service manager runs it: a model file (not a repository), its host, port, timeout and
log options, and SIGTERM. A real Triton Inference Server (.ci/serve-env) on 127.0.0.1, bounded in time."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import error_line, run_cli, started_cli

from patchcore_trt.compare import PARITY_BAR, compare
from patchcore_trt.images import collect_images, load_image
from patchcore_trt.runtime import open_backend
from patchcore_trt.runtime.triton_backend import TritonBackend
from patchcore_trt.serve.server import free_ports

LOAD_TIMEOUT_S = 240


def test_serve_a_model_file_with_its_options_and_stop_it_with_sigterm(resnet18_checkpoint, dataset, tmp_path):
    http, grpc, metrics = free_ports()
    log = tmp_path / "triton.log"
    process, lines, errors = started_cli(
        "serve", resnet18_checkpoint, "--kind", "cpu", "--host", "127.0.0.1", "--http-port", http,
        "--grpc-port", grpc, "--metrics-port", metrics, "--timeout", LOAD_TIMEOUT_S, "--log-file", log,
    )  # fmt: skip
    deadline = time.monotonic() + LOAD_TIMEOUT_S + 30
    while "Ctrl-C stops the server." not in lines and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    paths, _ = collect_images([str(dataset.root / "test")])
    image = load_image(paths[0])[None]
    try:
        assert "Ctrl-C stops the server." in lines, f"{lines} {errors} {process.poll()}"
        # The model file was served under the repository name the triton command gives it, on the ports asked.
        assert "model patchcore (version 1): READY" in lines
        assert any(line.startswith(f"HTTP    http://127.0.0.1:{http} ") for line in lines), lines
        assert f"gRPC    grpc://127.0.0.1:{grpc}" in lines
        with TritonBackend(f"http://127.0.0.1:{http}", model="patchcore") as remote:
            served = remote.predict(image)
        with open_backend(resnet18_checkpoint, "torch") as local:
            figures = compare(served, local.predict(image), threshold=local.image_threshold)
        assert figures.within(PARITY_BAR), figures
    finally:
        process.send_signal(signal.SIGTERM)  # as systemd or Kubernetes stop a service
        process.wait(timeout=60)
    time.sleep(0.5)  # the reader threads take the last lines
    stderr = "\n".join(errors)
    assert process.returncode == 0, stderr
    assert "no process left" in stderr and "Traceback" not in stderr
    assert log.stat().st_size > 0  # Triton's own log went where --log-file said
    pid = int(next(line.split()[2] for line in stderr.splitlines() if "tritonserver pid" in line).rstrip(","))
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of the server's process group (server, stubs) is left


def test_serve_refuses_ports_that_collide(resnet18_checkpoint):
    line = error_line(run_cli("serve", resnet18_checkpoint, "--kind", "cpu", "--http-port", 9000, "--grpc-port", 9000))
    assert "must be distinct numbers in 1..65535" in line
