"""The Triton client as a user meets it, against a real tritonserver on 127.0.0.1: a bare HOST:PORT is gRPC.

The model is anomalib 2.6.2's golden checkpoint on CPU instances. Every wait is bounded in time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line, run_cli
from golden import FIXTURES, checkpoint

from patchcore_trt.images import collect_images, load_image
from patchcore_trt.runtime import is_url, open_backend
from patchcore_trt.runtime.triton_backend import parse_url
from patchcore_trt.serve.server import TritonServer, free_ports

MODEL = "patchcore"
FIELDS = ("pred_score", "pred_label", "anomaly_map", "pred_mask")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("repo")
    written = run_cli("triton", checkpoint("2.6.2"), "-o", repository, "--kind", "cpu", "--max-batch", 4)
    assert written.returncode == 0, written.stderr
    return repository


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    triton = TritonServer(repository, free_ports(), log_file=tmp_path_factory.mktemp("log") / "triton.log")
    with triton:
        triton.start(timeout_s=240)
        yield triton


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    paths, _ = collect_images([str(FIXTURES / "data" / "test")])
    return np.stack([np.rint(load_image(path).transpose(1, 2, 0) * 255).astype(np.uint8) for path in paths])


@pytest.fixture(scope="module")
def local(frames: np.ndarray):
    return _in_process(frames)


def _in_process(frames: np.ndarray):
    with open_backend(checkpoint("2.6.2")) as backend:
        return backend.predict(frames)


def _same(one, other) -> bool:
    return all(np.array_equal(getattr(one, field), getattr(other, field)) for field in FIELDS)


def test_a_bare_address_is_grpc(tmp_path):
    assert parse_url("example.org:9001").url == "grpc://example.org:9001"
    assert parse_url("example.org").url == "grpc://example.org:8001"  # Triton's gRPC port
    assert parse_url("http://example.org").url == "http://example.org:8000"
    assert is_url("127.0.0.1:8001") and is_url("[::1]:8001") and not is_url("model.onnx")
    named = tmp_path / "host:8001"
    named.write_bytes(b"")
    assert not is_url(str(named)) and not is_url(Path("host:8001"))  # a file, or a Path, is never a server


def test_bare_address_clients_score_as_in_process_predict(server, frames, local, dataset_folder, tmp_path):
    with open_backend(server.grpc_url, model=MODEL) as remote:
        assert remote.endpoint.protocol == "grpc"
        assert _same(remote.predict(frames), local)
    served = run_cli("predict", "--server", server.grpc_url, dataset_folder, "--json", tmp_path / "served.json")
    at_home = run_cli("predict", checkpoint("2.6.2"), dataset_folder, "--json", tmp_path / "local.json")
    assert served.returncode == 0 and at_home.returncode == 0, served.stderr + at_home.stderr
    rows = [json.loads((tmp_path / name).read_text())["results"] for name in ("served.json", "local.json")]
    assert [row["score"] for row in rows[0]] == [row["score"] for row in rows[1]]
    assert json.loads((tmp_path / "served.json").read_text())["model"]["server"] == f"grpc://{server.grpc_url}"
    # The HTTP port given bare is the user's likeliest slip: the line says how to name it.
    line = error_line(run_cli("predict", "--server", server.http_url, dataset_folder))
    assert line.startswith(f"error: cannot reach a Triton server at grpc://{server.http_url} (")
    assert line.endswith("is it running? (gRPC: Triton's HTTP port needs http://HOST:PORT)")


@pytest.fixture(scope="module")
def dataset_folder() -> Path:
    return FIXTURES / "data" / "test"
