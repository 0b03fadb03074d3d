"""The Triton client as a same-machine user meets it, against a real tritonserver on 127.0.0.1: a bare HOST:PORT is
gRPC, ``--shm system`` moves every tensor through /dev/shm and leaves nothing behind, whether the client closes,
is stopped by Ctrl-C, or its server restarts under it, and the default batcher executes a lone request as it comes
while it still merges requests that queue together (shown by Triton's own counts, never by timings).

The model is anomalib 2.6.2's golden checkpoint on CPU instances. Every wait is bounded in time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line, run_cli
from golden import FIXTURES, checkpoint

from patchcore_trt.errors import UserError
from patchcore_trt.images import collect_images, load_image
from patchcore_trt.runtime import is_url, open_backend
from patchcore_trt.runtime.triton_backend import parse_url
from patchcore_trt.runtime.triton_shm import layout, prefix
from patchcore_trt.serve.repository import parse_config
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


def _ours(pid: int | None = None) -> list[str]:
    """The shared memory segments a client process (this one by default) left in /dev/shm."""
    start = f"pctclient{pid}_" if pid else prefix()
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(start))


def _registered(server: TritonServer) -> list[str]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        return sorted(item["name"] for item in client.get_system_shared_memory_status())
    finally:
        client.close()


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


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_shared_memory_results_equal_the_wire_and_in_process(server, frames, local, protocol):
    url = server.grpc_url if protocol == "grpc" else f"http://{server.http_url}"
    with open_backend(url, model=MODEL, concurrency=3) as wire:
        sent = wire.predict(frames)
    with open_backend(url, model=MODEL, concurrency=3, shm="system") as shared:
        small = shared.predict(frames[:1])  # a region sized for one image ...
        names = _ours()
        assert len(names) == 1 and _registered(server) == names  # one request: one slot
        whole = shared.predict(frames)  # ... then grown for a share of eight, in three slots
        again = shared.predict(frames)  # and reused
        assert len(_ours()) == 3 and _registered(server) == _ours()
        bigger = np.ascontiguousarray(np.concatenate([frames[:1], frames[:1]], axis=1))  # twice the rows
        tall = shared.predict(bigger)
    assert _ours() == [] and _registered(server) == []
    assert _same(sent, local) and _same(whole, local) and _same(again, local) and _same(small, _in_process(frames[:1]))
    with open_backend(url, model=MODEL) as wire:
        assert _same(tall, wire.predict(bigger))


def _ctrl_c_predict(server: TritonServer, folder: Path, output: Path) -> subprocess.Popen[str]:
    command = [
        sys.executable, "-m", "patchcore_trt", "predict", "--server", server.grpc_url, "--shm", "system",
        "--concurrency", "2", "--batch-size", "2", str(folder), "--json", str(output),
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal starts it
    )  # fmt: skip


def test_ctrl_c_in_predict_with_shared_memory_leaves_no_region(server, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    source = next((FIXTURES / "data" / "test" / "good").glob("*.png"))
    for number in range(400):  # far more than are scored before the Ctrl-C
        shutil.copy(source, folder / f"part_{number:03d}.png")
    before = int(server.statistics(MODEL)["inference_count"])
    process = _ctrl_c_predict(server, folder, tmp_path / "r.json")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if int(server.statistics(MODEL)["inference_count"]) >= before + 6:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert "interrupted: stopped by Ctrl-C" in stderr and "scored" in stdout
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert len(rows) < 400 and all(row["status"] == "ok" for row in rows)
    assert _ours(process.pid) == [] and _registered(server) == []


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_server_restart_mid_run_is_recovered_or_one_line_and_leaves_nothing(repository, frames, tmp_path, protocol):
    ports = free_ports()
    first = TritonServer(repository, ports, log_file=tmp_path / "first.log")
    with first:
        first.start(timeout_s=240)
        url = f"127.0.0.1:{ports[1]}" if protocol == "grpc" else f"http://127.0.0.1:{ports[0]}"
        shared = open_backend(url, model=MODEL, shm="system", timeout_s=30)
        try:
            assert _same(shared.predict(frames[:2]), _in_process(frames[:2]))
            first.stop()
            second = TritonServer(repository, ports, log_file=tmp_path / "second.log")
            with second:
                second.start(timeout_s=240)
                assert _registered(second) == []  # the new server knows none of the regions
                try:
                    outcome = shared.predict(frames[:2])
                except UserError as exc:
                    outcome = str(exc)
                if isinstance(outcome, str):
                    assert "\n" not in outcome and f"model '{MODEL}'" in outcome
                else:
                    assert _same(outcome, _in_process(frames[:2])) and _registered(second) == _ours()
                shared.close()
                assert _ours() == [] and _registered(second) == []
        finally:
            shared.close()


def _counts(server: TritonServer) -> tuple[int, int, dict[int, int]]:
    """Triton's own counts of the model: images inferred, executions, and executions per batch size."""
    stats = server.statistics(MODEL)
    sizes = {int(item["batch_size"]): int(item["compute_infer"]["count"]) for item in stats["batch_stats"]}
    return int(stats["inference_count"]), int(stats["execution_count"]), sizes


