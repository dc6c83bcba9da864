"""Does the network find what a linear model finds? Balanced accuracy against effect size, per mode and settings.

For each effect size, the script generates a cohort with the project's generator (``bids_app-generate``, ``medium``
preset: 2 mm, template-space images written as a derivative so no registration is needed), draws the ROI mask a
user would draw (spheres of ``--radius-mm`` around MNI coordinates of both hippocampi, NOT the generator's own
atrophy mask), runs the participant level once per intensity normalisation, then for every seed, mode and
setting trains through the real group-level CLI and fits a logistic-regression baseline on the very same tensors
and the same subject-level splits (read back from the model folder's ``groups/``). The baseline's C is chosen
on the validation fold only; the test fold is touched once, to score it. (The group level's own linear baseline
is turned off with ``--no-linear-baseline``: this one is fitted here, identically for every setting.)

Settings (``--settings``): ``script`` is what ``benchmarks/e2e_realistic.sh`` and the demo used to pass
(lr 0.003, batch 4, 30 epochs), ``old`` the defaults before the sweep (min-max per image, lr 1e-4, dropout
0.5, batch 8, 20 epochs), ``new`` whatever ``bids_app.config`` holds now (no flag passed). More settings for an
investigation: ``--custom NAME:key=value,key=value`` (keys: ``normalization``, ``learning_rate``,
``batch_size``, ``epochs``, ``dropout``, ``weight_decay``, ``optimizer``, ``class_weighted_sampling``).

Printed: one row per (effect size, seed, mode, architecture, setting) as it finishes, then a summary over seeds
and splits (mean, min-max, n = test participants per run x runs), also written to ``WORK_DIR/results.tsv`` and
``WORK_DIR/summary.tsv``. ``roi_d`` is Cohen's d of the mean ROI intensity between the classes (min-max
tensors, all participants): the effect size a user would measure. Completed runs are reused when the script is
started again on the same WORK_DIR with the same options (``--fresh`` starts over).

Quick (about 3 min on 2 busy cores)::

    python benchmarks/bench_effect_sweep.py --quick

What docs/performance.md reports (about 25 min, then 15 min, on 2 busy cores)::

    python benchmarks/bench_effect_sweep.py --modes roi --settings script old new --seeds 0 1
    python benchmarks/bench_effect_sweep.py --effect-sizes 0.2 --modes image --settings old new
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HIPPOCAMPI_MNI_MM = ((-26.0, -22.0, -14.0), (26.0, -22.0, -14.0))  # a user's coordinates, not the generator's
CROP_SHAPE_2MM = ("84", "104", "88")  # the t1-linear 169 x 208 x 179 crop, halved
DEFAULT_ARCHITECTURES = {"roi": "conv4_fc3", "image": "conv5_fc3", "slice": "conv4_fc3"}
C_GRID = tuple(10.0**k for k in range(-4, 3))
SETTING_FLAGS = {
    "learning_rate": "--learning-rate",
    "batch_size": "--batch-size",
    "epochs": "--epochs",
    "dropout": "--dropout",
    "weight_decay": "--weight-decay",
    "optimizer": "--optimizer",
}
BUILTIN_SETTINGS = {
    "script": {"normalization": "minmax", "learning_rate": "0.003", "batch_size": "4", "epochs": "30"},
    "old": {"normalization": "minmax", "learning_rate": "1e-4", "dropout": "0.5", "batch_size": "8", "epochs": "20"},
    "new": {},
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """A named set of options: ``normalization`` goes to the participant level, the rest to the group level."""

    name: str
    options: dict[str, str]

    def normalization(self) -> str:
        from bids_app.config import ExtractionConfig

        return self.options.get("normalization", ExtractionConfig().normalization.value)

    def group_flags(self) -> list[str]:
        flags: list[str] = []
        for key, value in self.options.items():
            if key == "class_weighted_sampling":
                flags += ["--class-weighted-sampling"] if value.lower() in ("1", "true", "yes") else []
            elif key != "normalization":
                flags += [SETTING_FLAGS[key], value]
        return flags

    def describe(self) -> str:
        from bids_app.config import ExtractionConfig, TrainConfig

        train, extraction = TrainConfig(), ExtractionConfig()
        resolved = {
            "norm": self.options.get("normalization", extraction.normalization.value),
            "lr": self.options.get("learning_rate", f"{train.learning_rate:g}"),
            "bs": self.options.get("batch_size", str(train.batch_size)),
            "ep": self.options.get("epochs", str(train.epochs)),
            "drop": self.options.get("dropout", f"{train.dropout:g}"),
        }
        extra = {k: v for k, v in self.options.items() if k in ("weight_decay", "optimizer", "class_weighted_sampling")}
        return " ".join(f"{k}={v}" for k, v in {**resolved, **extra}.items())


def parse_custom(text: str) -> Setting:
    """``NAME:key=value,key=value`` → Setting (keys checked here, before any work)."""
    name, _, body = text.partition(":")
    options = dict(item.split("=", 1) for item in body.split(",") if item)
    allowed = {*SETTING_FLAGS, "normalization", "class_weighted_sampling"}
    unknown = sorted(set(options) - allowed)
    if not name or unknown:
        raise SystemExit(
            f"--custom {text!r}: give NAME:key=value,...; unknown keys {unknown}; allowed {sorted(allowed)}"
        )
    return Setting(name, options)


def run(command: list[str], log_path: Path) -> None:
    """Run a command, its output into ``log_path``; stop the benchmark with the log's tail when it fails."""
    with log_path.open("w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise SystemExit(
            f"{' '.join(command[:4])} ... failed ({result.returncode}); see {log_path}:\n" + "\n".join(tail)
        )


