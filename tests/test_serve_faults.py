"""``serve`` under faults, on a real tritonserver on 127.0.0.1 (the nvidia-pytriton build, CPU Python models).

A model process killed as the OOM killer would, serve itself ended by SIGHUP, SIGTERM or SIGKILL, a double Ctrl-C,
a restart on the same ports, damaged and leftover folders, a repository with no loadable model, and requests over
the pixel budget: each checks what the user sees (the line, the exit code), the processes left behind, and that
the other models keep serving unchanged results. The model is anomalib 2.6.2's own golden checkpoint. Every wait
is bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line, run_cli
from golden import FIXTURES, checkpoint

from patchcore_trt.compare import PARITY_BAR
from patchcore_trt.images import collect_images, load_image
from patchcore_trt.runtime import open_backend
from patchcore_trt.serve.batching import runs_within
from patchcore_trt.serve.health import stub_processes
from patchcore_trt.serve.repository import parse_config
from patchcore_trt.serve.server import free_ports, port_free

MAX_PIXELS = 512 * 512
MAX_REQUEST_PIXELS = 2 * MAX_PIXELS
START_TIMEOUT_S = 240
READY_LINE = "Ctrl-C stops the server."


def _write(model: Path, repository: Path, name: str, *extra: object) -> None:
    written = run_cli(
        "triton", model, "-o", repository, "--name", name, "--kind", "cpu", "--max-batch", 4,
        "--max-pixels", MAX_PIXELS, "--max-request-pixels", MAX_REQUEST_PIXELS, *extra,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr


@pytest.fixture(scope="module")
def undecidable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2.0-2.2 file whose memory bank fits both 2.0's and 2.2's default resolution: only the user can tell."""
    import torch

    raw = torch.load(checkpoint("2.0.0-default"), map_location="cpu", weights_only=True)
    raw["state_dict"]["model.memory_bank"] = torch.rand(50176, 384, generator=torch.Generator().manual_seed(0))
    raw["hyper_parameters"]["coreset_sampling_ratio"] = 1.0
    path = tmp_path_factory.mktemp("undecidable") / "both.ckpt"
    torch.save(raw, path)
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of one model, for the tests that start and end servers of their own."""
    repository = tmp_path_factory.mktemp("single")
    _write(checkpoint("2.6.2"), repository, "patchcore")
    return repository


@pytest.fixture(scope="module")
def repository(single: Path, undecidable: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two copies of the golden model, the undecidable file served with --anomalib-version 2.2.0, a model folder
    whose config is damaged, and a staging folder a crashed 'triton' left behind."""
    repository = tmp_path_factory.mktemp("repo")
    shutil.copytree(single / "patchcore", repository / "patchcore")
    _write(checkpoint("2.6.2"), repository, "other")
    _write(undecidable, repository, "both", "--anomalib-version", "2.2.0")
    shutil.copytree(single / "patchcore", repository / "damaged")
    (repository / "damaged" / "config.pbtxt").write_text("name: 'damaged' max_batch_size: [")
    shutil.copytree(single / "patchcore", repository / ".patchcore.x1y2.part")
    return repository


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    paths, _ = collect_images([str(FIXTURES / "data" / "test")])
    return np.stack([np.rint(load_image(path).transpose(1, 2, 0) * 255).astype(np.uint8) for path in paths])


def _local_scores(model: Path, frames: np.ndarray, **options: str) -> np.ndarray:
    """In-process scores of the CPU reference, on the pixels exactly as the served model converts them."""
    floats = np.ascontiguousarray(frames.transpose(0, 3, 1, 2)).astype(np.float32) / 255.0
    return open_backend(model, **options).predict(floats).pred_score


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended: only its exit status is left)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def _shared_memory(serving: Serving) -> list[Path]:
    """The Python backend's shared memory regions of that server (named after serve's pid and HTTP port)."""
    return sorted(Path("/dev/shm").glob(f"pct{serving.process.pid}p{serving.ports[0]}_*"))


