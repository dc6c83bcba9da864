"""Seeded, shardable sample order and the DataLoader factory.

``SeededSampler`` yields ``(sample index, augmentation seed)`` pairs whose order and seeds follow only from
the run's seed and the epoch (``set_epoch``), sharded across ranks in distributed training; ``make_loader``
builds the DataLoader over a ``TensorDataset`` with that sampler, seeded workers and ``collate_samples``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from bids_app.config import Task
from bids_app.data.batches import collate_samples
from bids_app.errors import ConfigError

if TYPE_CHECKING:
    from bids_app.data.dataset import TensorDataset


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
        rank, world_size: this process's share in distributed training: the epoch's sequence (the same on every
            rank) is padded by repeating its start to a multiple of ``world_size`` (like torch's
            ``DistributedSampler``) and rank ``r`` takes positions ``r, r + world_size, ...``: disjoint, equal
            slices whose padding is each slice's last item. ``world_size=1`` is the unsharded sequence.
    """

    def __init__(
        self,
        n_samples: int,
        *,
        seed: int,
        shuffle: bool,
        weights: np.ndarray | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.n_samples = n_samples
        self.seed = seed
        self.shuffle = shuffle
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.epoch = 0
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n_samples // self.world_size)

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
        pairs = list(zip(order.tolist(), seeds.tolist(), strict=True))
        if self.world_size > 1:
            padded = len(self) * self.world_size
            pairs = (pairs * -(-padded // len(pairs)))[:padded][self.rank :: self.world_size]
        return iter(pairs)


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
    rank: int = 0,
    world_size: int = 1,
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
        rank, world_size: this process's shard of every epoch in distributed training (``SeededSampler``).

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
    sampler = SeededSampler(len(dataset), seed=seed, shuffle=shuffle, weights=weights, rank=rank, world_size=world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(mix_seed(seed, 2**31)),
        persistent_workers=num_workers > 0,
        pin_memory=torch.device(device).type == "cuda",
    )
