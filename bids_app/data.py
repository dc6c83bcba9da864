"""Torch datasets and seeded data loaders over the tensors written by the participant level.

``index_tensors`` lists the trusted tensors of one mode with a single directory walk; ``TensorDataset``
turns a table of them into samples: the whole image in image mode, every part (patch, slice, region) as its
own sample in the other modes. Each tensor file is memory-mapped once per worker process, and a sample reads
only its own part's pages. ``make_loader`` builds a DataLoader whose order, worker seeds and augmentation
all follow from one seed and the epoch number (``SeededSampler.set_epoch``).
"""

from __future__ import annotations

import collections
import logging
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bids_app.config import ExtractionMode, Task
from bids_app.errors import ConfigError, DataError, InputMissingError
from bids_app.extraction.storage import load_tensor, read_sidecar

if TYPE_CHECKING:
    from bids_app.augment import Augmentation

log = logging.getLogger(__name__)

INDEX_COLUMNS = (
    "participant_id",
    "session_id",
    "tensor_path",
    "n_parts",
    "sample_shape",
    "source_sha256",
    "raw_source_sha256",
)
NO_SESSION = "n/a"
UNLABELLED = "n/a"
MAX_OPEN_TENSORS = 128  # memory maps kept open per worker (each holds a file descriptor)
_NAME = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?_")


def index_tensors(output_dir: Path, mode: ExtractionMode, suffix: str = "T1w") -> pd.DataFrame:
    """Table of the complete tensors of ``mode`` under ``output_dir`` (one directory walk).

    Args:
        output_dir: the participant-level output (BIDS derivative) folder.
        mode: extraction mode to list.
        suffix: image suffix, ``T1w`` or ``pet``.

    Returns:
        One row per image sorted by participant and session, columns ``INDEX_COLUMNS``: BIDS-prefixed ids
        (``session_id`` is ``n/a`` without sessions), ``tensor_path`` (absolute), ``n_parts`` (1 in image
        mode), ``sample_shape`` (tuple ``(1, ...)`` of one sample) and the sidecar's source checksums.
        Tensors whose sidecar is missing, unreadable or not ``Complete`` are skipped with a warning.

    Raises:
        DataError: two tensors of this mode and suffix belong to one participant and session.
    """
    pattern = f"sub-*/**/deeplearning/sub-*_desc-{mode.value}_{suffix}.json"
    rows = []
    for json_path in sorted(Path(output_dir).glob(pattern)):
        tensor_path = json_path.with_suffix(".npy")
        match = _NAME.match(json_path.name)
        if match is None:
            continue
        try:
            sidecar = read_sidecar(json_path)
        except (DataError, InputMissingError) as exc:
            log.warning("Skipping tensor %s: %s", tensor_path, exc)
            continue
        if sidecar.get("Complete") is not True or not tensor_path.is_file():
            log.warning("Skipping incomplete tensor %s (re-run the participant level for it).", tensor_path)
            continue
        shape = tuple(int(v) for v in sidecar.get("Shape", ()))
        if sidecar.get("Mode", mode.value) != mode.value or len(shape) < 3:
            log.warning("Skipping tensor %s: sidecar Mode %r, Shape %s.", tensor_path, sidecar.get("Mode"), shape)
            continue
        session = match.group("ses")
        rows.append(
            {
                "participant_id": f"sub-{match.group('sub')}",
                "session_id": f"ses-{session}" if session else NO_SESSION,
                "tensor_path": str(tensor_path.absolute()),
                "n_parts": 1 if mode is ExtractionMode.IMAGE else shape[0],
                "sample_shape": shape if mode is ExtractionMode.IMAGE else shape[1:],
                "source_sha256": sidecar.get("SourceSHA256", ""),
                "raw_source_sha256": sidecar.get("RawSourceSHA256", ""),
            }
        )
    table = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    duplicated = table.duplicated(["participant_id", "session_id"], keep=False)
    if duplicated.any():
        paths = ", ".join(table.loc[duplicated, "tensor_path"].head(4))
        raise DataError(
            f"Several {mode.value} tensors with suffix {suffix} for one participant and session: {paths}. "
            "Restrict the images with --bids-filter-file (e.g. one run or one tracer) and re-run the participant "
            "level."
        )
    return table.sort_values(["participant_id", "session_id"], ignore_index=True)


