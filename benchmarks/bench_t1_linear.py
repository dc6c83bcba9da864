"""Benchmark t1-linear at 1 mm: seconds per stage with 1 and 2 ITK threads.

Stages: ``load`` (template, crop box, input checks, conversion to ANTs images), ``n4`` (bias correction on
the image shrunk by ``n4_shrink_factor``), ``registration`` (seeded ANTs ``AffineFast`` or ``Affine``),
``resample_crop`` (linear resampling onto the template grid and crop), ``qc``. The input is a participant
of the shared generator's ``realistic`` preset (176x208x176 native voxels at 1 mm) unless ``--t1w`` is given.

ITK fixes its thread count when ANTs is first imported, so each thread count runs in its own process.
Each repeat also prints a hash of the output image: with 1 thread the hashes of all repeats are equal.

Run: ``python benchmarks/bench_t1_linear.py [--threads 1 2] [--repeats 1] [--registration AffineFast]
[--n4-shrink-factor 4] [--t1w PATH]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STAGES = ("load", "n4", "registration", "resample_crop", "qc")


def _time_once(t1w_path: Path, registration: str, shrink: int, work_dir: Path, threads: int) -> dict[str, Any]:
    """One t1-linear run split into its stages (the same calls as ``run_t1_linear``)."""
    import numpy as np

    from bids_app.config import PreprocessConfig, Registration
    from bids_app.preprocess import t1_linear as t1
    from bids_app.preprocess.nifti_checks import load_checked_nifti
    from bids_app.preprocess.qc import compute_qc

    cfg = PreprocessConfig(registration=Registration(registration), n4_shrink_factor=shrink)
    ants = t1.import_ants(threads)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    template = t1.load_template(cfg)
    box = t1.crop_box(template, cfg.crop_shape)
    moving = t1.to_ants(load_checked_nifti(t1w_path), ants)
    fixed = t1.to_ants(template, ants)
    seconds["load"] = time.perf_counter() - start

    start = time.perf_counter()
    corrected = t1.correct_bias(moving, cfg.n4_shrink_factor, ants)
    seconds["n4"] = time.perf_counter() - start

    start = time.perf_counter()
    transform = t1.register_affine(fixed, corrected, registration, work_dir / "bench_", ants)
    seconds["registration"] = time.perf_counter() - start

    start = time.perf_counter()
    warped = t1.resample_to_grid(corrected, fixed, [transform], ants)
    image = t1.crop_image(t1.template_space_image(warped, np.asarray(template.affine), template), box)
    seconds["resample_crop"] = time.perf_counter() - start

    start = time.perf_counter()
    qc = compute_qc(image, t1.crop_image(template, box))
    seconds["qc"] = time.perf_counter() - start
    digest = hashlib.sha256(np.asarray(image.dataobj).tobytes()).hexdigest()[:12]
    return {
        "seconds": seconds,
        "correlation": qc["correlation_to_template"],
        "smoothed": qc["smoothed_correlation_to_template"],
        "sha256": digest,
    }


def _worker(args: argparse.Namespace) -> None:
    """Child process: fixed ITK thread count, prints one JSON line per repeat."""
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as work:
            result = _time_once(args.t1w, args.registration, args.n4_shrink_factor, Path(work), args.worker)
        print(json.dumps(result), flush=True)


def _participant(folder: Path) -> Path:
    from bids_app.synthetic.dataset import generate_dataset

    dataset = generate_dataset(folder / "bids", n_subjects=2, preset="realistic", seed=0)
    return sorted(dataset.bids_dir.glob("sub-*/ses-*/anat/*_T1w.nii.gz"))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--registration", choices=("AffineFast", "Affine"), default="AffineFast")
    parser.add_argument("--n4-shrink-factor", type=int, default=4)
    parser.add_argument("--t1w", type=Path, help="1 mm T1w to use (default: a generated participant)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    with tempfile.TemporaryDirectory() as folder:
        t1w = args.t1w or _participant(Path(folder))
        print(f"input {t1w.name}; {args.registration}; N4 shrink {args.n4_shrink_factor}; load {os.getloadavg()}")
        header = "threads  " + "  ".join(f"{s:>13}" for s in STAGES) + "  " + f"{'total':>7}  corr   smooth  sha256"
        print(header)
        for threads in args.threads:
            command = [sys.executable, __file__, "--worker", str(threads), "--t1w", str(t1w)]
            command += ["--repeats", str(args.repeats), "--registration", args.registration]
            command += ["--n4-shrink-factor", str(args.n4_shrink_factor)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            for line in output.splitlines():
                if not line.startswith("{"):
                    continue
                result = json.loads(line)
                stage_seconds = result["seconds"]
                cells = "  ".join(f"{stage_seconds[s]:13.1f}" for s in STAGES)
                total = sum(stage_seconds.values())
                figures = f"{result['correlation']:.3f}  {result['smoothed']:.3f}  {result['sha256']}"
                print(f"{threads:>7}  {cells}  {total:7.1f}  {figures}")
        print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
