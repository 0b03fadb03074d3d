"""Load a served model's new version when one appears (a line changed by ``triton --add/--replace/--remove``).

``serve`` runs Triton with explicit model control, restricted to itself, so the version a line writer adds is
loaded here: Triton loads the new version while the old one keeps answering, switches to it once it is ready and
unloads the old one after its requests are done; a version that fails to load leaves the old one serving, and is
hidden ('.N.failed') with the product list pointed back at the serving version.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from patchcore_trt.errors import UserError
from patchcore_trt.serve.repository import versions


@dataclass
class VersionWatch:
    """The version each model serves; ``check()`` loads newer ones.

    Attributes:
        server: A started TritonServer.
        load_timeout_s: How long one load may take.
        served: Model name -> the newest version it serves.
    """

    server: Any
    load_timeout_s: float
    served: dict[str, int] = field(default_factory=dict)

    def start(self, models: list[str]) -> None:
        self.served = {name: (versions(self.server.repository / name) or [0])[-1] for name in models}

    def check(self) -> list[tuple[bool, str, str]]:
        """Load each model whose newest version folder is newer than the one served; returns (loaded, model, line)."""
        lines = []
        for name, served in list(self.served.items()):
            numbers = versions(self.server.repository / name)
            if numbers and numbers[-1] > served:
                lines.append(self._load(name, served, numbers[-1]))
        return lines

    def _load(self, name: str, served: int, number: int) -> tuple[bool, str, str]:
        import tritonclient.http as httpclient

        from patchcore_trt.serve.line_repository import restore_products

        with (
            contextlib.closing(
                httpclient.InferenceServerClient(self.server.http_url, network_timeout=self.load_timeout_s)
            ) as client,
            contextlib.suppress(httpclient.InferenceServerException, OSError),
        ):  # its state says what happened
            client.load_model(name, headers=self.server.control)
        states = {int(s.version): s for s in self.server.models() if s.name == name and s.version.isdigit()}
        state = states.get(number)
        if state is not None and state.state == "READY":
            self.served[name] = number
            return True, name, f"model {name}: version {number} is serving (version {served} unloaded)"
        reason = state.line() if state is not None else f"model {name}: version {number} was not loaded"
        try:
            restore_products(self.server.repository / name, number)
        except (OSError, UserError) as exc:
            reason += f"; hiding it failed too ({exc})"
        old = states.get(served)
        serving = f"version {served} keeps serving" if old and old.state == "READY" else "no version is ready"
        return False, name, f"{reason}; {serving}"