def _wait_until(condition, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


@dataclass
class Serving:
    """One ``patchcore-trt serve`` process, its output read line by line as it comes."""

    process: subprocess.Popen[str]
    ports: tuple[int, ...]
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, target: Path, ports: tuple[int, ...] | None = None) -> Serving:
        ports = ports or free_ports()
        options = ["--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]
        command = [sys.executable, "-m", "patchcore_trt", "serve", str(target), *map(str, options)]
        env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        serving = cls(process, ports)
        for stream, sink in ((process.stdout, serving.out), (process.stderr, serving.err)):
            reader = threading.Thread(target=lambda s=stream, k=sink: k.extend(x.rstrip("\n") for x in s), daemon=True)
            reader.start()
        _wait_until(lambda: READY_LINE in serving.out or process.poll() is not None, START_TIMEOUT_S, 0.2)
        return serving

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"

    @property
    def server_pid(self) -> int:
        line = next(line for line in self.err if "tritonserver pid" in line)
        return int(line.split()[2].rstrip(","))

    def stubs(self, model: str | None = None) -> set[int]:
        found = stub_processes(self.server_pid, self.process_repository())
        return found.get(model, set()) if model else set().union(*found.values())

    def process_repository(self) -> Path:
        line = next(line for line in self.err if line.startswith("> starting"))
        return Path(line.rsplit(" on ", 1)[1].removesuffix(" ...")).resolve()

    def finish(self, timeout_s: float = 60) -> str:
        """Wait for serve to exit; its stderr (the reader threads get the last lines first)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout_s)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        time.sleep(0.5)
        return "\n".join(self.err)


def _infer(url: str, model: str, batch: np.ndarray) -> tuple[np.ndarray | None, str]:
    """(scores, '') or (None, the error) for one request, as any Triton client could send it."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url, network_timeout=120)
    try:
        image = httpclient.InferInput("image", list(batch.shape), "UINT8")
        image.set_data_from_numpy(batch)
        return client.infer(model, [image]).as_numpy("pred_score").reshape(-1), ""
    except httpclient.InferenceServerException as exc:
        return None, f"[{exc.status()}] {exc.message()}"
    finally:
        client.close()


def _model_ready(url: str, model: str) -> bool:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    try:
        return bool(client.is_model_ready(model))
    except Exception:  # refused or reset while the server changes state: not ready
        return False
    finally:
        client.close()


@pytest.fixture(scope="module")
def serving(repository: Path):
    serving = Serving.start(repository)
    assert READY_LINE in serving.out, f"{serving.out} {serving.err}"
    yield serving
    serving.process.send_signal(signal.SIGINT)
    serving.finish()
    assert serving.process.returncode == 0
    assert _shared_memory(serving) == []  # not even the region of the model process killed below


def test_damaged_and_leftover_folders_leave_the_other_models_served(serving, frames):
    assert "model patchcore (version 1): READY" in serving.out and "model other (version 1): READY" in serving.out
    stderr = "\n".join(serving.err)
    (damaged,) = [line for line in serving.err if "damaged" in line]
    assert damaged.startswith("warning: model damaged: not loaded:") and "not a valid Triton model config" in damaged
    assert ".patchcore.x1y2.part" not in stderr + "\n".join(serving.out)  # a staging folder is no model
    assert "UNKNOWN" not in stderr
    scores, error = _infer(serving.url, "patchcore", frames[:2])
    assert error == ""
    assert np.abs(scores - _local_scores(checkpoint("2.6.2"), frames[:2])).max() <= PARITY_BAR.score


def test_a_file_that_needs_its_release_is_served_with_anomalib_version(serving, undecidable, tmp_path, frames):
    line = error_line(run_cli("triton", undecidable, "-o", tmp_path / "repo", "--kind", "cpu"))
    assert "pass --anomalib-version" in line
    config = parse_config(serving.process_repository() / "both" / "config.pbtxt")
    assert config.parameters["anomalib_version"].string_value == "2.2.0"
    assert list(config.output[2].dims) == [1, 256, 256]  # 2.2's default resolution, not 2.0's 224
    assert "model both (version 1): READY" in serving.out  # the model process read it with the release too
    scores, error = _infer(serving.url, "both", frames[:1])
    assert error == ""
    local = _local_scores(undecidable, frames[:1], anomalib_version="2.2.0")
    assert np.abs(scores - local).max() <= PARITY_BAR.score
    wrong = error_line(run_cli("triton", checkpoint("2.0.0-default"), "-o", tmp_path, "--anomalib-version", "2.1.0"))
    assert "fits only anomalib 2.0.x" in wrong


def test_a_request_over_the_pixel_budget_is_refused_with_the_limit(serving):
    big = np.zeros((3, 512, 512, 3), np.uint8)  # each image within --max-pixels; the three together over budget
    scores, error = _infer(serving.url, "other", big)
    assert scores is None and error.startswith("[400] other: a request of 3 images of 512x512 = 786,432 pixels")
    assert f"limit of {MAX_REQUEST_PIXELS:,} per request" in error
    scores, error = _infer(serving.url, "other", big[:2])  # at the budget: served
    assert error == "" and scores.shape == (2,)


def test_a_merged_call_is_run_in_runs_within_the_request_budget():
    items = [np.zeros((count, 10, 10, 3), np.uint8) for count in (2, 1, 1, 3, 2, 5)]
    runs = runs_within(items, 300, lambda images: images[..., 0].size)
    assert [[len(images) for images in run] for run in runs] == [[2, 1], [1], [3], [2], [5]]
    assert [images for run in runs for images in run] == items  # every request once, in order


def test_requests_merged_past_the_budget_are_answered_as_each_alone(serving):
    """Three clients at the budget at once: Triton merges two of them (twice the budget) into one call; the model
    runs that call within the budget, and every answer is the one the request gets alone."""
    batches = [np.random.default_rng(seed).integers(0, 256, (2, 512, 512, 3), dtype=np.uint8) for seed in range(3)]
    before = _statistics(serving.url, "other")
    answers: list = [None] * 3
    threads = [
        threading.Thread(target=lambda i=i: answers.__setitem__(i, _infer(serving.url, "other", batches[i])))
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=START_TIMEOUT_S)
    after = _statistics(serving.url, "other")
    merged = {int(item["batch_size"]): int(item["compute_infer"]["count"]) for item in after["batch_stats"]}
    earlier = {int(item["batch_size"]): int(item["compute_infer"]["count"]) for item in before["batch_stats"]}
    assert merged.get(4, 0) > earlier.get(4, 0), (earlier, merged)  # a call held 4 images: twice the budget
    for batch, (scores, error) in zip(batches, answers, strict=True):
        alone, alone_error = _infer(serving.url, "other", batch)
        assert error == alone_error == "" and np.array_equal(scores, alone)


def _statistics(url: str, model: str) -> dict:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    try:
        return client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()


def test_no_client_can_unload_or_load_a_model_for_the_others(serving):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    http = httpclient.InferenceServerClient(serving.url)
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{serving.ports[1]}")
    try:
        for call in (http.unload_model, http.load_model, grpc.unload_model, grpc.load_model):
            with pytest.raises((httpclient.InferenceServerException, grpcclient.InferenceServerException)) as info:
                call("other")
            assert "restricted" in str(info.value), str(info.value)
    finally:
        http.close()
        grpc.close()
    assert _model_ready(serving.url, "other")


def test_a_killed_model_process_turns_unready_and_is_reloaded_while_the_others_serve(serving, frames):
    frames = frames[:4]  # one request of at most --max-batch images
    before = {model: _infer(serving.url, model, frames)[0] for model in ("patchcore", "other")}
    assert all(scores is not None for scores in before.values())
    (stub,) = serving.stubs("patchcore")
    others = serving.stubs() - {stub}
    served: list[tuple[np.ndarray | None, str]] = []
    stop = threading.Event()

    def other_client() -> None:  # another client of another model, all along
        while not stop.is_set() and len(served) < 200:
            served.append(_infer(serving.url, "other", frames))

    client = threading.Thread(target=other_client)
    client.start()
    try:
        os.kill(stub, signal.SIGKILL)
        assert _wait_until(lambda: not _model_ready(serving.url, "patchcore"), 5), "still ready with its process dead"
        assert _wait_until(lambda: _model_ready(serving.url, "patchcore"), 120), "\n".join(serving.err)
    finally:
        stop.set()
        client.join(timeout=120)
    scores, error = _infer(serving.url, "patchcore", frames)
    assert error == "" and np.array_equal(scores, before["patchcore"])
    (line,) = [line for line in serving.err if "ended" in line]
    assert line.startswith(f"model patchcore: its Python process (pid {stub}) ended; reloaded, READY again in")
    assert serving.stubs("patchcore") - {stub} and not _running(stub)
    assert others <= serving.stubs()  # the other models' processes were left alone
    assert served and all(error == "" and np.array_equal(scores, before["other"]) for scores, error in served)
    assert serving.process.poll() is None


def test_a_model_that_cannot_come_back_ends_serve_with_one_line(single, tmp_path):
    shutil.copytree(single / "patchcore", tmp_path / "patchcore")
    serving = Serving.start(tmp_path)
    assert READY_LINE in serving.out, serving.err
    server, (stub,) = serving.server_pid, serving.stubs("patchcore")
    (tmp_path / "patchcore" / "1" / "model.ckpt").write_bytes(b"this is not a checkpoint")  # as a disk gone bad
    os.kill(stub, signal.SIGKILL)
    stderr = serving.finish(timeout_s=120)
    assert serving.process.returncode == 1 and "Traceback" not in stderr, stderr
    (line,) = [line for line in serving.err if line.startswith("error:")]
    assert line.startswith(
        f"error: model patchcore: its Python process (pid {stub}) ended; reloading failed: "
        "model patchcore (version 1): UNAVAILABLE"
    )
    assert "not a PyTorch checkpoint" in line
    assert line.endswith(f"no model of {tmp_path.resolve()} is ready any more")
    assert "no process left" in stderr and not _running(server)


@pytest.mark.parametrize("number", [signal.SIGHUP, signal.SIGTERM])
def test_serve_stopped_by_a_signal_leaves_no_process(single, number):
    serving = Serving.start(single)
    assert READY_LINE in serving.out, serving.err
    server, stubs = serving.server_pid, serving.stubs()
    assert stubs and _running(server)
    serving.process.send_signal(number)
    stderr = serving.finish()
    assert serving.process.returncode == 0, stderr
    assert "no process left" in stderr
    assert not _running(server) and not any(_running(pid) for pid in stubs)
    assert _shared_memory(serving) == []


def test_serve_killed_leaves_no_process_and_restarts_on_the_same_ports(single):
    import tritonclient.http as httpclient

    first = Serving.start(single)
    assert READY_LINE in first.out, first.err
    server, stubs = first.server_pid, first.stubs()
    client = httpclient.InferenceServerClient(first.url)  # a client holding its connection while serve dies
    assert client.is_server_live()
    first.process.kill()
    first.finish()
    gone = _wait_until(lambda: not _running(server) and not any(_running(pid) for pid in stubs), 30, 0.2)
    client.close()
    assert gone, "tritonserver or its model process outlived serve"
    log = Path(next(line.split()[1] for line in first.out if line.startswith("log")))
    shutil.rmtree(log.parent)  # the killed serve could not remove its work folder (the stub's venv, the log)
    second = Serving.start(single, first.ports)  # at once, on the very same ports
    try:
        assert READY_LINE in second.out, second.err
        assert _model_ready(second.url, "patchcore")
        # A client that names no model finds the one served, although the repository index is serve's own.
        for protocol, port in (("http", second.ports[0]), ("grpc", second.ports[1])):
            served = run_cli("predict", "--server", f"{protocol}://127.0.0.1:{port}", FIXTURES / "data" / "test")
            assert served.returncode == 0, served.stderr
    finally:
        # A double Ctrl-C: serve still waits for Triton to stop and says so truthfully.
        second.process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        second.process.send_signal(signal.SIGINT)
        stderr = second.finish()
    assert second.process.returncode == 0, stderr
    assert "still stopping tritonserver" in stderr and "no process left" in stderr and "Traceback" not in stderr
    assert not _running(second.server_pid)


def test_port_check_matches_the_servers_reuse_of_closing_ports():
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tritonserver binds
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    assert not port_free("127.0.0.1", port)  # a server listens: in use
    peer = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    listener.close()
    accepted.close()  # the server side closes first: its port is in TIME_WAIT, as after a stop under load
    time.sleep(0.1)
    try:
        assert port_free("127.0.0.1", port)
    finally:
        peer.close()


def test_serve_fails_when_no_model_can_be_ready(single, tmp_path):
    shutil.copytree(single / "patchcore", tmp_path / "patchcore")
    (tmp_path / "patchcore" / "1" / "model.ckpt").write_bytes(b"this is not a checkpoint")
    serving = Serving.start(tmp_path)
    stderr = serving.finish()
    assert serving.process.returncode == 1 and READY_LINE not in serving.out
    assert f"error: no model of {tmp_path.resolve()} is ready" in stderr and "Traceback" not in stderr
    assert "no process left" in stderr and not _running(serving.server_pid)
    (tmp_path / "patchcore" / "config.pbtxt").write_text("garbage {")
    line = error_line(run_cli("serve", tmp_path, "--http-port", free_ports()[0]))
    assert line == f"error: {tmp_path}: no model of it can be loaded (see the warnings above)"


def test_triton_defaults_to_what_this_machine_runs(single, tmp_path):
    import torch

    written = run_cli("triton", checkpoint("2.6.2"), "-o", tmp_path)
    assert written.returncode == 0, written.stderr
    (group,) = parse_config(tmp_path / "patchcore" / "config.pbtxt").instance_group
    assert group.kind == (group.KIND_GPU if torch.cuda.is_available() else group.KIND_CPU)
    line = error_line(run_cli("serve", single, "--anomalib-version", "2.2.0"))
    assert "--anomalib-version applies to a .ckpt file" in line
