"""Benchmark the training augmentations: milliseconds per sample for each transform of ``bids_app.data.augment``.

Times every transform alone, through ``Augmentation`` (the object training uses: fork of torch's generator,
seeding, the TorchIO call, conversion back to numpy) on

- a whole image of the t1-linear crop, 169x208x179 at 1 mm (``--shape`` to change it), and
- its middle coronal slice, 169x179 (TorchIO sees it as 169x179x1).

Each transform is forced to apply (probability 1) so that the figure is its cost when it runs; the expected cost
per training sample is that times its probability (the ``p`` column), which the table also prints. The sample is a
smooth random volume, z-scored inside a brain-sized ellipsoid with a zero background: the cost of these transforms
does not depend on the anatomy. Figures are medians over ``--repeats`` seeds, after one untimed call that builds
the transform (and imports TorchIO).

One thread by default, as in a DataLoader worker (torch sets 1 there); with ``--num-workers 0`` training augments
in the main process with all of torch's threads. On a loaded machine several threads can be far slower than one
(each parallel region waits for a free core).

Run: ``python benchmarks/bench_augment.py [--repeats 5] [--threads 1] [--shape 169 208 179]``. Check ``uptime``
first: the figures are only as good as the machine is idle.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy import ndimage

from bids_app.config import ExtractionMode, SliceDirection
from bids_app.data import augment


def make_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """``(1, X, Y, Z)`` float32: smooth noise z-scored inside an ellipsoid, 0 outside."""
    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=3)
    grid = np.indices(shape, dtype=np.float32)
    inside = sum(((g - (n - 1) / 2) / (0.42 * n)) ** 2 for g, n in zip(grid, shape, strict=True)) <= 1
    brain = volume[inside]
    out = np.zeros(shape, dtype=np.float32)
    out[inside] = (brain - brain.mean()) / brain.std()
    return out[np.newaxis]


def time_transform(name: str, sample: np.ndarray, mode: ExtractionMode, repeats: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of one augmented sample with transform ``name`` alone."""
    transform = augment.build_augmentation((name,), mode, SliceDirection.CORONAL)
    assert transform is not None
    transform(sample, 0)  # builds the TorchIO object
    wall, cpu = [], []
    for seed in range(1, repeats + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        transform(sample, seed)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and SimpleITK threads (1: what a DataLoader worker gets)"
    )
    parser.add_argument("--shape", type=int, nargs=3, default=(169, 208, 179))
    args = parser.parse_args()

    import SimpleITK

    torch.set_num_threads(args.threads)
    SimpleITK.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    probabilities = dict(augment.PROBABILITY)
    augment.PROBABILITY.clear()  # every transform applies: its cost when it runs
    augment._steps.cache_clear()

    image = make_volume(tuple(args.shape))
    coronal = np.ascontiguousarray(image[:, :, image.shape[2] // 2])  # (1, X, Z)
    print(
        f"image {tuple(image.shape[1:])}, slice {tuple(coronal.shape[1:])}; {args.threads} thread(s); median of "
        f"{args.repeats} seeds; ms per sample when the transform applies (wall, and CPU time of this process, "
        "which a loaded machine inflates less), and the expected CPU ms per training sample (x p)"
    )
    header = ("transform", "p", "image wall", "image cpu", "expected", "slice wall", "slice cpu", "expected")
    print(f"{header[0]:<18} {header[1]:>4}" + "".join(f" {h:>11}" for h in header[2:]))
    totals = [0.0, 0.0]
    for name in augment.AUGMENTATIONS:
        p = probabilities.get(name, 1.0)
        image_wall, image_cpu = time_transform(name, image, ExtractionMode.IMAGE, args.repeats)
        slice_wall, slice_cpu = time_transform(name, coronal, ExtractionMode.SLICE, max(args.repeats, 20))
        totals[0] += p * image_cpu
        totals[1] += p * slice_cpu
        figures = (image_wall, image_cpu, p * image_cpu, slice_wall, slice_cpu, p * slice_cpu)
        print(f"{name:<18} {p:>4.2g}" + "".join(f" {v:>11.1f}" for v in figures))
    print(f"{'all eleven':<18} {'':>4} {'':>11} {'':>11} {totals[0]:>11.1f} {'':>11} {'':>11} {totals[1]:>11.1f}")
    floor = time_transform("intensity_scaling", image, ExtractionMode.IMAGE, args.repeats)
    print(f"(intensity_scaling alone, the floor of the wrapper: copy, fork of the generator: {floor[0]:.1f} ms wall)")


if __name__ == "__main__":
    main()
