"""Benchmark the participant report: seconds per report, by figure, on a generated dataset.

Generates ``--n-subjects`` participants with the synthetic generator (``--preset tiny``: 4 mm; ``realistic``: 1 mm),
runs the participant level once (t1-linear, then image, slice, patch and roi tensors), then writes each
participant's report ``--repeats`` times in this process and prints the median seconds per report, and per
figure kind (before/after, mosaic, network-input strips), with the page size.

Run: ``python benchmarks/bench_participant_report.py [--n-subjects 6] [--preset tiny] [--repeats 3]``.
Check ``uptime`` first: the figures are only as good as the machine is idle.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib

from bids_app.participant import report
from bids_app.preprocess.qc import compute_qc
from bids_app.preprocess.t1_linear import crop_box, crop_image
from bids_app.synthetic.dataset import generate_dataset

MODES = ("image", "slice", "patch", "roi")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-subjects", type=int, default=6)
    parser.add_argument("--preset", choices=("tiny", "realistic"), default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        dataset = generate_dataset(root / "bids", n_subjects=args.n_subjects, n_sessions=1, preset=args.preset, seed=3)
        out = root / "out"
        tiny = args.preset == "tiny"
        command = [sys.executable, "-m", "bids_app", str(dataset.bids_dir), str(out), "participant",
                   "--modes", *MODES, "--roi-mask", f"hippocampus={dataset.roi_mask_path}", "--nprocs", "1",
                   *(("--template", str(dataset.template_path), "--crop-shape", "40", "48", "40", "--patch-size",
                      "16", "--stride", "16", "--discarded-slices", "8") if tiny else ())]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            sys.exit(f"The participant level failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        template = nib.load(dataset.template_path)
        crop_shape = (40, 48, 40) if tiny else (169, 208, 179)
        template_crop = crop_image(template, crop_box(template, crop_shape))
        timings: dict[str, list[float]] = {"report": [], "before-after": [], "mosaic": [], "network inputs": []}
        sizes = []
        for subject in sorted(out.glob("sub-*/")):
            label = subject.name.removeprefix("sub-")
            for preproc in sorted(subject.glob("ses-*/anat/*_desc-preproc_T1w.nii.gz")):
                session = preproc.parent.parent.name.removeprefix("ses-")
                image = nib.load(preproc)
                folder_dl = preproc.parent.parent / "deeplearning"
                entry = report.ReportEntry(
                    session, "T1w", image, template_crop, compute_qc(image, template_crop),
                    raw_path=dataset.bids_dir / subject.name / f"ses-{session}" / "anat"
                    / f"{subject.name}_ses-{session}_T1w.nii.gz",
                    tensor_paths={m: next(folder_dl.glob(f"*_desc-{m}_T1w.npy")) for m in MODES},
                )  # fmt: skip
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    report.write_participant_report(root / "bench" / f"{label}.html", label, [entry])
                    timings["report"].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    registered = report._Registered(entry)
                    report._before_after(entry, registered)
                    timings["before-after"].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    report._mosaic(registered)
                    timings["mosaic"].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    for mode, path in entry.tensor_paths.items():
                        report._network_input(mode, path, registered.geometry)
                    timings["network inputs"].append(time.perf_counter() - start)
                sizes.append((root / "bench" / f"{label}.html").stat().st_size)
        print(f"{len(sizes)} image(s), preset {args.preset}, {args.repeats} repeat(s); median seconds:")
        for name, values in timings.items():
            print(f"  {name:15s} {statistics.median(values):.3f} s")
        print(f"  page size       {statistics.median(sizes) / 1024:.0f} kB per one-image report")


if __name__ == "__main__":
    main()
