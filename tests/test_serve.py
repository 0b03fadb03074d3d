"""Serving on a real Triton Inference Server (the nvidia-pytriton build, CPU instances), as users and clients meet it.

One server runs for the module on free 127.0.0.1 ports, on a repository written by ``patchcore-trt triton``: the
real checkpoint (CPU Python model) and a model whose checkpoint is damaged. Load loops are bounded in count and
time. The tritonserver comes from .ci/serve-env (a .venv-triton beside .venv).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line, run_cli, started_cli

from patchcore_trt.artifact import ArtifactMetadata, read_onnx_metadata
from patchcore_trt.checkpoint import read_checkpoint
from patchcore_trt.compare import PARITY_BAR, compare
from patchcore_trt.images import collect_images, load_image
from patchcore_trt.runtime import Prediction, open_backend
from patchcore_trt.runtime.triton_backend import TritonBackend
from patchcore_trt.serve.repository import parse_config, read_repository
from patchcore_trt.serve.server import TritonServer, free_ports

MODEL = "patchcore"
MAX_BATCH = 4
MAX_PIXELS = 512 * 512  # small, so an oversized request stays a small test
LOAD_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def repository(resnet18_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    written = run_cli(
        "triton", resnet18_checkpoint, "-o", repo, "--kind", "cpu", "--max-batch", MAX_BATCH,
        "--queue-delay-us", 20000, "--max-pixels", MAX_PIXELS,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    # A second model whose checkpoint is damaged: it must fail to load and say why, and the first must serve.
    shutil.copytree(repo / MODEL, repo / "broken")
    config = repo / "broken" / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{MODEL}"', 'name: "broken"', 1))
    (repo / "broken" / "1" / "model.ckpt").write_bytes(b"this is not a checkpoint")
    return repo


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    triton = TritonServer(repository, free_ports(), log_file=tmp_path_factory.mktemp("log") / "triton.log")
    with triton:
        triton.start(timeout_s=LOAD_TIMEOUT_S)
        yield triton
    assert not triton.group_alive()


@pytest.fixture(scope="module")
def images(dataset) -> tuple[list[Path], np.ndarray]:
    paths, _ = collect_images([str(dataset.root / "test")])
    return paths, np.stack([load_image(path) for path in paths])


def test_the_repository_is_what_triton_reads(repository, resnet18_checkpoint):
    config = parse_config(repository / MODEL / "config.pbtxt")  # Triton's own ModelConfig protobuf
    assert config.backend == "python" and config.max_batch_size == MAX_BATCH
    assert list(config.dynamic_batching.preferred_batch_size) == []  # batches as large as the queue allows
    assert config.dynamic_batching.max_queue_delay_microseconds == 20000
    (group,) = config.instance_group
    assert group.count == 1 and group.kind == group.KIND_CPU
    (image,) = config.input
    assert image.name == "image" and list(image.dims) == [-1, -1, 3]
    spec = read_checkpoint(resnet18_checkpoint)
    outputs = {tensor.name: list(tensor.dims) for tensor in config.output}
    assert outputs["anomaly_map"] == outputs["pred_mask"] == [1, *spec.preprocess.model_size]
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert ArtifactMetadata.from_json(parameters["metadata"], MODEL).postprocess == spec.postprocess
    assert float(parameters["image_threshold"]) == spec.postprocess.normalized_image_threshold
    assert parameters["source_sha256"] == spec.source_sha256 and parameters["runtime"] == "torch"
    assert (repository / MODEL / "1" / "model.ckpt").read_bytes() == resnet18_checkpoint.read_bytes()


def test_a_gpu_repository_spreads_instances_over_the_listed_gpus(resnet18_checkpoint, tmp_path):
    written = run_cli(
        "triton", resnet18_checkpoint, "-o", tmp_path, "--kind", "gpu", "--gpus", "0,1", "--instances", 2,
        "--mode", "fast", "--max-batch", 16,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    config = parse_config(tmp_path / MODEL / "config.pbtxt")
    (group,) = config.instance_group
    assert group.kind == group.KIND_GPU and group.count == 2 and list(group.gpus) == [0, 1]
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["runtime"] == "cuda" and parameters["mode"] == "fast"
    # The instance captures a CUDA graph for every batch size up to this maximum at load (python_model.py): no
    # warm-up requests, no padding.
    assert config.max_batch_size == 16 and not config.model_warmup


def test_an_onnx_repository_keeps_the_graph_and_needs_triton_full_build(resnet18_onnx, tmp_path):
    result = run_cli("triton", resnet18_onnx, "-o", tmp_path / "repo", "--kind", "cpu", "--name", "onnx")
    assert result.returncode == 0, result.stderr
    config = read_repository(tmp_path / "repo")["onnx"]
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert [list(tensor.dims) for tensor in config.input] == [[3, -1, -1]]
    metadata = read_onnx_metadata(resnet18_onnx)
    assert ArtifactMetadata.from_json(config.parameters["metadata"].string_value, "onnx") == metadata
    assert (tmp_path / "repo" / "onnx" / "1" / "model.onnx").read_bytes() == resnet18_onnx.read_bytes()
    served = run_cli("serve", tmp_path / "repo", *_port_options())
    assert "the bundled tritonserver (nvidia-pytriton) has the Python backend only" in error_line(served)
    assert "tritonserver --model-repository=/models" in served.stdout


def test_an_engine_tensorrt_rtx_built_is_refused_with_the_way_out(resnet18_onnx, tmp_path):
    from patchcore_trt.engine import Profile, Shape, build_engine

    profile = Profile(Shape.parse("1x256x256"), Shape.parse("2x256x256"), Shape.parse("2x256x256"))
    engine = build_engine(resnet18_onnx, tmp_path / "model.fp32.engine", profile).engine
    message = error_line(run_cli("triton", engine, "-o", tmp_path / "repo"))
    assert "built by TensorRT-RTX" in message and "serve the .onnx" in message
    assert not (tmp_path / "repo" / MODEL).exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--kind", "cpu", "--gpus", "0"), "--gpus applies to --kind gpu"),
        (("--name", ".hidden"), "must be letters, digits"),
        (("--kind", "cpu", "--backbone-dtype", "fp16"), "apply to --kind gpu"),
        (("--max-batch", "0"), "--max-batch 0 must be between 1"),
    ],
)
def test_triton_command_mistakes_are_one_line(resnet18_checkpoint, tmp_path, args, fragment):
    assert fragment in error_line(run_cli("triton", resnet18_checkpoint, "-o", tmp_path, *args))


def test_triton_command_refuses_to_overwrite_and_other_files(repository, resnet18_checkpoint, tmp_path):
    assert "already exists; pass --force" in error_line(run_cli("triton", resnet18_checkpoint, "-o", repository))
    (tmp_path / "notes.txt").write_text("?")
    assert "cannot serve a .txt file" in error_line(run_cli("triton", tmp_path / "notes.txt", "-o", tmp_path))


def test_a_model_that_fails_to_load_says_why_and_the_other_serves(server):
    states = {state.name: state for state in server.models()}
    assert states[MODEL].state == "READY"
    assert states["broken"].state == "UNAVAILABLE" and "not a PyTorch checkpoint" in states["broken"].line()
    assert server.alive()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_results_equal_in_process_predict(server, resnet18_checkpoint, images, protocol):
    _, batch = images
    reference = open_backend(resnet18_checkpoint).predict(batch)
    url = f"http://{server.http_url}" if protocol == "http" else f"grpc://{server.grpc_url}"
    with TritonBackend(url, model=MODEL, concurrency=3) as remote:
        served = remote.predict(batch)
        assert remote.image_threshold == open_backend(resnet18_checkpoint).image_threshold
    parity = compare(served, reference, threshold=remote.image_threshold)
    assert parity.within(PARITY_BAR), parity
    assert (served.pred_label == reference.pred_label).all() and (served.pred_mask == reference.pred_mask).all()


def test_concurrent_clients_are_batched_by_the_server(server, resnet18_checkpoint, images):
    _, batch = images
    frames = np.rint(batch.transpose(0, 2, 3, 1) * 255).astype(np.uint8)  # the decoded 8-bit images, as sent
    local = open_backend(resnet18_checkpoint)
    reference, threshold = local.predict(batch), local.image_threshold
    before = server.statistics(MODEL)
    results: dict[tuple[int, int], Prediction] = {}
    failures: list[BaseException] = []
    deadline = time.monotonic() + 120

    def client(number: int) -> None:
        url = f"http://{server.http_url}" if number % 2 else f"grpc://{server.grpc_url}"
        try:
            with TritonBackend(url, model=MODEL, timeout_s=60) as remote:
                for index in range(number % 3, len(frames), 2):  # a bounded share of the images, one at a time
                    if time.monotonic() > deadline:
                        break
                    results[number, index] = remote.predict(frames[index : index + 1])
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(deadline - time.monotonic(), 1))
    assert not failures and not any(thread.is_alive() for thread in threads)
    assert len(results) == sum(len(range(n % 3, len(frames), 2)) for n in range(6))
    for (_, index), prediction in results.items():
        assert compare(prediction, reference[index], threshold=threshold).within(PARITY_BAR)
    # Triton counts a request a moment after its answer has gone out: wait (bounded) for the last ones.
    expected = int(before["inference_count"]) + len(results)
    settle = time.monotonic() + 10
    while int(server.statistics(MODEL)["inference_count"]) < expected and time.monotonic() < settle:
        time.sleep(0.05)
    after = server.statistics(MODEL)
    batched = {int(item["batch_size"]): int(item["compute_infer"]["count"]) for item in after["batch_stats"]}
    earlier = {int(item["batch_size"]): int(item["compute_infer"]["count"]) for item in before["batch_stats"]}
    merged = {size: count - earlier.get(size, 0) for size, count in batched.items() if size > 1}
    assert sum(merged.values()) > 0, f"no batch of more than one request formed: {batched}"
    inferences = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert inferences == len(results) and executions < inferences


def _raw_infer(server, array: np.ndarray | None, datatype: str = "UINT8") -> str:
    """One request outside our client, as any Triton client could send it; '' when it succeeds."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        inputs = []
        if array is not None:
            inputs = [httpclient.InferInput("image", list(array.shape), datatype)]
            inputs[0].set_data_from_numpy(array)
        client.infer(MODEL, inputs)
        return ""
    except httpclient.InferenceServerException as exc:
        return str(exc)
    finally:
        client.close()


