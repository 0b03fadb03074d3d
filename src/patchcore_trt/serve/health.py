"""Watch a running tritonserver's models and reload one whose Python process died.

Triton 2.51's Python backend runs each model instance in a stub process. When a stub dies (the OOM killer's
SIGKILL), the server neither notices nor restarts it: every request to that model fails with "Stub process ... is
not healthy" while the health endpoints and the model's readiness keep answering 200. So the watcher looks at the
server's own child processes: a stub that has ended (Triton does not reap it, so it stays a zombie) marks its
model sick; the watcher unloads the model at once (its readiness, and the server's, turn false) and loads it again
through Triton's model control API (the server runs with --model-control-mode=explicit). A model that keeps dying
is left unloaded and said so, rather than reloaded forever.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STUB_NAME = "triton_python_backend_stub"
# More deaths than this within RELOAD_WINDOW_S: the model dies on its own (every request, every load), stop reloading.
MAX_RELOADS = 3
RELOAD_WINDOW_S = 600.0


def _stat(pid: str) -> tuple[int, str] | None:
    """(parent pid, state letter) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    return int(fields[1]), fields[0]


def stub_processes(server_pid: int, repository: Path) -> dict[str, set[int]]:
    """Model name -> pids of the live (not zombie) Python backend stubs that the server started for it.

    A stub's first argument is its model's model.py, REPO/NAME/VERSION/model.py; stubs of a version older than the
    model's newest are left out.
    """
    from patchcore_trt.serve.repository import versions

    found: dict[str, set[int]] = {}
    newest: dict[str, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(entry.name)
        if stat is None or stat[0] != server_pid or stat[1] in "ZX":
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) < 2 or Path(argv[0].decode(errors="replace")).name != STUB_NAME:
            continue
        with contextlib.suppress(ValueError):
            model, version = Path(argv[1].decode(errors="replace")).relative_to(repository).parts[:2]
            if model not in newest:
                numbers = versions(repository / model)
                newest[model] = str(numbers[-1]) if numbers else ""
            # A line's older version still answers while its newest loads; only the newest one is watched.
            if version == newest[model]:
                found.setdefault(model, set()).add(int(entry.name))
    return found


@dataclass
class ModelWatch:
    """The stubs of each served Python model, checked by ``check()``; ``server`` is a started TritonServer.

    Attributes:
        server: The running server.
        load_timeout_s: How long one reload may take.
        stubs: Model name -> the stub pids it was served by when last loaded.
        deaths: Model name -> when its stubs were found ended, within the last RELOAD_WINDOW_S.
    """

    server: Any
    load_timeout_s: float
    stubs: dict[str, set[int]] = field(default_factory=dict)
    deaths: dict[str, deque[float]] = field(default_factory=dict)

    def start(self, models: list[str]) -> None:
        """Record the stubs of ``models`` (the READY ones) as they are now."""
        current = stub_processes(self.server.process.pid, self.server.repository)
        self.stubs = {name: current[name] for name in models if name in current}

    def follow(self, name: str) -> None:
        """Watch the stubs ``name`` runs now (after a new version of it was loaded)."""
        self.stubs[name] = stub_processes(self.server.process.pid, self.server.repository).get(name, set())

    def check(self) -> list[tuple[bool, str]]:
        """Reload each model whose stub ended; returns lines to show, (True, line) when all is well again."""
        current = stub_processes(self.server.process.pid, self.server.repository)
        lines: list[tuple[bool, str]] = []
        for name, pids in list(self.stubs.items()):
            ended = sorted(pids - current.get(name, set()))
            if ended:
                lines.append(self._heal(name, ended))
        return lines

    def _heal(self, name: str, ended: list[int]) -> tuple[bool, str]:
        import tritonclient.http as httpclient

        now = time.monotonic()
        deaths = self.deaths.setdefault(name, deque())
        deaths.append(now)
        while deaths and deaths[0] < now - RELOAD_WINDOW_S:
            deaths.popleft()
        which = ", ".join(map(str, ended))
        died = f"model {name}: its Python process (pid {which}) ended"
        started = time.monotonic()
        # Triton's errors are not raised here: the model's state read below says what happened.
        with contextlib.closing(
            httpclient.InferenceServerClient(self.server.http_url, network_timeout=self.load_timeout_s)
        ) as client:
            with contextlib.suppress(httpclient.InferenceServerException, OSError):
                client.unload_model(name, headers=self.server.control)  # readiness turns false now
            if len(deaths) > MAX_RELOADS:
                del self.stubs[name]
                return False, f"{died} {len(deaths)} times in {RELOAD_WINDOW_S:.0f} s; left unloaded"
            with contextlib.suppress(httpclient.InferenceServerException, OSError):
                client.load_model(name, headers=self.server.control)
        try:
            state = next((s for s in self.server.models() if s.name == name), None)
        except (httpclient.InferenceServerException, OSError) as exc:  # the server itself is going
            del self.stubs[name]
            return False, f"{died}; reloading failed: tritonserver did not answer ({exc})"
        if state is None or state.state != "READY":
            del self.stubs[name]
            reason = state.line() if state is not None else f"model {name}: not in the repository any more"
            return False, f"{died}; reloading failed: {reason}"
        current = stub_processes(self.server.process.pid, self.server.repository)
        self.stubs[name] = current.get(name, set())
        return True, f"{died}; reloaded, READY again in {time.monotonic() - started:.1f} s"
