"""The torch dataset over the tensors written by the participant level.

``TensorDataset`` turns rows of the tensor index (``bids_app.data.tables``) into samples: the whole image in
image mode, every part (patch, slice, region) as its own sample in the other modes. The loader over it
(``make_loader``, ``SeededSampler``) lives in ``bids_app.data.sampling``, the batch buffers (``SampleBatch``,
``collate_samples``) in ``bids_app.data.batches``.

The fast path (figures in docs/performance.md): each process checks a tensor file once and keeps it open;
a batch is read sample by sample (one copy from a kept memory map, or one ``pread`` of exactly its bytes)
straight into one reused ``(B, C, ...)`` buffer (``batches.BatchRing``; shared memory in a loader worker, so
the main process receives only where the batch lies). No globbing, no per-sample tensors or collation copies,
no re-reading of a volume.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, get_worker_info

from bids_app.config import ExtractionMode, Task
from bids_app.data.batches import BatchRing, SampleBatch, make_batch_tensor
from bids_app.data.tables import UNLABELLED, channel_paths
from bids_app.errors import DataError, IOFailure
from bids_app.extraction.storage import load_tensor
from bids_app.labels import COHORT

if TYPE_CHECKING:
    from bids_app.data.augment import Augmentation

MAX_OPEN_TENSORS = 256  # files kept open per process, as memory maps or descriptors (least recently used closed)


class TensorDataset(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """Samples of one extraction mode: ``(x, y, index)``.

    ``x`` is a float32 tensor ``(C, ...)``: ``(C, D, H, W)`` in image mode, ``(C, P, P, P)`` a patch,
    ``(C, A, B)`` a slice, ``(C, d, h, w)`` a region (float16 files are widened to float32 as they are read).
    ``C`` is the number of channels: one tensor file per image kind (``data.tables.CHANNEL_PATHS``; 1 without
    that column), each file's part ``k`` read into channel ``c`` of sample ``k``.
    ``y`` is the class index (int64, -1 when unlabelled) in classification, the target (float32 scalar, ``nan``
    when unlabelled) in regression and ``x`` itself in reconstruction. ``index`` is the sample number;
    ``sample_table`` maps it to participant, session and part.

    Items are indexed by ``int`` or by ``(int, seed)`` (what ``SeededSampler`` yields): the seed drives
    that sample's augmentation. ``__getitems__`` reads a whole batch straight into one ``(B, C, ...)``
    tensor (in shared memory inside a loader worker), which ``collate_samples`` passes on without copying.

    Each process checks a file once (:func:`load_tensor`: sidecar, header, shape, dtype) and keeps it open
    (at most ``MAX_OPEN_TENSORS`` files): a part of a float32 tensor is then one copy from the kept memory
    map, a whole image or a float16 sample one ``pread`` of exactly its bytes. A file truncated while it
    is mapped makes the reading process die of SIGBUS (as any memory-mapped reader would).

    Args:
        table: rows with ``tensor_path``, ``n_parts``, ``participant_id``, ``session_id``, ``label``
            (optional; ``n/a`` or empty marks an unlabelled image) and ``channel_paths`` (optional: the file of
            each channel; every row has as many).
        mode: extraction mode of the tensors.
        task: decides ``y``.
        label_encoding: class → index (classification); ignored otherwise.
        augment: applied to ``x`` (training set only).
        cache: keep each sample's un-augmented array, in the stored dtype, in memory after its first read.
            The cache is per process: each loader worker fills its own, so it can grow to
            ``max(num_workers, 1)`` times the dataset's size on disk.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        mode: ExtractionMode,
        task: Task,
        *,
        label_encoding: Mapping[str, int] | None,
        augment: Augmentation | None = None,
        cache: bool = False,
    ) -> None:
        self.mode = mode
        self.task = task
        self.augment = augment
        self.cache = cache
        self.paths = [str(p) for p in table["tensor_path"]]
        files = channel_paths(table)
        self.n_channels = len(files[0]) if files else 1
        if any(len(paths) != self.n_channels for paths in files):
            raise ValueError("every row of a TensorDataset's table must have the same number of channels")
        # file number row * n_channels + channel: the unit each process checks, keeps open and maps once
        self._files = [path for paths in files for path in paths]
        counts = np.ones(len(table), dtype=np.int64) if mode is ExtractionMode.IMAGE else table["n_parts"]
        counts = np.asarray(counts, dtype=np.int64)
        self._row = np.repeat(np.arange(len(table)), counts)
        self._part = np.concatenate([np.arange(n) for n in counts]) if len(counts) else np.zeros(0, np.int64)
        self._rows, self._parts = self._row.tolist(), self._part.tolist()  # plain ints: cheaper per sample
        self._targets = self._encode_targets(table, task, label_encoding)
        self.sample_table = pd.DataFrame(
            {
                "participant_id": np.asarray(table["participant_id"])[self._row],
                "session_id": np.asarray(table["session_id"])[self._row],
                "part_id": self._part,
            }
        )
        if COHORT in table.columns:  # a multi-cohort run: (cohort, participant_id) names a person
            self.sample_table.insert(0, COHORT, np.asarray(table[COHORT])[self._row])
        if "label" in table.columns:
            self.sample_table["label"] = np.asarray(table["label"])[self._row]
        self._layouts: dict[int, _PartLayout] = {}
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._maps: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cached: dict[int, np.ndarray] = {}
        self._ring: BatchRing | None = None  # made by the first batch read in each process (None: none)
        self._ring_pid = 0
        self._widen: np.ndarray | None = None

    @staticmethod
    def _encode_targets(table: pd.DataFrame, task: Task, encoding: Mapping[str, int] | None) -> np.ndarray | None:
        """Per-image targets; an unlabelled image (no column, ``n/a`` or empty) gets -1 or ``nan``."""
        if task is Task.RECONSTRUCTION:
            return None
        labels = table["label"].astype(str) if "label" in table.columns else pd.Series([UNLABELLED] * len(table))
        known = ~labels.isin([UNLABELLED, ""])
        if task is Task.CLASSIFICATION:
            if encoding is None:
                raise ValueError("classification needs a label_encoding")
            unknown = sorted(set(labels[known]) - set(encoding))
            if unknown:
                raise DataError(
                    f"Label(s) {unknown} are not in the class mapping {dict(encoding)}. "
                    "Check labels.classes or the label column."
                )
            return np.array([encoding[v] if k else -1 for v, k in zip(labels, known, strict=True)], dtype=np.int64)
        values = np.full(len(labels), np.nan, dtype=np.float32)
        try:
            values[known.to_numpy()] = labels[known].astype(np.float32).to_numpy()
        except ValueError:
            bad = [v for v in labels[known] if not _is_number(v)][:5]
            raise DataError(f"Regression labels must be numbers, got {bad}. Check the label column.") from None
        return values

    @property
    def n_images(self) -> int:
        return len(self.paths)

    @property
    def sample_targets(self) -> np.ndarray | None:
        """Per-sample encoded targets ``(n_samples,)`` (None in reconstruction)."""
        return None if self._targets is None else self._targets[self._row]

    def sample_tensor_path(self, index: int) -> str:
        """The tensor file sample ``index`` is read from."""
        return self.paths[self._rows[index]]

    def __len__(self) -> int:
        return int(self._row.size)

    def __getstate__(self) -> dict[str, Any]:
        # A worker started by pickling (spawn) opens its own descriptors and fills its own cache.
        state = dict(self.__dict__)
        state["_layouts"], state["_fds"], state["_cached"] = {}, collections.OrderedDict(), {}
        state["_maps"] = collections.OrderedDict()
        state["_ring"], state["_ring_pid"], state["_widen"] = None, 0, None
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's file descriptors (they are reopened on the next read)."""
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds, self._maps = collections.OrderedDict(), collections.OrderedDict()

    def _array(self, file: int) -> np.ndarray:
        """The checked, memory-mapped tensor file number ``file`` (:func:`load_tensor`)."""
        return load_tensor(Path(self._files[file]), mmap=True)

    def _layout(self, file: int) -> _PartLayout:
        """Where the ``(1, ...)`` channel samples of tensor file number ``file`` lie."""
        layout = self._layouts.get(file)
        if layout is None:
            array = self._array(file)
            shape = array.shape if self.mode is ExtractionMode.IMAGE else array.shape[1:]
            layout = _PartLayout(offset=int(getattr(array, "offset", 0)), shape=tuple(shape), dtype=array.dtype)
            self._layouts[file] = layout
            if self._mapped(layout):
                self._keep_map(file, array)
        return layout

    def _mapped(self, layout: _PartLayout) -> bool:
        """Parts of float32 tensors are copied from a kept memory map, the rest is read with ``pread``.

        Once its pages are mapped, a map gives a small part ~2.5x faster than ``pread`` (a plain memcpy, no
        page-cache lookups); a whole image is faster with one ``pread`` (no page faults), and float16 goes
        through a buffer to be widened anyway.
        """
        return self.mode is not ExtractionMode.IMAGE and layout.dtype == np.float32

    def _keep_map(self, file: int, array: np.ndarray) -> np.ndarray:
        self._maps[file] = array
        if len(self._maps) > MAX_OPEN_TENSORS:
            self._maps.popitem(last=False)
        return array

    def _fd(self, file: int) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = os.open(self._files[file], os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise IOFailure(f"Cannot open tensor {self._files[file]}: {exc.strerror}.") from exc
            self._fds[file] = fd
            if len(self._fds) > MAX_OPEN_TENSORS:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(file)
        return fd

    def _scratch(self, layout: _PartLayout) -> np.ndarray:
        """A reused buffer for one stored sample that is widened to float32 after reading."""
        if self._widen is None or self._widen.shape != layout.shape or self._widen.dtype != layout.dtype:
            self._widen = np.empty(layout.shape, dtype=layout.dtype)
        return self._widen

    def sample_shape_of(self, index: int) -> tuple[int, ...]:
        """Shape ``(C, ...)`` of sample ``index`` as stored (checks its first channel's file on first use)."""
        shape = self._layout(self._rows[index] * self.n_channels).shape
        return (self.n_channels, *shape[1:])

    def _read_into(self, index: int, out: np.ndarray) -> None:
        """Write the un-augmented sample ``index`` into ``out`` (float32, C-contiguous, its shape)."""
        cached = self._cached.get(index)
        if cached is not None:
            np.copyto(out, cached)
            return
        first = self._rows[index] * self.n_channels
        stored = [self._read_channel(index, first + c, out[c : c + 1]) for c in range(self.n_channels)]
        if self.cache:
            parts = [part for part in stored if part is not None]  # every channel's, when caching
            kept = parts[0] if len(parts) == 1 else np.concatenate(parts)
            kept.flags.writeable = False  # handed out by read_sample; a sample must not change
            self._cached[index] = kept

    def _read_channel(self, index: int, file: int, out: np.ndarray) -> np.ndarray | None:
        """Write channel ``file`` of sample ``index`` into ``out`` ``(1, ...)``; its stored copy when caching."""
        layout = self._layout(file)
        if layout.shape != out.shape:
            raise DataError(
                f"Sample {index} of {self._files[file]} has shape {layout.shape}, not {out.shape} like the "
                "others of its batch. Extract every image with the same preprocessing and extraction options."
            )
        if self._mapped(layout):
            array = self._maps.get(file)
            if array is None:  # closed to stay under MAX_OPEN_TENSORS
                array = self._keep_map(file, self._array(file))
            else:
                self._maps.move_to_end(file)
            np.copyto(out, array[self._parts[index]])
            return out.copy() if self.cache else None
        stored = out if layout.dtype == out.dtype else self._scratch(layout)
        offset = layout.offset + self._parts[index] * stored.nbytes
        # A regular file returns every byte asked for, up to its end.
        if os.preadv(self._fd(file), [stored.data], offset) != stored.nbytes:
            raise DataError(f"Tensor {self._files[file]} is truncated (sample {index}). Re-run the participant level.")
        if stored is not out:
            torch.from_numpy(out).copy_(torch.from_numpy(stored))  # float16 → float32, 4x faster than numpy
        return stored.copy() if self.cache else None

    def read_sample(self, index: int) -> np.ndarray:
        """The un-augmented float32 sample ``(C, ...)`` number ``index`` (the cached array when caching)."""
        cached = self._cached.get(index)
        if cached is None or cached.dtype != np.float32:
            out = np.empty(self.sample_shape_of(index), dtype=np.float32)
            self._read_into(index, out)
            cached = self._cached.get(index)
            if cached is None or cached.dtype != np.float32:
                return out
        return cached

    def _augmented(self, sample: np.ndarray, seed: int | None) -> np.ndarray:
        if self.augment is None:
            return sample
        # Without a sampler seed, fall back on numpy's global generator (seeded per worker).
        return self.augment(sample, seed if seed is not None else int(np.random.randint(0, 2**31)))

    def _target(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self._targets is None:
            return x
        dtype = torch.int64 if self.task is Task.CLASSIFICATION else torch.float32
        return torch.tensor(self._targets[self._row[index]], dtype=dtype)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, seed = _split_key(key)
        sample = np.empty(self.sample_shape_of(index), dtype=np.float32)
        self._read_into(index, sample)
        x = torch.from_numpy(self._augmented(sample, seed))
        return x, self._target(index, x), index

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> SampleBatch:
        """A batch: samples read straight into one ``(B, C, ...)`` float32 buffer, then augmented in place."""
        indices, seeds = zip(*(_split_key(key) for key in keys), strict=True)
        shape = (len(indices), *self.sample_shape_of(indices[0]))
        if self._ring_pid != os.getpid():  # one ring per process, never one inherited by fork
            self._ring = BatchRing.create(int(np.prod(shape)) * 4, shared=get_worker_info() is not None)
            self._ring_pid = os.getpid()
        taken = self._ring.take(shape) if self._ring is not None else None
        if taken is not None:
            buffer, shared = taken
            x = torch.from_numpy(buffer)
        else:  # every buffer still in use: fresh (shared) memory, which torch sends without copying
            x = make_batch_tensor(shape)
            buffer, shared = x.numpy(), None
        for k, (index, seed) in enumerate(zip(indices, seeds, strict=True)):
            self._read_into(index, buffer[k])
            if self.augment is not None:
                buffer[k] = self._augmented(buffer[k], seed)
        index_tensor = torch.tensor(indices, dtype=torch.int64)
        y = x if self._targets is None else torch.from_numpy(self._targets[self._row[list(indices)]])
        return SampleBatch(x, y, index_tensor, shared=shared)


@dataclasses.dataclass(frozen=True)
class _PartLayout:
    """Where the samples of one checked tensor file lie: bytes from the file start to part 0, sample shape."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype


def _split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True
