"""Benchmark the participant level on already preprocessed 1 mm inputs (``-d``), QC and report included.

Generates ``--n-subjects`` x ``--n-sessions`` participants with the synthetic generator (``--preset realistic``:
1 mm, template-space images written as a BIDS derivative, cropped by the participant level to 169x208x179), then
prints three things:

1. **Whole participant level** (``python -m bids_app BIDS OUT participant -d DERIV ...`` in a subprocess, a fresh
   OUTPUT_DIR each time) in image mode, slice mode and all four modes, with 1 process and ``--nprocs 2``: wall
   seconds and seconds per image per process (``wall x processes / images``, the figure of issue 16: clinicadl
   1.6.1 ``prepare-data`` took 0.66 s per image per process in image mode, without QC and report).
2. **Tensor path alone**, in this process, one thread per library: read the preprocessed input, bring it to the
   cropped grid, normalise, cut (image mode), write the ``.npy`` and its sidecar with the checksum: median
   seconds per image (target < 0.3 s).
3. **Where the time goes**: the first participant run in this process under cProfile in all four modes
   (``-d``, 1 process), cumulative CPU seconds per image of reading/decompression, QC, checksums, extraction,
   writing and the report, and the 15 most expensive functions by own time.

Run: ``python benchmarks/bench_participant_preprocessed.py [--n-subjects 20] [--n-sessions 2] [--skip-cli]``;
before/after: ``git archive COMMIT bids_app | tar -x -C /tmp/old`` then add ``--source /tmp/old``: each run of the
old tree follows the same run of this one, so both see the same machine load.
Check ``uptime`` first: the figures are only as good as the machine is idle.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODE_SETS = {"image": ("image",), "slice": ("slice",), "all": ("image", "slice", "patch", "roi")}
# Breakdown rows: (label, [(file suffix, function name)...]); cumulative times, so a row may include another's
# (the checksums of tensors are computed while writing them, so "checksums" is also inside "writing").
BREAKDOWN = (
    ("reading + decompression", [("nifti_checks.py", "load_checked_nifti"), ("arrayproxy.py", "_get_scaled")]),
    ("placing on the template grid", [("template_space.py", "to_template_grid")]),
    ("QC", [("qc.py", "compute_qc")]),
    ("checksums (sha256)", [("~", "<method 'update' of '_hashlib.HASH' objects>")]),
    ("normalisation", [("image.py", "normalize_volume")]),
    ("extraction (cutting)", [("__init__.py", "extract_tensor")]),
    ("writing preprocessed NIfTI", [("loadsave.py", "save"), ("derivatives.py", "atomic_write_nifti")]),
    ("writing tensors + sidecars", [("storage.py", "write_tensor")]),
    ("report (figures + page)", [("report.py", "write_participant_report")]),
    ("participant job in all", [("job.py", "process_participant")]),
)


def _cli(bids_dir: Path, deriv_dir: Path, out: Path, modes: tuple[str, ...], roi_mask: Path, nprocs: int) -> list[str]:
    command = ["participant", "-d", str(deriv_dir), "--modes", *modes, "--nprocs", str(nprocs)]
    if "roi" in modes:
        command += ["--roi-mask", f"hippocampus={roi_mask}"]
    return [str(bids_dir), str(out), *command]


def _run_cli(args: list[str], source: Path | None) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, every child process) of one participant-level run."""
    env = {**os.environ, "PYTHONPATH": str(source)} if source else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # from the source tree's folder: ``python -m`` puts the working folder first on sys.path, before PYTHONPATH
    result = subprocess.run([sys.executable, "-m", "bids_app", *args], capture_output=True, text=True, check=False,
                            env=env, cwd=source)  # fmt: skip
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"The participant level failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _tensor_path_seconds(inputs: list[Path], out: Path, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds per image of: read → template grid → normalise → cut (image mode) → write the
    tensor and its sidecar with the checksum."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from bids_app.config import ExtractionConfig, ExtractionMode, PreprocessConfig
    from bids_app.extraction import extract_tensor, normalize_volume, write_tensor
    from bids_app.preprocess.t1_linear import load_template
    from bids_app.preprocess.template_space import TemplateGrid, load_preprocessed

    preprocess, extraction = PreprocessConfig(), ExtractionConfig()
    grid = TemplateGrid.from_template(load_template(preprocess), preprocess.crop_shape, preprocess.template_space)
    walls, cpus = [], []
    with threadpool_limits(limits=1):
        for _ in range(repeats):
            for k, path in enumerate(inputs):
                start, start_cpu = time.perf_counter(), time.process_time()
                space = path.name.split("_space-")[1].split("_")[0]
                image, _ = load_preprocessed(path, space, grid)
                volume = normalize_volume(np.asarray(image.dataobj, dtype=np.float32), extraction.normalization)
                tensor = extract_tensor(volume, ExtractionMode.IMAGE, extraction, None)
                write_tensor(out / f"sub-{k:03d}_desc-image_T1w.npy", tensor, {"Mode": "image", "Source": str(path)})
                walls.append(time.perf_counter() - start)
                cpus.append(time.process_time() - start_cpu)
    return statistics.median(walls), statistics.median(cpus)


