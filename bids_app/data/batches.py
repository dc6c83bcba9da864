"""Reusable batch buffers shared between loader workers and the main process, and their collate function.

``TensorDataset.__getitems__`` reads a whole batch into one ``(B, 1, ...)`` float32 buffer taken from a
``BatchRing`` (``RING_SLOTS`` buffers per process, reused once the batch on them is gone) and returns it as a
``SampleBatch``. Inside a loader worker the ring is one anonymous shared-memory file: the batch crosses to the
main process as its location (``/proc/<worker pid>/fd/<fd>``, slot, byte offset), which the main process maps
(``_open_shared_batch``); clearing the slot's busy flag when the batch dies hands the slot back to the worker.
``collate_samples`` passes the batch tensors on without copying.
"""

from __future__ import annotations

import logging
import mmap
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

log = logging.getLogger(__name__)

RING_SLOTS = 4  # reusable batch buffers per process: the loader's prefetch (2 per worker) plus batches in use


class SampleBatch:
    """A batch read in one go: ``x`` ``(B, 1, ...)``, ``y`` ``(B,)`` (or ``x``), ``index`` ``(B,)``.

    It is also the list of its ``B`` samples ``(x[k], y[k], index[k])``, so any collate function accepts it;
    ``collate_samples`` hands on the batch tensors themselves. Sent from a loader worker, it arrives as the
    list ``[x, y, index]``; ``shared`` (the worker's ring as ``/proc/<pid>/fd/<fd>``, slot, byte offset) then
    says where ``x`` already lies in shared memory, so only its location crosses the process boundary.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, shared: tuple[str, int, int] | None = None
    ) -> None:
        self.x, self.y, self.index, self.shared = x, y, index, shared

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        return self.x[k], self.y[k], int(self.index[k])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        return (self[k] for k in range(len(self)))

    def __reduce__(self) -> tuple[Any, ...]:
        if self.shared is None:
            return list, ([self.x, self.y, self.index],)
        y = None if self.y is self.x else self.y.numpy()
        return _open_shared_batch, (*self.shared, tuple(self.x.shape), y, self.index.numpy())


def collate_samples(batch: SampleBatch | list[Any]) -> Any:
    """``[x, y, index]`` of a batch: a ``SampleBatch``'s own tensors (no copy), else ``default_collate``.

    Inside a loader worker a ``SampleBatch`` is returned as it is: it turns into ``[x, y, index]`` when the
    main process receives it.
    """
    if isinstance(batch, SampleBatch):
        return batch if get_worker_info() is not None else [batch.x, batch.y, batch.index]
    return default_collate(batch)


class BatchRing:
    """``RING_SLOTS`` batch buffers, each reused once the batch on it is gone: no batch pays for fresh pages.

    Fresh memory costs more than the copy into it (page faults and zeroing, worse for shared memory, which
    every batch from a worker needs). In the main process the buffers are private anonymous memory and a slot
    frees itself when the last tensor on it dies. In a loader worker they are one anonymous shared-memory
    file (``memfd``: gone with its last user, nothing to clean up; the main process maps it batch by batch
    through ``/proc/<worker pid>/fd/<fd>``). Its first page holds a busy flag per slot: the worker sets it, the
    main process clears it when it frees the batch.
    """

    def __init__(self, slot_nbytes: int, shared: bool) -> None:
        self.slot_nbytes = -(-slot_nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self.pid = os.getpid()
        size = mmap.PAGESIZE + RING_SLOTS * self.slot_nbytes
        self.fd: int | None = None
        if shared:
            if not Path("/proc/self/fd").is_dir():
                raise OSError("no /proc/<pid>/fd to share the buffers through")
            fd = os.memfd_create("bids_app-batches", os.MFD_CLOEXEC)
            try:
                os.posix_fallocate(fd, 0, size)  # no memory: fail here, not with SIGBUS on a write
                self.map = mmap.mmap(fd, size)
            except OSError:
                os.close(fd)
                raise
            self.fd = fd
        else:
            self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.flags = np.frombuffer(self.map, dtype=np.uint8, count=RING_SLOTS)

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)
        if fd is not None and self.pid == os.getpid():
            os.close(fd)

    @classmethod
    def create(cls, slot_nbytes: int, shared: bool) -> BatchRing | None:
        """A ring, or None (fresh buffers for every batch) where shared memory cannot hold one."""
        try:
            return cls(slot_nbytes, shared)
        except (OSError, AttributeError) as exc:  # AttributeError: no memfd_create on this system
            log.warning("No reusable batch buffers (%s); each batch gets fresh memory.", exc)
            return None

    def take(self, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[str, int, int] | None] | None:
        """A float32 array ``shape`` on a free slot, and where a worker's slot lies for the main process
        (``/proc/<pid>/fd/<fd>``, slot, byte offset); None when every slot is busy or too small."""
        count = int(np.prod(shape))
        free = np.flatnonzero(self.flags == 0)
        if count * 4 > self.slot_nbytes or free.size == 0:
            return None
        slot = int(free[0])
        self.flags[slot] = 1
        offset = mmap.PAGESIZE + slot * self.slot_nbytes
        base = np.frombuffer(self.map, dtype=np.float32, count=count, offset=offset)
        if self.fd is None:
            weakref.finalize(base, self.flags.__setitem__, slot, 0)
            return base.reshape(shape), None
        return base.reshape(shape), (f"/proc/{self.pid}/fd/{self.fd}", slot, offset)


def _open_shared_batch(
    ring_path: str, slot: int, offset: int, shape: tuple[int, ...], y: np.ndarray | None, index: np.ndarray
) -> list[torch.Tensor]:
    """``[x, y, index]`` of a batch a worker left in slot ``slot`` of its ring (run in the main process)."""
    fd = os.open(ring_path, os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, 0)
    finally:
        os.close(fd)
    base = np.frombuffer(mapping, dtype=np.float32, count=int(np.prod(shape)), offset=offset)
    flags = np.frombuffer(mapping, dtype=np.uint8, count=RING_SLOTS)
    weakref.finalize(base, flags.__setitem__, slot, 0)  # the worker may refill the slot once x is gone
    x = torch.from_numpy(base.reshape(shape))
    return [x, x if y is None else torch.from_numpy(y), torch.from_numpy(index)]


def make_batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor; in shared memory inside a loader worker, so it is sent without a copy."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage).view(shape)