def test_malformed_requests_get_clear_errors_while_the_server_serves(server, images):
    _, batch = images
    good = np.rint(batch[:1].transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    cases = [
        (good.astype(np.float32), "FP32", "data-type is 'FP32', but model 'patchcore' expects 'UINT8'"),
        (good[0, :2], "UINT8", "unexpected shape for input 'image'"),  # rank 3
        (np.zeros((0, 64, 64, 3), np.uint8), "UINT8", "input byte size mismatch for input 'image'"),
        (np.zeros((1, 600, 600, 3), np.uint8), "UINT8", f"over this model's limit of {MAX_PIXELS:,}"),
        (np.zeros((1, 16, 64, 3), np.uint8), "UINT8", "too small; both sides must be >= 32"),
        (np.repeat(good, MAX_BATCH + 1, axis=0), "UINT8", f"batch-size must be <= {MAX_BATCH}"),
        (None, "UINT8", "missing required input(s) ['image']"),
    ]
    for array, datatype, fragment in cases:
        assert fragment in _raw_infer(server, array, datatype)
        assert _raw_infer(server, good) == ""  # and the next good request is served
    # A bad request in the same moment as good ones: only it fails.
    outcomes: list[str] = []
    oversized = np.zeros((1, 600, 600, 3), np.uint8)
    threads = [
        threading.Thread(target=lambda a=a: outcomes.append(_raw_infer(server, a))) for a in (good, oversized, good)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(bool(outcome) for outcome in outcomes) == [False, False, True]
    assert server.alive()


def test_predict_command_as_a_triton_client(server, resnet18_checkpoint, dataset, tmp_path):
    local = run_cli("predict", resnet18_checkpoint, dataset.root / "test", "--json", tmp_path / "local.json")
    remote = run_cli(
        "predict", "--server", f"grpc://{server.grpc_url}", "--model", MODEL, "--concurrency", 4,
        dataset.root / "test", "--json", tmp_path / "remote.json", "--csv", tmp_path / "remote.csv",
    )  # fmt: skip
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    by_file = {r["file"]: r for r in json.loads((tmp_path / "local.json").read_text())["results"]}
    served = json.loads((tmp_path / "remote.json").read_text())["results"]
    assert sorted(r["file"] for r in served) == sorted(by_file)
    for record in served:
        assert abs(record["score"] - by_file[record["file"]]["score"]) <= PARITY_BAR.score
        assert record["label"] == by_file[record["file"]]["label"]
    assert (tmp_path / "remote.csv").read_text().count("\n") == len(served) + 1


def _port_options() -> list[str]:
    http, grpc, metrics = free_ports()
    return ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]


def test_serve_command_prints_endpoints_and_stops_cleanly_on_ctrl_c(repository, images):
    process, lines, errors = started_cli("serve", repository, *_port_options())
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while "Ctrl-C stops the server." not in lines and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert "Ctrl-C stops the server." in lines, f"{lines} {errors} {process.poll()}"
        assert "model patchcore (version 1): READY" in lines
        url = next(line.split()[1] for line in lines if line.startswith("HTTP"))
        with TritonBackend(url, model=MODEL) as remote:
            assert len(remote.predict(images[1][:1])) == 1
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    time.sleep(0.5)  # the reader threads take the last lines
    stderr = "\n".join(errors)
    assert process.returncode == 0, stderr
    assert "broken" in stderr and "not a PyTorch checkpoint" in stderr  # the failed model's one line, as a warning
    pid = int(next(line.split()[2] for line in stderr.splitlines() if "tritonserver pid" in line).rstrip(","))
    assert "no process left" in stderr
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of the server's process group (server, stubs) is left
