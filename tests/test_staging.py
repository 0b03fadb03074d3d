"""The CUDA backend's host staging without a GPU (gpu/staging.py on CPU tensors): which slot a batch goes through,
when the host waits before rewriting one, lent slots going up without a copy, the output block's views, and how
a batch larger than the largest graph is split. The events are stand-ins that record when they are waited on."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch

from patchcore_trt.gpu.executor import chunks
from patchcore_trt.gpu.staging import SlotRing, carve

CPU = torch.device("cpu")


class Upload:
    """A stand-in for the CUDA event recorded after a slot's upload: ``synchronize`` notes that the host waited."""

    def __init__(self, waits: list[str], name: str) -> None:
        self.waits, self.name = waits, name

    def synchronize(self) -> None:
        self.waits.append(self.name)


def images(seed: int, count: int = 2, side: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def test_batches_go_through_the_slots_in_turn_and_wait_only_for_their_own_slots_upload():
    ring = SlotRing(3, pin=False)
    waits: list[str] = []
    used = []
    for batch in range(5):
        slot, copy = ring.take(images(batch))
        assert copy
        slot.upload(images(batch), CPU, copy=copy)
        np.testing.assert_array_equal(slot.array((2, 8, 8, 3), np.uint8), images(batch))
        used.append(ring._slots.index(slot))
        ring.queued(slot, Upload(waits, f"upload {batch}"), None)
    assert used == [0, 1, 2, 0, 1]
    # Batches 3 and 4 rewrote the slots of batches 0 and 1: only after waiting for those uploads, and no other.
    assert waits == ["upload 0", "upload 1"]
    assert len(ring) == 3


def test_a_slot_being_filled_is_never_handed_out_again():
    ring = SlotRing(2, pin=False)
    first, _ = ring.take(images(0))
    second, _ = ring.take(images(1))  # neither queued yet: both still being enqueued
    third, _ = ring.take(images(2))
    for slot, seed in ((first, 0), (second, 1), (third, 2)):
        slot.upload(images(seed), CPU, copy=True)
    assert len({id(first), id(second), id(third)}) == 3 and len(ring) == 3
    np.testing.assert_array_equal(first.array((2, 8, 8, 3), np.uint8), images(0))
    np.testing.assert_array_equal(second.array((2, 8, 8, 3), np.uint8), images(1))


def test_a_lent_slot_goes_up_without_a_copy_and_only_once():
    ring = SlotRing(2, pin=False)
    lent = ring.lend((2, 8, 8, 3))
    lent[...] = images(4)
    slot, copy = ring.take(lent)
    assert not copy and slot.holds(lent)
    np.testing.assert_array_equal(slot.upload(lent, CPU, copy=copy).numpy(), images(4))
    ring.queued(slot, None, None)
    # Submitted once, the array is the slot's again: a second predict on it is copied into a slot like any array.
    _, copy = ring.take(lent)
    assert copy


def test_a_lent_view_that_is_not_the_whole_slot_start_is_copied():
    ring = SlotRing(2, pin=False)
    lent = ring.lend((4, 8, 8, 3))
    lent[...] = np.concatenate([images(5), images(6)])
    slot, copy = ring.take(lent[2:])
    assert copy and not slot.holds(lent)
    np.testing.assert_array_equal(slot.upload(lent[2:], CPU, copy=copy).numpy(), images(6))
    head, copy = ring.take(lent[:2])  # the slot's first bytes: the lent slot itself
    assert not copy and head.holds(lent)


def test_a_lent_slot_dropped_unsubmitted_is_handed_out_again():
    ring = SlotRing(1, pin=False)
    lent = ring.lend((1, 8, 8, 3))
    head = lent[:1, :4]
    address = lent.ctypes.data
    del lent
    held, copied = ring.take(images(7, count=1))  # a view still holds the array: the slot stays the producer's
    assert copied and len(ring) == 2 and held.host.data_ptr() != address
    ring.queued(held, None, None)
    del head
    slot, copied = ring.take(images(7, count=1))
    assert copied and slot.host.data_ptr() == address and len(ring) == 2


def test_a_slot_grows_for_a_larger_batch_and_its_device_copy_is_the_batch():
    ring = SlotRing(1, pin=False)
    small, large = images(8, count=1), images(9, count=5, side=16)
    for batch in (small, large, small):
        slot, copy = ring.take(batch)
        on_device = slot.upload(batch, CPU, copy=copy)
        assert on_device.dtype == torch.uint8 and tuple(on_device.shape) == batch.shape
        np.testing.assert_array_equal(on_device.numpy(), batch)
        ring.queued(slot, None, None)
    assert slot.host.numel() == large.nbytes and slot.device.numel() == large.nbytes
    floats = np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32)
    slot, copy = ring.take(floats)
    assert torch.equal(slot.upload(floats, CPU, copy=copy), torch.from_numpy(floats))


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_a_copy_uploaded_chunk_by_chunk_is_the_batch(chunk):
    """Chunks of any size, ending inside a pixel or a float, leave the slot and its device copy equal to the batch."""
    ring = SlotRing(1, pin=False)
    floats = np.random.default_rng(2).random((3, 3, 9, 11), dtype=np.float32)
    for batch in (images(10, count=3, side=9), floats):
        slot, copy = ring.take(batch)
        on_device = slot.upload(batch, CPU, copy=copy, chunk=chunk)
        np.testing.assert_array_equal(on_device.numpy(), batch)
        np.testing.assert_array_equal(slot.array(batch.shape, batch.dtype), batch)
        ring.queued(slot, None, None)


def test_threads_sharing_a_ring_never_share_a_slot():
    ring = SlotRing(2, pin=False)
    held: set[int] = set()
    problems: list[str] = []
    lock = threading.Lock()

    def use(seed: int) -> None:
        for _ in range(50):
            slot, copy = ring.take(images(seed))
            slot.upload(images(seed), CPU, copy=copy)
            with lock:
                if id(slot) in held:
                    problems.append("two threads hold one slot")
                held.add(id(slot))
            if not np.array_equal(slot.array((2, 8, 8, 3), np.uint8), images(seed)):
                problems.append("a slot's bytes changed while its batch held it")
            with lock:
                held.discard(id(slot))
            ring.queued(slot, None, None)

    threads = [threading.Thread(target=use, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []


def test_the_output_block_holds_every_output_apart_and_aligned():
    layout = [((3,), torch.float32), ((3,), torch.bool), ((3, 1, 5, 7), torch.float32), ((3, 1, 5, 7), torch.bool)]
    views = carve(layout, pin=False)
    assert [(tuple(v.shape), v.dtype) for v in views] == [(shape, dtype) for shape, dtype in layout]
    spans = sorted((v.data_ptr(), v.data_ptr() + v.numel() * v.element_size()) for v in views)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    (block,) = {v.untyped_storage().data_ptr() for v in views}  # one allocation
    assert all((v.data_ptr() - block) % 256 == 0 for v in views)
    for index, view in enumerate(views):
        view.fill_(index + 1)
    assert views[0].tolist() == [1.0] * 3 and views[1].all() and (views[2] == 3).all() and views[3].all()


@pytest.mark.parametrize(
    ("batch", "most", "runs"),
    [(1, 64, [(0, 1)]), (64, 64, [(0, 64)]), (65, 64, [(0, 64), (64, 65)]), (10, 4, [(0, 4), (4, 8), (8, 10)])],
)
def test_a_batch_larger_than_the_largest_graph_runs_in_chunks(batch, most, runs):
    assert chunks(batch, most) == runs