def write_sphere_mask(template_path: Path, mask_path: Path, radius_mm: float) -> int:
    """Binary mask on the template grid: voxels within ``radius_mm`` of either hippocampal coordinate."""
    import nibabel as nib

    template = nib.Nifti1Image.from_filename(template_path)
    ijk = np.indices(template.shape[:3]).reshape(3, -1).T
    xyz = nib.affines.apply_affine(template.affine, ijk)
    inside = np.zeros(len(xyz), dtype=bool)
    for center in HIPPOCAMPI_MNI_MM:
        inside |= np.linalg.norm(xyz - np.array(center), axis=1) <= radius_mm
    mask = inside.reshape(template.shape[:3]).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, template.affine), mask_path)
    return int(mask.sum())


def prepare_cohort(args: argparse.Namespace, effect: float, normalizations: set[str]) -> tuple[Path, dict[str, Path]]:
    """Generate the cohort of one effect size and run the participant level once per normalisation."""
    root = args.work_dir / f"effect-{effect:g}"
    bids = root / "bids"
    if not (bids / "participants.tsv").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        run([sys.executable, "-m", "bids_app.cli.generate", str(bids), "--preset", "medium", "--n-subjects",
             str(args.n_subjects), "--n-sessions", "1", "--seed", str(args.data_seed), "--effect-size", str(effect),
             "--preprocessed", "derivative"], root / "generate.log")  # fmt: skip
    template = next((bids / "code" / "template").glob("tpl-*_res-2mm_T1w.nii.gz"))
    mask = root / "hippocampi_spheres_mask.nii.gz"
    if not mask.is_file():
        write_sphere_mask(template, mask, args.radius_mm)
    outputs = {}
    for norm in sorted(normalizations):
        out = root / f"out-{norm}"
        first = out / "sub-001" / "ses-M000" / "deeplearning"
        if not all(any(first.glob(f"*desc-{mode}_T1w.npy")) for mode in args.modes):  # a new mode: run again
            run([sys.executable, "-m", "bids_app", str(bids), str(out), "participant", "-d",
                 str(bids / "derivatives" / "preproc"), "--template", str(template), "--crop-shape", *CROP_SHAPE_2MM,
                 "--nprocs", "2", "--modes", *args.modes, "--roi-mask", f"hippocampi={mask}", "--normalization", norm,
                 "--seed", "0"], root / f"participant-{norm}.log")  # fmt: skip
        outputs[norm] = out
    return bids, outputs


