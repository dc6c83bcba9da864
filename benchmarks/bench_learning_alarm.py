"""Where the "did not learn" alarm's thresholds come from: training curves on random labels and on a real effect.

Generates a tiny cohort with an atrophy of ``--effect-size`` and, from the same seed, the same images with
random labels (``--random-labels``); runs the participant level for each (default settings), then the group
level (split and train, no test set) for each label set and learning rate, and prints per split what the alarm
(``bids_app.training.learning``) read from ``summary.json``: the chance-level training loss, the largest
relative drop below it of the 3-epoch running mean of the training loss (and of a single epoch), the relative
drop of the lowest validation loss below the validation set's best constant, the classes the best-loss model
predicts on validation, its balanced accuracy, and the verdict. docs/reliability.md holds the table.

Usage: python benchmarks/bench_learning_alarm.py WORK_DIR [--seed 5] [--lr 1e-3 3e-2] [--epochs 20]
(needs the environment: make env; a few minutes per learning rate on 2 free CPU cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

CROP = ("40", "48", "40")


def bids_app(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "bids_app", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"bids_app {' '.join(args[:3])} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--n-subjects", type=int, default=16)
    parser.add_argument("--n-sessions", type=int, default=1)
    parser.add_argument("--effect-size", type=float, default=0.8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-2])
    parser.add_argument("--architecture", default="conv5_fc3")
    parser.add_argument("--n-splits", type=int, default=2)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()

    from bids_app.synthetic.dataset import generate_dataset

    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    datasets = {}
    for name, random_labels in (("real", False), ("random", True)):
        datasets[name] = generate_dataset(work / name, n_subjects=args.n_subjects, n_sessions=args.n_sessions,
                                          preset="tiny", seed=args.seed, effect_size=args.effect_size,
                                          random_labels=random_labels, preprocessed="derivative")  # fmt: skip
    print("seed labels lr epochs split chance train_drop(raw_max) validation_drop best-loss_classes best-loss_BA "
          "status")  # fmt: skip
    for name, dataset in datasets.items():
        out = work / f"out-{name}"
        bids_app(str(dataset.bids_dir), str(out), "participant", "-d", str(dataset.derivative_dir),
                 "--template", str(dataset.template_path), "--crop-shape", *CROP, "--modes", "image",
                 "--skip-bids-validation")  # fmt: skip
        for lr in args.lr:
            model = f"{name}-lr{lr:g}".replace(".", "p")
            bids_app(str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--mode", "image",
                     "--architecture", args.architecture, "--epochs", str(args.epochs), "--batch-size",
                     str(args.batch_size), "--learning-rate", str(lr), "--n-splits", str(args.n_splits),
                     "--test-size", "0", "--model-name", model, "--seed", str(args.seed), "--skip-bids-validation",
                     "--selection-metrics", "loss", "balanced_accuracy", "--stages", "split", "train")  # fmt: skip
            for split_dir in sorted((out / "models" / model).glob("split-*")):
                history = pd.read_csv(split_dir / "training_logs/training.tsv", sep="\t")
                summary = json.loads((split_dir / "training_logs/summary.json").read_text())
                learning = summary["learning"]
                chance = learning["chance_loss"]
                raw = float(((chance - history["train_loss"]) / chance).max())
                row = history.loc[history["epoch"] == summary["best"]["loss"]["epoch"]].iloc[0]
                print(f"{args.seed} {name} {lr:g} {args.epochs} {split_dir.name} {chance:.4f} "
                      f"{learning['train_loss_drop']:+.3f}({raw:+.3f}) {learning['validation_loss_drop']:+.3f} "
                      f"{row['validation_n_predicted_classes']:g} {row['validation_balanced_accuracy']:.2f} "
                      f"{learning['status']}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
