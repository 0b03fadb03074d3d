"""``patchcore-trt serve``: run a real Triton Inference Server on a model repository (or on one model file)."""

from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from patchcore_trt.cli import app
from patchcore_trt.cli._common import err, out, program, version_option, warn
from patchcore_trt.errors import UserError

# NGC's release that carries Triton 2.51, the version nvidia-pytriton 0.7.0 bundles; its TensorRT is 10.5.
CONTAINER = "nvcr.io/nvidia/tritonserver:24.10-py3"
_BACKEND_OF = {"python": "python", "onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}


def container_command(repository: Path, ports: tuple[int, int, int]) -> str:
    http, grpc, metrics = ports
    return (
        f"docker run --rm --gpus all --shm-size=1g -p {http}:8000 -p {grpc}:8001 -p {metrics}:8002 "
        f"-v {repository.resolve()}:/models {CONTAINER} tritonserver --model-repository=/models"
    )


def _repository(target: Path, kind: str | None, anomalib_version: str | None, work: Path) -> Path:
    """``target`` itself if it is a repository; else a repository written for the model file (default settings)."""
    from patchcore_trt.serve.repository import ServeOptions, machine_kind, write_model

    if target.is_dir():
        return target
    if not target.is_file():
        raise UserError(f"{target}: no such file or folder; give a model repository or a .ckpt, .onnx or .engine")
    chosen = kind or ("gpu" if target.suffix.lower() == ".engine" else machine_kind())
    written = write_model(target, work / "repository", ServeOptions(kind=chosen, anomalib_version=anomalib_version))
    err.print(f"  wrote {written.folder} ({written.platform}, {chosen}); 'patchcore-trt triton' chooses every setting")
    return written.folder.parent


def _check_backends(target: Path, repository: Path, configs: dict[str, Any], distribution: Any, ports: tuple) -> None:
    from patchcore_trt.serve.repository import platform_of

    available = distribution.backend_names()
    missing = {name: platform_of(config) for name, config in configs.items()}
    missing = {name: kind for name, kind in missing.items() if _BACKEND_OF.get(kind, kind) not in available}
    if not missing:
        return
    if target.is_file():  # the repository written for it is temporary: write a lasting one first
        repository = Path("repo")
        out.print(f"write its repository first: {program()} triton {target} -o {repository}")
    out.print(f"Triton's full build serves it, e.g. NGC's container:\n  {container_command(repository, ports)}")
    listed = ", ".join(f"{name} ({kind})" for name, kind in sorted(missing.items()))
    build = "the bundled tritonserver (nvidia-pytriton) has the Python backend only" if distribution.bundled else (
        f"{distribution.binary} has backends {', '.join(sorted(available)) or 'none'}"
    )  # fmt: skip
    raise UserError(f"{listed}: {build}; run the container command above")


@app.command("serve")
def serve_command(
    target: Path = typer.Argument(..., help="A model repository ('patchcore-trt triton'), or a .ckpt/.onnx/.engine."),
    http_port: int = typer.Option(8000, "--http-port", help="HTTP/REST port (KServe v2 protocol)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Prometheus metrics port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 for every interface."),
    tritonserver: Path | None = typer.Option(
        None, "--tritonserver", help="tritonserver binary or a venv with nvidia-pytriton (default: see docs)."
    ),
    kind: str | None = typer.Option(None, "--kind", help="(model file) gpu or cpu; default gpu if torch sees one."),
    log_file: Path | None = typer.Option(None, "--log-file", help="Write the server's log here."),
    verbose: bool = typer.Option(False, "--verbose", help="Triton's verbose log."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for the models to load."),
    anomalib_version: str | None = version_option(),
) -> None:
    """Start Triton Inference Server on TARGET, print its endpoints, serve until Ctrl-C.

    A model whose Python process dies is reloaded (it reports not ready meanwhile); serve stops with an error when
    no model is ready.
    """
    from patchcore_trt.serve.repository import read_repository
    from patchcore_trt.serve.server import TritonServer, find_distribution

    ports = (http_port, grpc_port, metrics_port)
    for port in ports:
        if not 1 <= port <= 65535 or ports.count(port) > 1:
            raise UserError(f"ports {http_port}, {grpc_port}, {metrics_port} must be distinct numbers in 1..65535")
    if anomalib_version is not None and target.is_dir():
        raise UserError("--anomalib-version applies to a .ckpt file; a repository's models carry theirs (triton)")
    with tempfile.TemporaryDirectory(prefix="patchcore-trt-serve-") as work:
        repository = _repository(target, kind, anomalib_version, Path(work))
        problems: dict[str, str] = {}
        configs = read_repository(repository, problems)
        for name, problem in problems.items():
            warn(f"model {name}: not loaded: {problem}")
        if not configs:
            raise UserError(f"{repository}: no model of it can be loaded (see the warnings above)")
        distribution = find_distribution(tritonserver)
        _check_backends(target, repository, configs, distribution, ports)
        server = TritonServer(
            repository, ports, models=list(configs), host=host, distribution=distribution, log_file=log_file,
            verbose=verbose,
        )  # fmt: skip
        # Ctrl-C, SIGTERM from a service manager and SIGHUP from a closed terminal stop the server and its stubs.
        # SIGINT is set explicitly too: a process started in the background by a shell inherits it ignored.
        previous = {number: signal.signal(number, _interrupt) for number in _STOP_SIGNALS}
        try:
            _serve(server, timeout)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WATCH_INTERVAL_S = 0.5


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _still_stopping(signum: int, frame: object) -> None:
    """A second Ctrl-C while Triton stops: the stop goes on (SIGKILL after its timeout), and says so."""
    err.print("  still stopping tritonserver; it is killed if it has not exited in time")


def _serve(server: Any, timeout: float) -> None:
    from patchcore_trt.serve.health import ModelWatch
    from patchcore_trt.serve.versions import VersionWatch

    started = time.perf_counter()
    err.print(f"> starting {server.distribution.binary} on {server.repository} ...")
    try:
        states = server.start(timeout_s=timeout)
        err.print(f"  tritonserver pid {server.process.pid}, up in {time.perf_counter() - started:.1f} s")
        for state in states:
            (out.print if state.state == "READY" else warn)(state.line())
        ready = [state.name for state in states if state.state == "READY"]
        if not ready:
            raise UserError(f"no model of {server.repository} is ready (see the lines above); nothing to serve")
        _print_endpoints(server, ready[0])
        watch = ModelWatch(server, load_timeout_s=timeout)
        watch.start(ready)
        new_versions = VersionWatch(server, load_timeout_s=timeout)
        new_versions.start(ready)
        while server.alive():
            time.sleep(WATCH_INTERVAL_S)
            for loaded, name, line in new_versions.check():
                if loaded:
                    err.print(line)
                    watch.follow(name)
                else:
                    warn(line)
            for healed, line in watch.check():
                if healed:
                    err.print(line)
                elif not server.alive():
                    break  # reported below, as the server's own exit
                elif any(state.state == "READY" for state in server.models()):
                    warn(line)
                else:
                    raise UserError(f"{line}; no model of {server.repository} is ready any more")
        raise UserError(f"tritonserver exited by itself with code {server.process.returncode}: {server.log_tail(3)}")
    except KeyboardInterrupt:
        err.print(f"> stopping {server.distribution.binary.name} ...")
    finally:
        for number in _STOP_SIGNALS:
            signal.signal(number, _still_stopping)
        code = server.stop()
        if server.process is not None:
            left = "some processes of its group are still running" if server.group_alive() else "no process left"
            err.print(f"  tritonserver stopped (exit code {code}), {left}; log: {server.log_file}")


def _print_endpoints(server: Any, model: str) -> None:
    from patchcore_trt.line.products import product_list
    from patchcore_trt.serve.line_repository import is_line
    from patchcore_trt.serve.repository import check_model_folder

    config = check_model_folder(server.repository / model)
    # A line's client names its product; the example names the first.
    product = product_arg = ""
    if is_line(config):
        products = product_list(config.parameters["products"].string_value, str(server.repository / model))
        product = f" --product {next(iter(products))}"
        product_arg = f", product='{next(iter(products))}'"
        out.print(f"line    {model}: products {', '.join(products)}")
    out.print(f"HTTP    http://{server.http_url}   (health: curl http://{server.http_url}/v2/health/ready)")
    out.print(f"gRPC    grpc://{server.grpc_url}")
    out.print(f"metrics {server.metrics_url}")
    out.print(f"log     {server.log_file}")
    out.print("client:")
    out.print(f"  {program()} predict --server {server.grpc_url} --model {model}{product} IMAGES...")
    out.print(
        "  python: from patchcore_trt.runtime import open_backend\n"
        f"          backend = open_backend('{server.grpc_url}', model='{model}'{product_arg})\n"
        "          prediction = backend.predict(frames)  # uint8 [N, H, W, 3] -> score, label, map, mask"
    )
    out.print("Ctrl-C stops the server.")
    out.file.flush()