def tensor_path(out: Path, participant: str, session: str, mode: str) -> Path:
    folder = out / participant / session / "deeplearning"
    return next(folder.glob(f"{participant}_{session}_*desc-{mode}_T1w.npy"))


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def load_group(out: Path, rows: list[dict[str, str]], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Flattened tensors ``(n_images, n_features)`` and labels (1 = AD) of a split file's rows."""
    x = np.stack([np.load(tensor_path(out, r["participant_id"], r["session_id"], mode)).ravel() for r in rows])
    y = np.array([r["label"] == "AD" for r in rows], dtype=int)
    return x.astype(np.float64), y


def fit_baseline(out: Path, maps: Path, split: int, mode: str) -> tuple[float, float, float]:
    """Logistic regression on one split: C chosen on validation BA (ties: validation log-loss), scored on test.

    Returns:
        ``(test balanced accuracy, validation balanced accuracy, chosen C)``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    groups = maps / "groups"
    x_train, y_train = load_group(out, read_rows(groups / f"split-{split}" / "train.tsv"), mode)
    x_val, y_val = load_group(out, read_rows(groups / f"split-{split}" / "validation.tsv"), mode)
    x_test, y_test = load_group(out, read_rows(groups / "test" / "data.tsv"), mode)
    scaler = StandardScaler().fit(x_train)
    x_train, x_val, x_test = (scaler.transform(x) for x in (x_train, x_val, x_test))
    best: tuple[float, float, float, LogisticRegression] | None = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=5000).fit(x_train, y_train)
        score = balanced_accuracy(y_val, model.predict(x_val))
        loss = log_loss(y_val, model.predict_proba(x_val), labels=[0, 1])
        if best is None or (score, -loss) > (best[0], -best[1]):
            best = (score, loss, c, model)
    assert best is not None
    return balanced_accuracy(y_test, best[3].predict(x_test)), best[0], best[2]


def roi_cohens_d(out: Path, bids: Path) -> float:
    """Cohen's d (AD vs CN) of the mean of the ROI tensor's non-zero voxels, every participant."""
    rows = read_rows(bids / "participants.tsv")
    means: dict[str, list[float]] = {"AD": [], "CN": []}
    for r in rows:
        tensor = np.load(tensor_path(out, r["participant_id"], "ses-M000", "roi"))
        means[r["diagnosis"]].append(float(tensor[tensor != 0].mean()))
    ad, cn = np.array(means["AD"]), np.array(means["CN"])
    pooled = math.sqrt((ad.var(ddof=1) + cn.var(ddof=1)) / 2)
    return float((cn.mean() - ad.mean()) / pooled)


def network_results(maps: Path, split: int) -> tuple[float, int, float, float]:
    """(test BA of best-loss, n test participants, first and last epoch's training loss) of one split."""
    metrics = read_rows(maps / f"split-{split}" / "best-loss" / "test" / "test_image_level_metrics.tsv")
    row = next(r for r in metrics if r["metric"] == "balanced_accuracy")
    log = read_rows(maps / f"split-{split}" / "training_logs" / "training.tsv")
    return float(row["value"]), int(row["n_participants"]), float(log[0]["train_loss"]), float(log[-1]["train_loss"])


def train(args: argparse.Namespace, bids: Path, out: Path, name: str, mode: str, arch: str, setting: Setting,
          seed: int) -> tuple[Path, float]:  # fmt: skip
    """Train one model through the group-level CLI (reused when its last split's test metrics exist)."""
    maps = out / "models" / name
    done = maps / f"split-{args.n_splits - 1}" / "best-loss" / "test" / "test_image_level_metrics.tsv"
    if done.is_file():
        return maps, float("nan")
    start = time.monotonic()
    run([sys.executable, "-m", "bids_app", str(bids), str(out), "group", "--label", "diagnosis", "--task",
         "classification", "--mode", mode, "--architecture", arch, "--n-splits", str(args.n_splits), "--test-size",
         str(args.test_size), "--model-name", name, "--seed", str(seed), "--omp-nthreads", str(args.omp_nthreads),
         "--overwrite", "--no-linear-baseline", *setting.group_flags()], out / f"{name}.log")  # fmt: skip
    return maps, time.monotonic() - start


RESULT_COLUMNS = ("effect_size", "roi_d", "seed", "split", "mode", "architecture", "setting", "settings",
                  "baseline_ba", "baseline_val_ba", "baseline_c", "network_ba", "n_test", "train_loss_first",
                  "train_loss_last", "train_s")  # fmt: skip


def summarise(results: list[dict[str, object]]) -> list[dict[str, str]]:
    """Mean and range over seeds and splits per (effect size, mode, architecture, setting)."""
    keys: dict[tuple[object, ...], list[dict[str, object]]] = {}
    for r in results:
        keys.setdefault((r["effect_size"], r["mode"], r["architecture"], r["setting"]), []).append(r)
    rows = []
    for (effect, mode, arch, setting), group in keys.items():
        base = np.array([float(r["baseline_ba"]) for r in group])  # type: ignore[arg-type]
        net = np.array([float(r["network_ba"]) for r in group])  # type: ignore[arg-type]
        stuck = sum(abs(float(r["train_loss_last"]) - math.log(2)) < 0.02 for r in group)  # type: ignore[arg-type]
        rows.append({
            "effect_size": f"{effect}", "roi_d": f"{group[0]['roi_d']:.2f}", "mode": str(mode),
            "architecture": str(arch), "setting": str(setting), "settings": str(group[0]["settings"]),
            "baseline_ba": f"{base.mean():.2f} [{base.min():.2f}-{base.max():.2f}]",
            "network_ba": f"{net.mean():.2f} [{net.min():.2f}-{net.max():.2f}]",
            "gap": f"{net.mean() - base.mean():+.2f}", "stuck_at_ln2": f"{stuck}/{len(group)}",
            "n": f"{group[0]['n_test']} x {len(group)}",
        })  # fmt: skip
    return rows


def print_table(rows: list[dict[str, str]], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths, strict=True)), flush=True)