def encode_labels(labels: Sequence[str], classes: Sequence[str] = ()) -> dict[str, int]:
    """Deterministic class → index mapping: ``classes`` in the given order, else the sorted distinct labels.

    Unlabelled values (``n/a``, empty) are not classes.
    """
    names = list(classes) if classes else sorted({str(v) for v in labels} - {UNLABELLED, ""})
    return {name: index for index, name in enumerate(names)}


def sample_shape(table: pd.DataFrame, mode: ExtractionMode) -> tuple[int, ...]:
    """The common shape ``(1, ...)`` of one sample; DataError naming two files when they differ."""
    if "sample_shape" in table.columns:
        shapes = [tuple(int(v) for v in s) for s in table["sample_shape"]]
    else:
        shapes = []
        for path in table["tensor_path"]:
            shape = tuple(int(v) for v in read_sidecar(Path(path))["Shape"])
            shapes.append(shape if mode is ExtractionMode.IMAGE else shape[1:])
    distinct = sorted(set(shapes))
    if len(distinct) != 1:
        first = [table["tensor_path"].iloc[shapes.index(s)] for s in distinct[:2]]
        raise DataError(
            f"Samples differ in shape: {distinct[:2]} ({first[0]} vs {first[-1]}). Extract every image with the "
            "same preprocessing and extraction options."
        )
    return distinct[0]


class TensorDataset(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """Samples of one extraction mode: ``(x, y, index)``.

    ``x`` is a float32 tensor ``(1, ...)``: ``(1, D, H, W)`` in image mode, ``(1, P, P, P)`` a patch,
    ``(1, A, B)`` a slice, ``(1, d, h, w)`` a region. ``y`` is the class index (int64, -1 when unlabelled)
    in classification, the target (float32 scalar, ``nan`` when unlabelled) in regression and ``x`` itself in
    reconstruction. ``index`` is the sample number; ``sample_table`` maps it to participant, session and part.

    Items are indexed by ``int`` or by ``(int, seed)`` (what ``SeededSampler`` yields): the seed drives
    that sample's augmentation.

    Args:
        table: rows with ``tensor_path``, ``n_parts``, ``participant_id``, ``session_id`` and ``label``
            (optional; ``n/a`` or empty marks an unlabelled image).
        mode: extraction mode of the tensors.
        task: decides ``y``.
        label_encoding: class → index (classification); ignored otherwise.
        augment: applied to ``x`` (training set only).
        cache: keep each sample's un-augmented array in memory after its first read (per worker process).
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
        counts = np.ones(len(table), dtype=np.int64) if mode is ExtractionMode.IMAGE else table["n_parts"]
        counts = np.asarray(counts, dtype=np.int64)
        self._row = np.repeat(np.arange(len(table)), counts)
        self._part = np.concatenate([np.arange(n) for n in counts]) if len(counts) else np.zeros(0, np.int64)
        self._targets = self._encode_targets(table, task, label_encoding)
        self.sample_table = pd.DataFrame(
            {
                "participant_id": np.asarray(table["participant_id"])[self._row],
                "session_id": np.asarray(table["session_id"])[self._row],
                "part_id": self._part,
            }
        )
        if "label" in table.columns:
            self.sample_table["label"] = np.asarray(table["label"])[self._row]
        self._open: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cached: dict[int, np.ndarray] = {}

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

    def __len__(self) -> int:
        return int(self._row.size)

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes open their own memory maps (and fill their own cache).
        state = dict(self.__dict__)
        state["_open"] = collections.OrderedDict()
        state["_cached"] = {}
        return state

    def _array(self, row: int) -> np.ndarray:
        array = self._open.get(row)
        if array is None:
            array = load_tensor(Path(self.paths[row]), mmap=True)
            self._open[row] = array
            if len(self._open) > MAX_OPEN_TENSORS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(row)
        return array

    def read_sample(self, index: int) -> np.ndarray:
        """The un-augmented float32 sample ``(1, ...)`` number ``index``."""
        cached = self._cached.get(index)
        if cached is not None:
            return cached
        array = self._array(int(self._row[index]))
        part = array if self.mode is ExtractionMode.IMAGE else array[int(self._part[index])]
        sample = np.array(part, dtype=np.float32)  # reads only this part's pages of the memory map
        if self.cache:
            self._cached[index] = sample
        return sample

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)
        sample = self.read_sample(index)
        if self.augment is not None:
            # Without a sampler seed, fall back on numpy's global generator (seeded per worker).
            rng = np.random.default_rng(seed if seed is not None else np.random.randint(0, 2**31))
            sample = self.augment(sample, rng)
        x = torch.from_numpy(np.array(sample, dtype=np.float32, copy=True))
        if self._targets is None:
            y = x
        elif self.task is Task.CLASSIFICATION:
            y = torch.tensor(self._targets[self._row[index]], dtype=torch.int64)
        else:
            y = torch.tensor(self._targets[self._row[index]], dtype=torch.float32)
        return x, y, index


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def mix_seed(*values: int) -> int:
    """A 63-bit seed derived from several integers (e.g. run seed, split, epoch)."""
    return int(np.random.SeedSequence([abs(int(v)) for v in values]).generate_state(1, np.uint64)[0] >> 1)


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields ``(sample index, augmentation seed)``; the order and seeds depend only on ``seed`` and the epoch.

    Args:
        n_samples: dataset length.
        seed: the run's seed (combined with the split by the caller).
        shuffle: random order each epoch; else 0..n-1.
        weights: per-sample drawing weights (class-weighted sampling): ``n_samples`` draws with replacement.
    """

    def __init__(self, n_samples: int, *, seed: int, shuffle: bool, weights: np.ndarray | None = None) -> None:
        self.n_samples = n_samples
        self.seed = seed
        self.shuffle = shuffle
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_samples

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        if self.n_samples == 0:
            return iter([])
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n_samples, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.n_samples, generator=generator)
        else:
            order = torch.arange(self.n_samples)
        seeds = torch.randint(0, 2**62, (self.n_samples,), generator=generator)
        return iter(zip(order.tolist(), seeds.tolist(), strict=True))


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed numpy and random from the worker's torch seed (loader generator + worker id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def class_weights(targets: np.ndarray) -> np.ndarray:
    """Per-sample weights ``1 / count(class)`` so that every class is drawn equally often on average."""
    counts = np.bincount(targets)
    return 1.0 / counts[targets]


