"""Benchmark the training data path: samples/s the training DataLoader delivers, against the raw read limit.

Builds ``--n-images`` t1-linear-sized images (169x208x179, min-max normalised), extracts them in image, patch
(50³, stride 50: 36 patches) and slice (sagittal, 20 discarded at each end: 129 slices) modes and writes them
with ``bids_app.extraction.write_tensor`` in the real output layout, so ``data.tables.index_tensors`` finds them. For
each mode it then measures, in the same run:

- the loader: ``data.TensorDataset`` + ``sampling.make_loader`` (the objects training builds), shuffled, no model;
  the consumer only counts the batches (it does not touch their pages);
- the raw limit: one process copying the same samples, in the same order, from memory maps opened once
  (``np.load(mmap_mode="r")``, no checks) into a preallocated batch buffer, as fast as it can.

Warm page cache: one untimed epoch first (workers start, files are read once), then ``--epochs`` timed epochs.
Cold page cache (``--cold``, needs root): ``echo 3 > /proc/sys/vm/drop_caches`` before every timed epoch of the
loader (with a new loader, as mapped pages survive a drop) and before each raw pass (with new maps). Figures are
medians over the timed epochs.

It also prints the float16 storage error: max and mean absolute difference between float16 and float32
tensors of the same min-max normalised volumes.

Run: ``python benchmarks/bench_dataloader.py [--n-images 32] [--workers 2] [--epochs 5] [--cold]
[--dtype float16] [--cache] [--modes image patch slice]``. Check ``uptime`` first: the figures are only as good
as the machine is idle.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bids_app.config import ExtractionConfig, ExtractionMode, Normalization, SliceDirection, Task, TensorDtype
from bids_app.data.dataset import TensorDataset
from bids_app.data.sampling import make_loader
from bids_app.data.tables import index_tensors
from bids_app.derivatives import tensor_path
from bids_app.extraction import extract_tensor, mode_parameters, normalize_volume, write_tensor

SHAPE = (169, 208, 179)
SPACE = "MNI152NLin2009aSym"
MODES = (ExtractionMode.IMAGE, ExtractionMode.PATCH, ExtractionMode.SLICE)
BATCH_SIZES = {ExtractionMode.IMAGE: 4, ExtractionMode.PATCH: 32, ExtractionMode.SLICE: 64}


def synthetic_volume(seed: int) -> np.ndarray:
    """An ellipsoidal 'brain' ``(169, 208, 179)`` float32, smooth contrast plus noise, zero background."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in SHAPE]
    radius = np.sqrt(
        (axes[0][:, None, None] / 0.8) ** 2 + (axes[1][None, :, None] / 0.85) ** 2 + (axes[2][None, None, :] / 0.8) ** 2
    )
    volume = 400 + 300 * np.cos(6 * radius) + rng.normal(0, 20, SHAPE).astype(np.float32)
    volume[radius >= 1] = 0
    return volume.astype(np.float32)


def build_dataset(output_dir: Path, n_images: int, cfg: ExtractionConfig) -> None:
    """Write ``n_images`` images' tensors of every mode of ``MODES`` under ``output_dir``."""
    for i in range(n_images):
        volume = normalize_volume(synthetic_volume(i), Normalization.MINMAX)
        for mode in MODES:
            tensor = extract_tensor(volume, mode, cfg)
            sidecar = {"Mode": mode.value, "ModeParameters": mode_parameters(mode, cfg)}
            write_tensor(tensor_path(output_dir, f"{i:03d}", None, SPACE, mode.value, "T1w"), tensor, sidecar)


def float16_error(n_volumes: int = 2) -> tuple[float, float]:
    """Max and mean absolute error of float16 against float32 storage of min-max normalised volumes."""
    errors = []
    for seed in range(n_volumes):
        volume = normalize_volume(synthetic_volume(seed), Normalization.MINMAX)
        errors.append(np.abs(volume.astype(np.float16).astype(np.float32) - volume))
    stacked = np.stack(errors)
    return float(stacked.max()), float(stacked.mean(dtype=np.float64))