def write_tsv(path: Path, rows: list[dict[str, object]] | list[dict[str, str]], columns: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bids_app_effect_sweep"))
    parser.add_argument("--effect-sizes", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                        help="generator --effect-size values (default 0.05 0.1 0.2)")  # fmt: skip
    parser.add_argument("--n-subjects", type=int, default=40, help="participants per cohort, half AD (default 40)")
    parser.add_argument("--modes", nargs="+", default=["roi", "image"], choices=sorted(DEFAULT_ARCHITECTURES))
    parser.add_argument("--architectures", nargs="+", default=[],
                        help="MODE=ARCH pairs overriding the defaults " + str(DEFAULT_ARCHITECTURES))  # fmt: skip
    parser.add_argument(
        "--settings", nargs="+", default=["old", "new"], help="built-in: script old new (default old new)"
    )
    parser.add_argument("--custom", nargs="+", default=[], type=parse_custom, help="NAME:key=value,... (also run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="group-level seeds: test set, folds, init")
    parser.add_argument("--data-seed", type=int, default=7, help="generator seed (default 7)")
    parser.add_argument("--n-splits", type=int, default=1, help="group --n-splits (default 1)")
    parser.add_argument("--test-size", type=float, default=0.25, help="group --test-size (default 0.25)")
    parser.add_argument("--radius-mm", type=float, default=10.0, help="sphere radius (default 10 mm)")
    parser.add_argument("--omp-nthreads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="effect 0.2 and 0.4, roi only, seed 0: a few minutes")
    parser.add_argument("--fresh", action="store_true", help="remove WORK_DIR first")
    args = parser.parse_args(argv)
    if args.quick:
        args.effect_sizes, args.modes, args.seeds = [0.2, 0.4], ["roi"], [0]
    for name in args.settings:
        if name not in BUILTIN_SETTINGS:
            parser.error(f"unknown setting {name!r}; built-in: {', '.join(BUILTIN_SETTINGS)} (or --custom)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.fresh:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    architectures = dict(DEFAULT_ARCHITECTURES, **dict(pair.split("=", 1) for pair in args.architectures))
    settings = [Setting(n, BUILTIN_SETTINGS[n]) for n in args.settings] + list(args.custom)
    normalizations = {s.normalization() for s in settings} | {"minmax"}  # min-max tensors also give roi_d
    results: list[dict[str, object]] = []
    print("  ".join(RESULT_COLUMNS), flush=True)
    for effect in args.effect_sizes:
        bids, outputs = prepare_cohort(args, effect, normalizations)
        d = roi_cohens_d(outputs["minmax"], bids) if "roi" in args.modes else float("nan")
        for seed in args.seeds:
            for mode in args.modes:
                arch = architectures[mode]
                baselines: dict[tuple[str, int], tuple[float, float, float]] = {}
                for setting in settings:
                    norm = setting.normalization()
                    name = f"{mode}-{arch}-{setting.name}-s{seed}"
                    maps, seconds = train(args, bids, outputs[norm], name, mode, arch, setting, seed)
                    for split in range(args.n_splits):
                        if (norm, split) not in baselines:  # same tensors and splits: one fit serves every setting
                            baselines[(norm, split)] = fit_baseline(outputs[norm], maps, split, mode)
                        base_ba, base_val, base_c = baselines[(norm, split)]
                        net_ba, n_test, loss_first, loss_last = network_results(maps, split)
                        row = dict(zip(RESULT_COLUMNS, (effect, d, seed, split, mode, arch, setting.name,
                                   setting.describe(), base_ba, base_val, base_c, net_ba, n_test, loss_first, loss_last,
                                   seconds), strict=True))  # fmt: skip
                        results.append(row)
                        cells = (f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values())
                        print("  ".join(cells), flush=True)
    write_tsv(args.work_dir / "results.tsv", results, list(RESULT_COLUMNS))
    summary = summarise(results)
    columns = ["effect_size", "roi_d", "mode", "architecture", "setting", "settings", "baseline_ba", "network_ba",
               "gap", "stuck_at_ln2", "n"]  # fmt: skip
    write_tsv(args.work_dir / "summary.tsv", summary, columns)
    print(
        "\nSummary (test balanced accuracy, mean [min-max] over seeds x splits; n = test participants x runs); "
        f"{args.n_subjects} participants, 2 mm, spheres of {args.radius_mm:g} mm around {HIPPOCAMPI_MNI_MM}:"
    )
    print_table(summary, columns)
    print(f"\nWritten: {args.work_dir / 'results.tsv'}, {args.work_dir / 'summary.tsv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