def _cumulative(stats: pstats.Stats, file_suffix: str, name: str) -> float:
    total = 0.0
    for (filename, _, function), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if function == name and filename.endswith(file_suffix):
            total += cumulative
    return total


def _profile(bids_dir: Path, deriv_dir: Path, out: Path, roi_mask: Path, label: str, n_images: int) -> None:
    from bids_app.cli.main import main as cli_main

    args = [*_cli(bids_dir, deriv_dir, out, MODE_SETS["all"], roi_mask, 1), "--participant-label", label]
    profiler = cProfile.Profile(time.process_time)  # CPU seconds: less sensitive to other load
    with contextlib.redirect_stderr(io.StringIO()):
        profiler.enable()
        code = cli_main(args)
        profiler.disable()
    if code != 0:
        sys.exit(f"The profiled participant level failed (exit {code}).")
    stats = pstats.Stats(profiler)
    print(f"\nBreakdown, sub-{label} ({n_images} images, all four modes, 1 process, cProfile; seconds per image):")
    for row, functions in BREAKDOWN:
        seconds = sum(_cumulative(stats, f, n) for f, n in functions)
        print(f"  {row:32s} {seconds / n_images:6.3f}")
    print("  (cumulative CPU seconds; the checksums are also counted inside the writing rows)")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    print("\nTop functions by own time (whole run, imports and validation included):")
    print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-subjects", type=int, default=20)
    parser.add_argument("--n-sessions", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="passes of the tensor-path loop (default 1)")
    parser.add_argument("--skip-cli", action="store_true", help="only the tensor path and the profile")
    parser.add_argument("--source", type=Path, help="also run the participant level from this bids_app source tree "
                        "(e.g. an older commit: git archive COMMIT bids_app | tar -x -C DIR), each run next to this "
                        "tree's")  # fmt: skip
    parser.add_argument("--modes", nargs="+", choices=list(MODE_SETS), help="mode sets to run (default: all three)")
    args = parser.parse_args()
    from bids_app.synthetic.dataset import generate_dataset

    with tempfile.TemporaryDirectory(prefix="bench_preprocessed_") as folder:
        root = Path(folder)
        dataset = generate_dataset(root / "bids", n_subjects=args.n_subjects, n_sessions=args.n_sessions,
                                   preset="realistic", seed=3, preprocessed="derivative")  # fmt: skip
        assert dataset.derivative_dir is not None
        inputs = sorted(dataset.derivative_dir.rglob("*_desc-preproc_T1w.nii.gz"))
        n_images = len(inputs)
        print(f"{n_images} preprocessed 1 mm inputs ({args.n_subjects} participants x {args.n_sessions} sessions), "
              "cropped to 169x208x179")  # fmt: skip
        summary: list[str] = []
        if not args.skip_cli:
            trees: list[tuple[str, Path | None]] = [("this tree", None)]
            if args.source:
                trees.append(("--source", args.source))  # interleaved: both see the same machine load
            print(f"\n{'tree':10} {'modes':6} {'procs':>5} {'wall s':>8} {'s/image/process':>16} {'CPU s/image':>12}")
            for name, modes in MODE_SETS.items():
                if args.modes and name not in args.modes:
                    continue
                for nprocs in (1, 2):
                    for tree, source in trees:
                        out = root / f"out_{name}_{nprocs}_{len(source.parts) if source else 0}"
                        wall, cpu = _run_cli(_cli(dataset.bids_dir, dataset.derivative_dir, out, modes,
                                                  dataset.roi_mask_path, nprocs), source)  # fmt: skip
                        print(f"{tree:10} {name:6} {nprocs:5d} {wall:8.1f} {wall * nprocs / n_images:16.3f} "
                              f"{cpu / n_images:12.3f}", flush=True)  # fmt: skip
                        per_process = wall * nprocs / n_images
                        summary.append(f"participant level, s per image per process (wall): {per_process:.3f} "
                                       f"({tree}, {name} mode(s), {nprocs} process(es); CPU {cpu / n_images:.3f} "
                                       "s per image, all processes)")  # fmt: skip
            print("(issue 16: clinicadl prepare-data, image mode, no QC/report: 0.66 s per image per process)")
        wall, cpu = _tensor_path_seconds(inputs, root / "tensors", args.repeats)
        print(f"\nTensor path alone (read, template grid, normalise, cut image mode, write + sidecar): {wall:.3f} s "
              f"per image, {cpu:.3f} s CPU (target < 0.3 s)")  # fmt: skip
        summary.append(f"tensor path alone, s per image: {wall:.3f} (wall; CPU {cpu:.3f}; target < 0.3)")
        print("\nThe figures of issue 16 (targets: participant level < 0.66 s per image per process, image mode, "
              "2 processes, idle machine; tensor path < 0.3 s):")  # fmt: skip
        print("\n".join(f"  {line}" for line in summary))
        label = inputs[0].name.split("_")[0].removeprefix("sub-")
        n_profiled = sum(1 for p in inputs if p.name.startswith(f"sub-{label}_"))
        _profile(dataset.bids_dir, dataset.derivative_dir, root / "out_profile", dataset.roi_mask_path, label,
                 n_profiled)  # fmt: skip


if __name__ == "__main__":
    main()
