"""System shared memory between a Triton client and a server on the same machine (the triton backend's ``shm``).

A request's tensors then cross no socket: the client writes the images into a region of /dev/shm the server has
registered, and the server writes the outputs into the same region. Each request in flight has a region of its own
(a slot): the input at the start, each output the request asks for after it. Regions are made on first use, reused
from batch to batch, and grown (made again, larger) when a request needs more. ``release`` unregisters every region
from the server and unlinks it from /dev/shm; the backend calls it on close, and a finalizer calls it should a caller
forget (at garbage collection or interpreter exit). A server that restarted knows none of the regions: ``lost``
registers them again.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from patchcore_trt.errors import UserError

_ALIGN = 64  # every tensor starts on a cache line


@dataclass
class Region:
    name: str  # the server's name for it
    key: str  # its /dev/shm name
    size: int
    handle: Any  # tritonclient.utils.shared_memory.SharedMemoryRegion


def prefix() -> str:
    """The start of every region name this process makes: a process's regions are found (and cleaned) by it."""
    return f"pctclient{os.getpid()}_"


def layout(sizes: list[int]) -> tuple[list[int], int]:
    """Aligned offsets of tensors of ``sizes`` bytes laid out one after another, and the bytes they span."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // _ALIGN) * _ALIGN
    return offsets, end


UNREGISTER_TRIES = 20


class SharedRegions:
    """The regions of one client: one per slot, registered with the server under a name unique to this client.

    Args:
        client: The tritonclient client (HTTP or gRPC) of the server.
        where: How errors name the server (its URL).
    """

    def __init__(self, client: Any, where: str) -> None:
        from tritonclient.utils import shared_memory

        self.shm = shared_memory
        self.client = client
        self.where = where
        self.tag = f"{prefix()}{secrets.token_hex(4)}"
        self.regions: dict[int, Region] = {}
        self.lock = threading.Lock()

    def ensure(self, slot: int, size: int) -> Region:
        """Slot ``slot``'s region, made or grown to at least ``size`` bytes and registered."""
        with self.lock:
            region = self.regions.get(slot)
            if region is not None and region.size >= size:
                return region
            if region is not None:
                self._drop(slot)
            name = f"{self.tag}_{slot}"
            try:
                handle = self.shm.create_shared_memory_region(name, f"/{name}", size, create_only=True)
            except self.shm.SharedMemoryException as exc:
                raise UserError(f"cannot make a shared memory region of {size:,} bytes in /dev/shm ({exc})") from None
            region = self.regions[slot] = Region(name, f"/{name}", size, handle)
            self._register(region)
            return region

    def _register(self, region: Region) -> None:
        try:
            self.client.register_system_shared_memory(region.name, region.key, region.size)
        except Exception as exc:  # the server's refusal, or a transport error: each library raises its own
            reason = _reason(exc)
            raise UserError(
                f"{self.where}: cannot register shared memory ({reason}); --shm system needs the server on this "
                "machine, sharing its /dev/shm"
            ) from None

    def write(self, region: Region, array: np.ndarray) -> None:
        view = np.ndarray(array.shape, array.dtype, buffer=region.handle._mpsm_handle.buf, offset=0)
        view[...] = array
        del view  # no view may outlive the region, or it cannot be closed

    def read(self, region: Region, dtype: Any, shape: list[int], offset: int) -> np.ndarray:
        view = np.ndarray(shape, dtype, buffer=region.handle._mpsm_handle.buf, offset=offset)
        copy = view.copy()  # the region is the next request's
        del view
        return copy

    def lost(self, as_json: dict[str, Any]) -> bool:
        """Whether the server had forgotten some regions (it restarted) and they are registered again. False when
        it knows them all, or cannot be asked (gone): the failure that led here stands."""
        with self.lock:
            if not self.regions:
                return False
            try:
                status = self.client.get_system_shared_memory_status(**as_json)
            except Exception:  # the server is gone: nothing to register with
                return False
            known = set(status.get("regions", {})) if isinstance(status, dict) else {item["name"] for item in status}
            missing = [region for region in self.regions.values() if region.name not in known]
            for region in missing:
                self._register(region)
            return bool(missing)

    def _drop(self, slot: int) -> None:
        region = self.regions.pop(slot)
        # Triton 2.51 refuses to unregister a region a request still holds ("it is currently in use"), and lets go
        # of it just after the answer has gone out: after a Ctrl-C with requests in flight the region stayed
        # registered. A few tries, 50 ms apart, bounded to 1 s; a server gone (or restarted) fails each at once.
        for _ in range(UNREGISTER_TRIES):
            try:
                self.client.unregister_system_shared_memory(region.name)
                break
            except Exception:  # refused while in use, or the server is gone: each library raises its own
                time.sleep(0.05)
        with contextlib.suppress(Exception):  # unlinked already (another release)
            self.shm.destroy_shared_memory_region(region.handle)

    def release(self) -> None:
        """Unregister every region from the server and unlink it; safe to call more than once."""
        with self.lock:
            for slot in list(self.regions):
                self._drop(slot)


def _reason(exc: BaseException) -> str:
    text = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    text = str(text or "").strip()
    return text.splitlines()[0] if text else type(exc).__name__