def make_loader(
    dataset: TensorDataset,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = False,
    class_weighted: bool = False,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> DataLoader[Any]:
    """A DataLoader whose order, worker seeds and augmentation follow from ``seed`` and the sampler's epoch.

    Call ``loader.sampler.set_epoch(epoch)`` before each epoch. ``loader.generator`` (seeded from ``seed``)
    gives the workers' base seeds; its state belongs in a checkpoint.

    Args:
        dataset: the samples.
        batch_size: samples per batch; the last batch may be smaller.
        seed: seed of the sampler and of ``loader.generator``.
        shuffle: random order (training).
        class_weighted: draw samples with probability inversely proportional to their class frequency
            (classification only).
        num_workers: worker processes (kept alive across epochs when > 0).
        device: memory is pinned only for CUDA.

    Raises:
        ConfigError: class-weighted sampling outside classification.
    """
    weights = None
    if class_weighted:
        targets = dataset.sample_targets
        if dataset.task is not Task.CLASSIFICATION or targets is None:
            raise ConfigError(
                f"class_weighted_sampling needs a classification task, not {dataset.task.value}. "
                "Set class_weighted_sampling = false."
            )
        weights = class_weights(targets)
    sampler = SeededSampler(len(dataset), seed=seed, shuffle=shuffle, weights=weights)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(mix_seed(seed, 2**31)),
        persistent_workers=num_workers > 0,
        pin_memory=torch.device(device).type == "cuda",
    )


def rows_for(ids: pd.DataFrame, table: pd.DataFrame, what: str) -> pd.DataFrame:
    """Rows of ``table`` (labels + tensors) for the images a split table ``ids`` lists, in ``ids``' order.

    Raises:
        DataError: an image of ``ids`` has no tensor or no label in ``table``.
    """
    keys = ["participant_id", "session_id"]
    rows = ids[keys].astype(str).merge(table, on=keys, how="left", indicator=True)
    missing = rows[rows["_merge"] != "both"]
    if not missing.empty:
        first = missing.iloc[0]
        raise DataError(
            f"{len(missing)} image(s) of the {what} have no tensor or label (e.g. {first['participant_id']} "
            f"{first['session_id']}). Re-run the participant level for them or re-run --stages split."
        )
    return rows.drop(columns="_merge")
