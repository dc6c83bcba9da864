"""Benchmark tensor extraction on one t1-linear-sized image (169x208x179 float32), single thread.

Prints, per mode (image, patch, slice, roi with two masks): seconds per image for cutting + writing (npy and
sidecar, fsync'd), files and MB written per image; the one-off per-image costs (reading the NIfTI, normalising,
aligning the masks); and the cost of reading ONE slice / ONE patch from the memory-mapped tensor against reading
a whole tensor, cold (page cache dropped for the file) and warm, with the bytes actually read from disk
(``/proc/self/io``; an mmap read also pulls the kernel's read-ahead window, see
``/sys/block/<dev>/queue/read_ahead_kb``, while ``load_part`` reads exactly one part).

Run: ``python benchmarks/bench_extraction.py [--repeats 5] [--dtype float32|float16]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from threadpoolctl import threadpool_limits

from bids_app.config import ExtractionConfig, ExtractionMode, TensorDtype
from bids_app.extraction import (
    extract_tensor,
    load_part,
    load_roi_masks,
    load_tensor,
    load_volume,
    mode_parameters,
    write_tensor,
)

SHAPE = (169, 208, 179)
AFFINE = np.array([[1.0, 0, 0, -84], [0, 1.0, 0, -120], [0, 0, 1.0, -70], [0, 0, 0, 1]])


def _synthetic_brain(seed: int = 0) -> np.ndarray:
    """An ellipsoidal 'brain' with smooth contrast and noise, zero background, float32 intensities."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in SHAPE), indexing="ij"))
    radius = np.sqrt((grid[0] / 0.8) ** 2 + (grid[1] / 0.85) ** 2 + (grid[2] / 0.8) ** 2)
    brain = radius < 1
    volume = (400 + 300 * np.cos(6 * radius) + rng.normal(0, 20, SHAPE)).astype(np.float32)
    volume[~brain] = 0
    return volume


def _ellipsoid_mask(centre: tuple[int, int, int], semi_axes: tuple[int, int, int]) -> np.ndarray:
    grid = np.indices(SHAPE, dtype=np.float32)
    dist = sum(((grid[i] - centre[i]) / semi_axes[i]) ** 2 for i in range(3))
    return (dist <= 1).astype(np.uint8)


