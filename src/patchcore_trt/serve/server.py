"""Start and stop a real Triton Inference Server on a model repository.

Where tritonserver comes from (first found): ``--tritonserver``, ``$PATCHCORE_TRT_TRITONSERVER`` (the binary, or
a venv or site-packages folder holding nvidia-pytriton), nvidia-pytriton importable here, a ``.venv-triton`` beside
this venv (what .ci/serve-env makes), then ``tritonserver`` on PATH (Triton's full build, e.g. NGC's container).

nvidia-pytriton 0.7.0 bundles tritonserver 2.51 with the Python backend only, its libraries in
``nvidia_pytriton.libs`` and one Python backend stub per Python version. Its stub embeds libpython and starts
Python isolated (PYTHONPATH is ignored), taking its prefix from the first ``python3`` on PATH. So the launcher
gives the stub this interpreter's Python: a backend folder with the stub for this Python version, this
interpreter's libpython first on LD_LIBRARY_PATH, and a tiny venv first on PATH whose .pth file adds this
process's import path (the main venv, an editable source tree, PYTHONPATH entries), so the served model imports
the same patchcore_trt, torch and numpy as the command that started it.

The server runs in its own process group, so stopping it also ends the Python backend stubs it started, and it
gets SIGTERM when the process that started it dies (even by SIGKILL), so no server outlives its launcher. It runs
with explicit model control: only the models named are loaded (never a leftover hidden folder), and a model can be
reloaded while the others serve (health.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchcore_trt.errors import UserError

ENV_VARIABLE = "PATCHCORE_TRT_TRITONSERVER"
DEFAULT_PORTS = (8000, 8001, 8002)
EXIT_TIMEOUT_S = 10
# Python backend shared memory per instance: room for a batch of 16 256x256 images and their maps, grown as needed.
SHM_BYTES = 16 << 20
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Explicit model control lets a client unload or load models; only requests carrying this header with the server's
# own random value may (the model-repository API is restricted), so no client can take a model from the others.
CONTROL_HEADER = "patchcore-trt-control"


@dataclass(frozen=True)
class Distribution:
    """A tritonserver binary and what it needs.

    Attributes:
        binary: The tritonserver executable.
        backends: Its backend folder (for the bundled build: the folder holding python/).
        libraries: Folder of its shared libraries (nvidia_pytriton.libs), None for a full build.
        stubs: Folder of per-Python-version stubs (python_backend_stubs), None for a full build.
    """

    binary: Path
    backends: Path
    libraries: Path | None = None
    stubs: Path | None = None

    @property
    def bundled(self) -> bool:
        return self.stubs is not None

    def backend_names(self) -> set[str]:
        return {p.name for p in self.backends.iterdir() if p.is_dir()} if self.backends.is_dir() else set()


def _from_pytriton(package: Path) -> Distribution | None:
    root = package / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    return Distribution(
        binary, root / "backends", package.parent / "nvidia_pytriton.libs", root / "python_backend_stubs"
    )


def _from_path(path: Path) -> Distribution | None:
    """A binary, a pytriton package, a site-packages folder or a venv holding nvidia-pytriton."""
    if path.is_file():
        for package in path.parents:
            if package.name == "pytriton":
                return _from_pytriton(package)
        return Distribution(path, path.parent.parent / "backends")
    for package in (path / "pytriton", path, *sorted(path.glob("lib/python3*/site-packages/pytriton"))):
        found = _from_pytriton(package) if package.is_dir() else None
        if found is not None:
            return found
    return None


def find_distribution(explicit: Path | None = None) -> Distribution:
    """The tritonserver to run (see the module docstring for the order), or a UserError saying how to get one."""
    candidates: list[tuple[str, Path]] = []
    if explicit is not None:
        candidates.append(("--tritonserver", Path(explicit)))
    elif os.environ.get(ENV_VARIABLE):
        candidates.append((f"${ENV_VARIABLE}", Path(os.environ[ENV_VARIABLE])))
    for origin, path in candidates:
        found = _from_path(path)
        if found is None:
            raise UserError(
                f"{origin} {path}: holds no tritonserver (expected the binary or a venv with nvidia-pytriton)"
            )
        return found
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it (or its numpy<2 pin)
    if spec is not None and spec.submodule_search_locations:
        found = _from_pytriton(Path(next(iter(spec.submodule_search_locations))))
        if found is not None:
            return found
    beside = _from_path(Path(sys.prefix).parent / ".venv-triton")
    if beside is not None:
        return beside
    on_path = shutil.which("tritonserver")
    if on_path:
        return Distribution(Path(on_path), Path(on_path).resolve().parent.parent / "backends")
    raise UserError(
        "no tritonserver found; make one with '.ci/serve-env' (a venv with nvidia-pytriton==0.7.0 beside this one), "
        f"or point --tritonserver / ${ENV_VARIABLE} at a tritonserver binary"
    )


def _libpython_folder() -> Path | None:
    """The folder of this interpreter's libpython3.X.so.1.0 (the stub's NEEDED), None if the loader finds it alone."""
    name = f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
    folders = [sysconfig.get_config_var("LIBDIR"), Path(sys.base_prefix) / "lib", "/usr/lib/x86_64-linux-gnu"]
    for folder in folders:
        if folder and (Path(folder) / name).is_file():
            return Path(folder)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if name in subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout:
            return None
    raise UserError(
        f"Triton's Python backend embeds {name}, and this Python ({sys.base_prefix}) has none: install the shared "
        f"library (Debian/Ubuntu: apt-get install libpython{sys.version_info[0]}.{sys.version_info[1]}) or use a "
        "Python built with --enable-shared"
    )


def _python_env(folder: Path) -> Path:
    """A venv whose site-packages adds this process's import path; its bin/ goes first on the stub's PATH."""
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(folder)
    stdlib = {Path(sysconfig.get_paths()[key]).resolve() for key in ("stdlib", "platstdlib")}
    entries = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() not in stdlib]
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site = folder / "lib" / version / "site-packages"
    # addsitedir, not bare paths: it also runs each folder's .pth files (editable installs, namespace hooks).
    lines = [f"import site; site.addsitedir({str(Path(entry).resolve())!r})" for entry in entries]
    (site / "patchcore_trt_serve.pth").write_text("\n".join(lines) + "\n")
    return folder / "bin"


def _backend_folder(distribution: Distribution, folder: Path) -> Path:
    """For the bundled build: its python backend with the stub of this Python version beside it."""
    stubs = distribution.stubs
    if stubs is None:
        return distribution.backends
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = stubs / version / "triton_python_backend_stub"
    if not stub.is_file():
        known = ", ".join(sorted(p.name for p in stubs.iterdir()))
        raise UserError(f"the bundled tritonserver has Python backend stubs for {known}, not this Python {version}")
    python = folder / "python"
    python.mkdir(parents=True)
    for source in (*(distribution.backends / "python").iterdir(), stub):
        if source.is_file():
            shutil.copy2(source, python / source.name)
    return folder


def port_free(host: str, port: int) -> bool:
    """Whether tritonserver can listen on ``port``: its HTTP and gRPC servers bind with SO_REUSEADDR, so a port held
    only by connections closing (TIME_WAIT, after a crash or a stop under load) is free for it, and for this check."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(host: str = "127.0.0.1", count: int = 3) -> tuple[int, ...]:
    """Ports the OS says are free now (for tests and benchmarks)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind((host, 0))
        return tuple(probe.getsockname()[1] for probe in sockets)
    finally:
        for probe in sockets:
            probe.close()


def _stop_with_parent(parent: int) -> Any:
    """A preexec_fn: the child gets SIGTERM when ``parent`` dies (Linux PR_SET_PDEATHSIG), or exits at once if it
    already has. SIGTERM, not SIGKILL: Triton then unloads its models, and their stubs and shared memory go too."""

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return arm


@dataclass(frozen=True)
class ModelState:
    name: str
    version: str
    state: str
    reason: str

    def line(self) -> str:
        """One line: name, version, state and the first line of Triton's reason (a Python traceback follows it)."""
        reason = self.reason.strip().splitlines()[0] if self.reason.strip() else ""
        return f"model {self.name} (version {self.version or '-'}): {self.state}" + (f": {reason}" if reason else "")