def _since(server: TritonServer, before: tuple[int, int, dict[int, int]], images: int):
    """The counts' growth since ``before``, once ``images`` inferences are in: Triton counts a request when it
    releases it, which may come just after the client has its answer."""
    deadline = time.monotonic() + 10
    while (after := _counts(server))[0] - before[0] < images and time.monotonic() < deadline:
        time.sleep(0.05)
    sizes = {size: count - before[2].get(size, 0) for size, count in after[2].items()}
    return after[0] - before[0], after[1] - before[1], {size: count for size, count in sizes.items() if count}


def test_a_lone_request_runs_alone_and_concurrent_ones_are_still_batched(server, repository, frames):
    batching = parse_config(repository / MODEL / "config.pbtxt").dynamic_batching
    # No delay to wait out and no preferred size to wait for: a request alone in the queue is executed as it comes.
    assert batching.max_queue_delay_microseconds == 0 and list(batching.preferred_batch_size) == []
    before = _counts(server)
    with open_backend(server.grpc_url, model=MODEL) as remote:
        for index in range(4):
            remote.predict(frames[index : index + 1])
    assert _since(server, before, 4) == (4, 4, {1: 4})  # each request its own execution, never held back
    before = _counts(server)
    failures: list[BaseException] = []

    def client(number: int) -> None:
        try:
            with open_backend(server.grpc_url, model=MODEL, timeout_s=60) as remote:
                for index in range(3):
                    remote.predict(frames[(number + index) % len(frames)][None])
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures and not any(thread.is_alive() for thread in threads)
    inferences, executions, sizes = _since(server, before, 18)
    # Requests that queued while the instance was busy ran together: fewer executions than images.
    assert inferences == 18 and executions < inferences, sizes
    assert sum(count for size, count in sizes.items() if size > 1) > 0 and sum(s * c for s, c in sizes.items()) == 18


@pytest.mark.parametrize("shm", ["none", "system"])
def test_without_maps_only_scores_and_labels_cross_and_they_are_the_same(server, frames, local, shm):
    with open_backend(server.grpc_url, model=MODEL, maps=False, shm=shm) as remote:
        scores = remote.predict(frames)
        if shm == "system":  # the one region holds a request's images and two outputs: no room was made for maps
            (region,) = remote.regions.regions.values()
            n = remote.max_batch  # the batch went out as requests of this many images
            assert region.size == layout([frames[:n].nbytes, 4 * n, n])[1]
    assert not scores.has_maps and scores.anomaly_map is None and scores.pred_mask is None
    assert np.array_equal(scores.pred_score, local.pred_score) and np.array_equal(scores.pred_label, local.pred_label)
    assert scores[2:4].pred_score.tolist() == local.pred_score[2:4].tolist() and not scores[0].has_maps


def test_predict_asks_for_maps_only_where_a_sink_needs_them(server, dataset_folder, tmp_path):
    at_home = run_cli("predict", checkpoint("2.6.2"), dataset_folder, "--json", tmp_path / "local.json")
    plain = run_cli("predict", "--server", server.grpc_url, dataset_folder, "--json", tmp_path / "plain.json")
    drawn = run_cli(
        "predict", "--server", server.grpc_url, dataset_folder, "--json", tmp_path / "drawn.json",
        "--report", tmp_path / "report.html",
    )  # fmt: skip
    asked = run_cli("predict", "--server", server.grpc_url, "--maps", dataset_folder, "--json", tmp_path / "asked.json")
    assert all(result.returncode == 0 for result in (at_home, plain, drawn, asked)), plain.stderr + drawn.stderr
    names = ("local", "plain", "drawn", "asked")
    rows = {name: json.loads((tmp_path / f"{name}.json").read_text())["results"] for name in names}
    for name in ("plain", "drawn", "asked"):
        assert [row["score"] for row in rows[name]] == [row["score"] for row in rows["local"]]
        assert [row["label"] for row in rows[name]] == [row["label"] for row in rows["local"]]
    assert all(row["map_max"] is None and row["mask_fraction"] is None for row in rows["plain"])
    for name in ("drawn", "asked"):  # the maps came: their figures are in-process predict's
        assert [row["map_max"] for row in rows[name]] == [row["map_max"] for row in rows["local"]]
        assert [row["mask_fraction"] for row in rows[name]] == [row["mask_fraction"] for row in rows["local"]]
    assert "--shm and --maps apply to --server" in error_line(
        run_cli("predict", checkpoint("2.6.2"), dataset_folder, "--maps")
    )
