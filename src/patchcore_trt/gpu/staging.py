"""Host staging for the host-to-host path: a ring of upload slots, and one output block per batch.

Why a ring: with one staging buffer, the host could not write batch i+1 into it until batch i's upload had read
it, and its results could not be read while the next batch ran; everything the CPU does was serialised with the
GPU. With a few slots, a producer fills one slot while the GPU uploads and runs another.

A slot's life: claimed (``lend``: a producer fills it; or ``take``, then ``Slot.upload`` copies the caller's
array in chunk by chunk, each chunk's upload enqueued before the next is copied, so the copy overlaps the DMA) ->
queued (the executor hands back two events: ``uploaded``, after which the host bytes may be written again, and
``consumed``, after which the GPU no longer reads the slot's device copy) -> claimable again. The host waits only
on ``uploaded``, and only when it claims that slot again; the device copy is rewritten on the copy stream after
it waits on ``consumed`` (a GPU-side wait: the host does not block).

Outputs are not in the ring: each batch gets its own block (``carve``), and the Prediction returned is views of it.
A reused output slot would be overwritten by a later batch while the caller still reads (the served model slices
and sends a Prediction after the call; predict keeps rows); copying out of one costs a pass over the whole map.
A block per batch comes from torch's caching host allocator, so a block the caller has dropped is reused without a
new cudaHostAlloc; what the caller keeps stays pinned, as a copy would have stayed in memory.

Events are whatever the executor records (``torch.cuda.Event``); ``None`` means nothing is pending. Nothing here
needs a GPU: with ``pin=False`` and a CPU device it runs on CPU tensors (the tests do).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

RING_SLOTS = 3  # one being filled, one uploading, one whose device copy the running batch reads
UPLOAD_CHUNK = 2 << 20  # bytes copied into a slot before their upload is enqueued: the copy overlaps the DMA
_ALIGN = 256  # every carved view starts on a 256-byte boundary (any dtype view of it is aligned)

_NUMPY_TO_TORCH = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class Slot:
    """One staging slot: a flat host byte buffer (pinned for the GPU), its device copy, and the events of its last
    upload. Buffers grow to the largest batch the slot has carried and are reused at every smaller one."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.host = torch.empty(0, dtype=torch.uint8)
        self.device: torch.Tensor | None = None
        self.uploaded: Any = None
        self.consumed: Any = None
        self.claimed = False
        self.lent: weakref.ref[np.ndarray] | None = None  # the array a producer holds, while lent

    def free(self) -> bool:
        """Not claimed, or lent to a producer that dropped the array (and every view of it) unsubmitted."""
        return not self.claimed or (self.lent is not None and self.lent() is None)

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The first bytes of the host buffer as a C-contiguous ``dtype`` array of ``shape``."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        return self.host[:nbytes].numpy().view(dtype).reshape(shape)

    def holds(self, images: np.ndarray) -> bool:
        """Whether ``images`` is this slot's host buffer from its first byte (as ``array`` returns it)."""
        return (
            self.host.numel() > 0
            and images.flags.c_contiguous
            and images.ctypes.data == self.host.data_ptr()
            and images.nbytes <= self.host.numel()
        )

    def _reserve(self, nbytes: int) -> None:
        if self.uploaded is not None:  # the last upload may still be reading these bytes
            self.uploaded.synchronize()
            self.uploaded = None
        if self.host.numel() < nbytes:
            self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def upload(
        self,
        images: np.ndarray,
        device: torch.device,
        *,
        copy: bool,
        streams: Sequence[Any] = (),
        chunk: int = UPLOAD_CHUNK,
    ) -> torch.Tensor:
        """Enqueue the upload of C-contiguous ``images`` to the slot's device copy (on the current stream, which
        the caller has made wait on ``consumed``) and return them as a tensor there. With ``copy`` they are first
        copied into the slot, ``chunk`` bytes at a time, each chunk's upload enqueued before the next is copied;
        otherwise they are the slot's bytes already (lent). A fresh device buffer is recorded on ``streams`` (the
        streams that read it) for the caching allocator."""
        nbytes = images.nbytes
        if self.device is None or self.device.numel() < nbytes or self.device.device != device:
            self.device = torch.empty(self.host.numel(), dtype=torch.uint8, device=device)
            for stream in streams:
                self.device.record_stream(stream)
        source, host = images.reshape(-1).view(np.uint8), self.host[:nbytes].numpy()
        for start in range(0, nbytes, chunk if copy else max(nbytes, 1)):
            stop = min(start + chunk, nbytes) if copy else nbytes
            if copy:
                np.copyto(host[start:stop], source[start:stop])
            self.device[start:stop].copy_(self.host[start:stop], non_blocking=True)
        return self.device[:nbytes].view(_NUMPY_TO_TORCH[images.dtype]).view(images.shape)