class TritonServer:
    """One tritonserver process on ``repository``; a context manager that stops it (and its stubs) on exit.

    Args:
        repository: The model repository.
        ports: HTTP, gRPC and metrics ports.
        models: The models to load (default: every folder of the repository not starting with '.').
        host: The address every endpoint listens on (127.0.0.1: this machine only).
        distribution: The tritonserver to run (find_distribution() when None).
        log_file: Where the server's output goes (a file in its work folder when None).
    """

    def __init__(
        self,
        repository: Path,
        ports: tuple[int, int, int] = DEFAULT_PORTS,
        *,
        models: list[str] | None = None,
        host: str = "127.0.0.1",
        distribution: Distribution | None = None,
        log_file: Path | None = None,
        verbose: bool = False,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.ports = ports
        if models is None:
            folders = self.repository.iterdir() if self.repository.is_dir() else []
            models = [p.name for p in folders if p.is_dir() and not p.name.startswith(".")]
        self.names = sorted(models)
        self.host = host
        self.distribution = distribution or find_distribution()
        self.verbose = verbose
        self.workspace = Path(tempfile.mkdtemp(prefix="patchcore-trt-triton-"))
        self.log_file = Path(log_file) if log_file is not None else self.workspace / "tritonserver.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.control = {CONTROL_HEADER: secrets.token_hex(16)}
        # The Python backend's shared memory regions are /dev/shm/<prefix><uuid>: unique per server on one machine.
        self.shm_prefix = f"pct{os.getpid()}p{ports[0]}_"

    @property
    def http_url(self) -> str:
        return f"{self._client_host()}:{self.ports[0]}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host()}:{self.ports[1]}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host()}:{self.ports[2]}/metrics"

    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def command(self, backends: Path) -> list[str]:
        http, grpc, metrics = self.ports
        return [
            str(self.distribution.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}", f"--http-port={http}",
            f"--grpc-address={self.host}", f"--grpc-port={grpc}",
            f"--metrics-address={self.host}", f"--metrics-port={metrics}",
            "--exit-on-error=false",  # a model that fails to load is reported; the others are served
            "--disable-auto-complete-config",  # the configs are complete; no extra stub per model at load
            "--model-control-mode=explicit",  # a model whose Python process died can be reloaded (health.py)
            *(f"--load-model={name}" for name in self.names),
            f"--http-restricted-api=model-repository:{CONTROL_HEADER}={self.control[CONTROL_HEADER]}",
            f"--grpc-restricted-protocol=model-repository:{CONTROL_HEADER}={self.control[CONTROL_HEADER]}",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--backend-config=python,shm-default-byte-size={SHM_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_BYTES}",
            f"--log-verbose={1 if self.verbose else 0}",
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libraries = [str(self.distribution.libraries)] if self.distribution.libraries else []
        libpython = _libpython_folder()
        if libpython is not None:
            libraries.append(str(libpython))
        if env.get("LD_LIBRARY_PATH"):
            libraries.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libraries)
        env["PATH"] = f"{_python_env(self.workspace / 'python-env')}:{env.get('PATH', '')}"
        return env

    def start(self, timeout_s: float = 300.0) -> list[ModelState]:
        """Start the server and wait (at most ``timeout_s``) until it answers; returns each model's state."""
        for port in self.ports:
            if not port_free(self.host, port):
                raise UserError(f"port {port} on {self.host} is in use (another server?); pick others with --*-port")
        backends = _backend_folder(self.distribution, self.workspace / "backends")
        env = self.environment()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(backends),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_stop_with_parent(os.getpid()),
            )
        deadline = time.monotonic() + timeout_s
        while not self._live():
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise UserError(f"tritonserver exited with code {code} while starting: {self.log_tail(1)}")
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"tritonserver did not answer within {timeout_s:.0f} s (log: {self.log_file})")
            time.sleep(0.25)
        return self.models()

    def _live(self) -> bool:
        import tritonclient.http as httpclient

        try:
            with contextlib.closing(httpclient.InferenceServerClient(self.http_url, connection_timeout=2)) as client:
                return bool(client.is_server_live())
        except Exception:  # refused, reset, or not HTTP yet: not live
            return False

    def models(self) -> list[ModelState]:
        """Every model of the repository with its state (READY, UNAVAILABLE, ...) and Triton's reason."""
        import tritonclient.http as httpclient

        with contextlib.closing(httpclient.InferenceServerClient(self.http_url)) as client:
            index: list[dict[str, Any]] = client.get_model_repository_index(headers=self.control)
        return [
            ModelState(item["name"], str(item.get("version", "")), item.get("state", "UNKNOWN"), item.get("reason", ""))
            for item in index
            if item["name"] in self.names  # the index also lists folders never loaded (a leftover staging folder)
        ]

    def statistics(self, model: str) -> dict[str, Any]:
        """Triton's statistics of ``model`` (inference and execution counts, per-batch-size counts)."""
        import tritonclient.http as httpclient

        with contextlib.closing(httpclient.InferenceServerClient(self.http_url)) as client:
            return client.get_inference_statistics(model)["model_stats"][0]

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def group_alive(self) -> bool:
        """Whether any process of the server's group (the server, its stubs) still runs."""
        if self.process is None:
            return False
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S + 5) -> int | None:
        """SIGTERM (Triton drains and unloads), then SIGKILL the whole group after ``timeout_s``; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        deadline = time.monotonic() + 5
        while self.group_alive() and time.monotonic() < deadline:  # stubs exit once their parent is gone
            time.sleep(0.1)
        if self.group_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        # A stub that was killed leaves its region behind at times; with the server gone, none of ours is in use.
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        shutil.rmtree(self.workspace / "backends", ignore_errors=True)
        shutil.rmtree(self.workspace / "python-env", ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