def drop_caches() -> bool:
    """Drop the page cache (root only); False when not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def sample_order(dataset: TensorDataset, seed: int, epoch: int) -> list[int]:
    """The sample order the training loader uses for ``epoch``."""
    loader = make_loader(dataset, batch_size=1, seed=seed, shuffle=True)
    loader.sampler.set_epoch(epoch)
    return [index for index, _ in loader.sampler]


def raw_rates(paths: list[str], dataset: TensorDataset, order: list[int], batch_size: int, args: Any) -> list[float]:
    """Samples/s of each timed pass copying the samples of ``order`` from memory maps into a batch buffer.

    Warm: the maps are opened once and one untimed pass faults every page in first. Cold: the page cache is
    dropped and the maps reopened before each pass (a mapped page survives ``drop_caches``).
    """
    mode = dataset.mode
    row_of = np.zeros(0, dtype=np.int64)
    rates = []
    maps: list[np.ndarray] = []
    for repeat in range(args.epochs + (0 if args.cold else 1)):
        if args.cold or not maps:
            maps.clear()
            if args.cold:
                drop_caches()
            maps.extend(np.load(p, mmap_mode="r") for p in paths)
            counts = [1 if mode is ExtractionMode.IMAGE else m.shape[0] for m in maps]
            row_of = np.repeat(np.arange(len(paths)), counts)
        first = maps[0] if mode is ExtractionMode.IMAGE else maps[0][0]
        buffer = np.empty((batch_size, *first.shape), dtype=first.dtype)
        parts = dataset.sample_table["part_id"].to_numpy()
        start = time.perf_counter()
        for k, index in enumerate(order):
            array = maps[row_of[index]]
            np.copyto(buffer[k % batch_size], array if mode is ExtractionMode.IMAGE else array[parts[index]])
        if args.cold or repeat > 0:
            rates.append(len(order) / (time.perf_counter() - start))
    return rates


def loader_rates(make: Any, n_epochs: int, cold: bool) -> list[float]:
    """Samples/s of each timed epoch of the loader ``make()`` builds (after one untimed warm-up epoch).

    Cold: the cache is dropped and a new loader (new workers, nothing mapped) is built before each timed
    epoch, its start-up included in the time: pages that a worker keeps mapped survive ``drop_caches``.
    """
    rates = []
    loader = make()
    for epoch in range(n_epochs + 1):
        if cold and epoch > 0:
            del loader
            drop_caches()
        start = time.perf_counter()
        if cold and epoch > 0:
            loader = make()
        loader.sampler.set_epoch(epoch)
        n_samples = sum(len(x) for x, _, _ in loader)
        if epoch > 0:
            rates.append(n_samples / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each timed epoch (root)")
    parser.add_argument("--dtype", choices=[d.value for d in TensorDtype], default="float32")
    parser.add_argument("--cache", action="store_true", help="TensorDataset(cache=True), i.e. cache_samples")
    parser.add_argument("--modes", nargs="+", choices=[m.value for m in MODES], default=[m.value for m in MODES])
    parser.add_argument("--work-dir", type=Path, default=None, help="where the tensors go (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.cold and not drop_caches():
        parser.error("--cold needs root (writing /proc/sys/vm/drop_caches failed)")
    cfg = ExtractionConfig(slice_direction=SliceDirection.SAGITTAL, dtype=TensorDtype(args.dtype))
    work_dir = Path(tempfile.mkdtemp(prefix="bench_dataloader_", dir=args.work_dir))
    try:
        start = time.perf_counter()
        build_dataset(work_dir, args.n_images, cfg)
        print(
            f"built {args.n_images} images x {len(MODES)} modes ({args.dtype}) in {time.perf_counter() - start:.1f} s"
        )
        print(f"load average: {os.getloadavg()[0]:.2f} (1 min), cpus: {os.cpu_count()}")
        print(
            f"page cache: {'cold (dropped before each timed epoch)' if args.cold else 'warm'}; "
            f"workers: {args.workers}; cache_samples: {args.cache}; timed epochs: {args.epochs}"
        )
        header = f"{'mode':<6} {'samples':>7} {'batch':>5} {'loader/s':>10} {'raw/s':>10} {'ratio':>6} {'MB/s':>8}"
        print(header)
        for mode in (ExtractionMode(m) for m in args.modes):
            table = index_tensors(work_dir, mode)
            table["label"] = ["AD" if i % 2 else "CN" for i in range(len(table))]
            dataset = TensorDataset(
                table, mode, Task.CLASSIFICATION, label_encoding={"CN": 0, "AD": 1}, cache=args.cache
            )
            batch_size = BATCH_SIZES[mode]
            make = functools.partial(
                make_loader, dataset, batch_size=batch_size, seed=0, shuffle=True, num_workers=args.workers
            )
            rate = statistics.median(loader_rates(make, args.epochs, args.cold))
            order = sample_order(dataset, seed=0, epoch=1)
            paths = list(table["tensor_path"])
            raw = statistics.median(raw_rates(paths, dataset, order, batch_size, args))
            sample_mb = np.prod(dataset.read_sample(0).shape) * 4 / 1e6
            print(
                f"{mode.value:<6} {len(dataset):>7} {batch_size:>5} {rate:>10.1f} {raw:>10.1f} {rate / raw:>6.0%} "
                f"{rate * sample_mb:>8.0f}"
            )
        max_error, mean_error = float16_error()
        print(f"float16 storage error after min-max normalisation: max {max_error:.2e}, mean {mean_error:.2e}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