class SlotRing:
    """Staging slots handed out in turn; thread-safe. Holds ``slots`` slots, more while producers hold them all
    (a slot lent and never submitted is free again once the producer drops the array)."""

    def __init__(self, slots: int = RING_SLOTS, *, pin: bool = True) -> None:
        if slots < 1:
            raise ValueError(f"a ring needs at least one slot, got {slots}")
        self.pin = pin
        self._slots = [Slot(pin) for _ in range(slots)]
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._slots)

    def _claim(self, nbytes: int) -> Slot:
        with self._lock:
            order = self._slots[self._next :] + self._slots[: self._next]
            slot = next((slot for slot in order if slot.free()), None)
            if slot is None:  # every slot is held by a producer or an upload being enqueued
                slot = Slot(self.pin)
                self._slots.append(slot)
            self._next = (self._slots.index(slot) + 1) % len(self._slots)
            slot.claimed, slot.lent = True, None
        try:
            slot._reserve(nbytes)  # outside the lock: waiting on one slot's upload must not stall the others
        except BaseException:
            slot.claimed = False
            raise
        return slot

    def lend(self, shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
        """A C-contiguous array of ``shape`` in a slot's pinned memory, for a producer to fill; passing it to
        ``take`` (through the backend's ``predict``) uploads it without a copy. Good for one batch."""
        dtype = np.dtype(dtype)
        slot = self._claim(math.prod(shape) * dtype.itemsize)
        array = slot.array(tuple(shape), dtype)
        # Every view of ``array`` has the same numpy base (numpy collapses view chains onto the array over the
        # torch storage): the slot is the producer's while that base lives, whichever views it kept.
        slot.lent = weakref.ref(array.base)
        return array

    def _lent_slot(self, images: np.ndarray) -> Slot | None:
        return next((slot for slot in self._slots if slot.lent is not None and slot.holds(images)), None)

    def take(self, images: np.ndarray) -> tuple[Slot, bool]:
        """The slot to upload ``images`` from, and whether they must be copied into it (``Slot.upload``): a lent
        array is its own slot; anything else goes into the next free slot. The slot stays claimed until
        ``queued``."""
        with self._lock:
            slot = self._lent_slot(images)
            if slot is not None:
                slot.lent = None
                return slot, False
        return self._claim(images.nbytes), True

    def queued(self, slot: Slot, uploaded: Any, consumed: Any) -> None:
        """The executor enqueued ``slot``'s upload (or gave up on it: ``None`` events); it may be claimed again."""
        with self._lock:
            slot.uploaded, slot.consumed = uploaded, consumed
            slot.lent, slot.claimed = None, False


def carve(layout: Sequence[tuple[tuple[int, ...], torch.dtype]], *, pin: bool) -> list[torch.Tensor]:
    """Tensors of the given (shape, dtype) as views of one fresh host block (pinned when ``pin``): one allocation
    per batch for all its outputs. Each view starts on a 256-byte boundary; they do not overlap."""
    offsets, total = [], 0
    for shape, dtype in layout:
        offsets.append(total)
        total += _aligned(math.prod(shape) * dtype.itemsize)
    block = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pin)
    return [
        block[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for offset, (shape, dtype) in zip(offsets, layout, strict=True)
    ]