def _median_seconds(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cut_and_write(
    volume: np.ndarray,
    mode: ExtractionMode,
    cfg: ExtractionConfig,
    masks: dict[str, np.ndarray],
    path: Path,
    sidecar: dict[str, Any],
) -> None:
    write_tensor(path, extract_tensor(volume, mode, cfg, masks), sidecar)


def _disk_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return -1


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # pages are clean: write_tensor fsync'd them
    finally:
        os.close(fd)


def _timed_read(path: Path, read: Callable[[], np.ndarray], cold: bool) -> tuple[float, int, int]:
    """Seconds, bytes of the result, bytes read from disk (cold only)."""
    if cold:
        _drop_cache(path)
    before = _disk_read_bytes()
    start = time.perf_counter()
    result = read()
    seconds = time.perf_counter() - start
    return seconds, result.nbytes, _disk_read_bytes() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=[d.value for d in TensorDtype], default="float32")
    args = parser.parse_args()

    with threadpool_limits(limits=1), tempfile.TemporaryDirectory(prefix="bench_extraction_") as tmp:
        root = Path(tmp)
        image_path = root / "sub-01_space-MNI_desc-preproc_T1w.nii.gz"
        nib.save(nib.Nifti1Image(_synthetic_brain(), AFFINE), image_path)
        mask_specs = {"left_hippocampus": (60, 95, 60), "right_hippocampus": (109, 95, 60)}
        roi_masks = []
        for name, centre in mask_specs.items():
            mask_path = root / f"{name}_mask.nii.gz"
            nib.save(nib.Nifti1Image(_ellipsoid_mask(centre, (10, 20, 12)), AFFINE), mask_path)
            roi_masks.append((name, mask_path))
        cfg = dataclasses.replace(
            ExtractionConfig(), roi_masks=tuple(roi_masks), dtype=TensorDtype(args.dtype), modes=tuple(ExtractionMode)
        )

        load_s = _median_seconds(lambda: load_volume(image_path, cfg.normalization), args.repeats)
        img, volume = load_volume(image_path, cfg.normalization)
        align_s = _median_seconds(lambda: load_roi_masks(cfg.roi_masks, img), args.repeats)
        masks = load_roi_masks(cfg.roi_masks, img)

        print(f"volume {SHAPE} float32, stored as {cfg.dtype.value}, {args.repeats} repeats (median), 1 thread")
        print(f"read NIfTI (.nii.gz) + min-max normalise : {load_s:6.3f} s per image")
        print(f"read + align 2 ROI masks (.nii.gz)       : {align_s:6.3f} s per image")
        print()
        print(f"{'mode':6} {'tensor shape':26} {'cut s':>7} {'cut+write s':>12} {'files':>6} {'MB':>7}")
        paths: dict[ExtractionMode, Path] = {}
        total_s = 0.0
        for mode in cfg.modes:
            out_dir = root / mode.value
            path = out_dir / f"sub-01_space-MNI_desc-{mode.value}_T1w.npy"
            sidecar = {"Mode": mode.value, "ModeParameters": mode_parameters(mode, cfg, list(masks))}
            cut_s = _median_seconds(functools.partial(extract_tensor, volume, mode, cfg, masks), args.repeats)
            cut_and_write = functools.partial(_cut_and_write, volume, mode, cfg, masks, path, sidecar)
            mode_s = _median_seconds(cut_and_write, args.repeats)
            total_s += mode_s
            files = sorted(out_dir.iterdir())
            megabytes = sum(f.stat().st_size for f in files) / 1e6
            shape = str(tuple(load_tensor(path).shape))
            print(f"{mode.value:6} {shape:26} {cut_s:7.3f} {mode_s:12.3f} {len(files):6d} {megabytes:7.2f}")
            paths[mode] = path
        print(f"{'all four modes (cut + write)':41} {total_s:6.3f} s per image")
        print(f"{'total incl. NIfTI read, normalise, masks':41} {total_s + load_s + align_s:6.3f} s per image")
        print()

        def one_slice() -> np.ndarray:
            return np.array(load_tensor(paths[ExtractionMode.SLICE])[64])

        def one_patch() -> np.ndarray:
            return np.array(load_tensor(paths[ExtractionMode.PATCH])[17])

        def one_slice_pread() -> np.ndarray:
            return load_part(paths[ExtractionMode.SLICE], 64)

        def one_patch_pread() -> np.ndarray:
            return load_part(paths[ExtractionMode.PATCH], 17)

        def whole_image() -> np.ndarray:
            return load_tensor(paths[ExtractionMode.IMAGE], mmap=False)

        def whole_slices() -> np.ndarray:
            return load_tensor(paths[ExtractionMode.SLICE], mmap=False)

        reads = [
            ("ONE slice, mmap", ExtractionMode.SLICE, one_slice),
            ("ONE patch, mmap", ExtractionMode.PATCH, one_patch),
            ("ONE slice, load_part", ExtractionMode.SLICE, one_slice_pread),
            ("ONE patch, load_part", ExtractionMode.PATCH, one_patch_pread),
            ("whole image tensor, np.load", ExtractionMode.IMAGE, whole_image),
            ("whole slice tensor, np.load", ExtractionMode.SLICE, whole_slices),
        ]
        print(f"{'read (incl. sidecar check)':30} {'cold ms':>8} {'warm ms':>8} {'result MB':>10} {'disk MB':>8}")
        for label, mode, read in reads:
            cold = [_timed_read(paths[mode], read, cold=True) for _ in range(args.repeats)]
            warm = [_timed_read(paths[mode], read, cold=False) for _ in range(args.repeats)]
            cold_ms = 1e3 * statistics.median(c[0] for c in cold)
            warm_ms = 1e3 * statistics.median(w[0] for w in warm)
            disk_mb = statistics.median(c[2] for c in cold) / 1e6
            print(f"{label:30} {cold_ms:8.2f} {warm_ms:8.2f} {cold[0][1] / 1e6:10.3f} {disk_mb:8.3f}")


if __name__ == "__main__":
    main()
