"""The "did not learn" alarm: the diagnosis on synthetic curves, and whole trainings on random and real labels."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_app.config import ExtractionMode, Task
from bids_app.maps import Maps
from bids_app.maps.folder import LearningStatus, MapsLayout
from bids_app.maps.splits import Fold, Splits
from bids_app.training.learning import MIN_TRAIN_DROP, chance_loss, diagnose_learning, train_loss_drop
from tests.conftest import make_cohort, run_cli
from tests.training.test_train import make_config, make_data, train

LN2 = math.log(2)


def history(train_losses: list[float], **columns: list[float]) -> list[dict[str, float]]:
    """``training.tsv`` rows: one per epoch, with ``validation_<name>`` columns."""
    rows = []
    for epoch, loss in enumerate(train_losses):
        row = {"epoch": epoch, "learning_rate": 1e-4, "train_loss": loss, "validation_loss": LN2}
        row |= {f"validation_{name}": values[epoch] for name, values in columns.items()}
        rows.append(row)
    return rows


# -- the diagnosis ----------------------------------------------------------------------------------------


def test_flat_at_ln2_is_an_alarm() -> None:
    rng = np.random.default_rng(0)
    losses = list(LN2 + rng.normal(0, 0.02, 20))  # noise of a tiny training set, a 6 % dip in one epoch
    losses[7] = LN2 * 0.94
    verdict = diagnose_learning(Task.CLASSIFICATION, history(losses, n_predicted_classes=[2] * 20), LN2, {"loss": 5})
    assert verdict is not None and verdict.status is LearningStatus.DID_NOT_LEARN
    assert "chance level" in verdict.reason and "0.6931" in verdict.reason
    assert "--learning-rate" in verdict.advice and "baseline" in verdict.advice
    assert verdict.chance_loss == pytest.approx(LN2)


def test_a_loss_above_chance_is_an_alarm() -> None:
    """A learning rate too high: the loss jumps around above ln 2."""
    losses = [1.6, 0.73, 0.85, 0.74, 0.71, 0.72, 0.75, 0.69, 0.69, 0.71]
    verdict = diagnose_learning(Task.CLASSIFICATION, history(losses, n_predicted_classes=[1] * 10), LN2, {"loss": 8})
    assert verdict is not None and verdict.status is LearningStatus.DID_NOT_LEARN
    assert train_loss_drop(losses, LN2) < 0.05
    if train_loss_drop(losses, LN2) < 0:  # the reason says "above", never a negative "% below"
        assert "% above it" in verdict.reason and "-" not in verdict.reason.split("fell")[1].split("%")[0]


def test_a_decreasing_loss_that_predicts_both_classes_learned() -> None:
    losses = list(np.linspace(0.70, 0.35, 15))
    verdict = diagnose_learning(
        Task.CLASSIFICATION, history(losses, n_predicted_classes=[1] * 5 + [2] * 10), LN2, {"loss": 12}
    )
    assert verdict is not None and verdict.status is LearningStatus.LEARNED, verdict
    assert verdict.advice == "" and verdict.train_loss_drop == pytest.approx((LN2 - 0.375) / LN2)  # last 3 epochs


def test_one_class_predictions_of_the_selected_model_are_an_alarm() -> None:
    """The training loss fell (memorised), but the kept model predicts one class for every validation sample."""
    losses = list(np.linspace(0.70, 0.40, 15))
    classes = [2] * 15
    classes[3] = 1
    rows = history(losses, n_predicted_classes=classes)
    verdict = diagnose_learning(Task.CLASSIFICATION, rows, LN2, {"loss": 3, "balanced_accuracy": 9})
    assert verdict is not None and verdict.status is LearningStatus.DID_NOT_LEARN
    assert "best-loss (epoch 3)" in verdict.reason and "balanced_accuracy" not in verdict.reason
    assert "--class-weighted-sampling" in verdict.advice
    same = diagnose_learning(Task.CLASSIFICATION, rows, LN2, {"loss": 3}, n_validation_classes=1)
    assert same is not None and same.status is LearningStatus.LEARNED, "one true class: one predicted is no collapse"


def test_a_memorised_training_set_that_does_not_generalise_is_an_alarm() -> None:
    """Random labels: the training loss falls to 0, predictions vary, but validation never beats a constant."""
    losses = list(np.linspace(0.70, 0.01, 12))
    rows = history(losses, n_predicted_classes=[2] * 12)
    for row, loss in zip(rows, np.linspace(0.70, 1.5, 12), strict=True):
        row["validation_loss"] = loss  # confidently wrong on new images
    memorised = diagnose_learning(Task.CLASSIFICATION, rows, LN2, {"loss": 0}, validation_chance=LN2)
    assert memorised is not None and memorised.status is LearningStatus.DID_NOT_LEARN
    assert "did not generalise" in memorised.reason and "memorises" in memorised.advice
    assert memorised.validation_loss_drop == pytest.approx(-0.7 / LN2 + 1)
    rows[5]["validation_loss"] = LN2 * 0.9  # one epoch 10 % below the validation set's best constant
    generalised = diagnose_learning(Task.CLASSIFICATION, rows, LN2, {"loss": 5}, validation_chance=LN2)
    assert generalised is not None and generalised.status is LearningStatus.LEARNED


def test_regression_flat_at_the_variance_is_an_alarm_and_a_falling_loss_learned() -> None:
    targets = np.array([60.0, 62, 65, 70, 71, 75, 80, 83])
    chance = chance_loss(Task.REGRESSION, "mse", targets)
    assert chance == pytest.approx(targets.var())
    flat = diagnose_learning(Task.REGRESSION, history([chance * 1.01, chance * 0.97, chance * 1.02, chance]), chance,
                             {"loss": 1}, target_sd=targets.std())  # fmt: skip
    assert flat is not None and flat.status is LearningStatus.DID_NOT_LEARN and "R²" in flat.reason
    falling = [chance * f for f in (3.0, 1.0, 0.7, 0.5, 0.4)]
    spread = [targets.std() * 0.6] * 5
    learned = diagnose_learning(Task.REGRESSION, history(falling, prediction_sd=spread), chance, {"loss": 4},
                                target_sd=targets.std())  # fmt: skip
    assert learned is not None and learned.status is LearningStatus.LEARNED
    constant = diagnose_learning(Task.REGRESSION, history(falling, prediction_sd=[1e-3] * 5), chance, {"loss": 4},
                                 target_sd=targets.std())  # fmt: skip
    assert constant is not None and constant.status is LearningStatus.DID_NOT_LEARN and "constant" in constant.reason


def test_chance_level_follows_the_class_frequencies_the_sampler_draws() -> None:
    unbalanced = np.array([0] * 9 + [1] * 3)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert chance_loss(Task.CLASSIFICATION, None, unbalanced) == pytest.approx(entropy)
    assert chance_loss(Task.CLASSIFICATION, None, unbalanced, class_weighted=True) == pytest.approx(LN2)
    assert chance_loss(Task.CLASSIFICATION, None, np.array([0, 1, 2, 2])) == pytest.approx(
        -(0.5 * math.log(0.25) + 0.5 * math.log(0.5))
    )
    # A model that predicts the training frequencies of an unbalanced set sits at chance, though below ln 2.
    losses = [entropy * 0.97, entropy * 0.99, entropy * 0.96, entropy]
    verdict = diagnose_learning(Task.CLASSIFICATION, history(losses), entropy, {"loss": 3})
    assert verdict is not None and verdict.status is LearningStatus.DID_NOT_LEARN
    targets = np.array([0.0, 1.0, 2.0, 10.0])
    assert chance_loss(Task.REGRESSION, "l1", targets) == pytest.approx(np.abs(targets - 1.5).mean())
    huber = chance_loss(Task.REGRESSION, "huber", targets)
    assert huber is not None and 0 < huber < chance_loss(Task.REGRESSION, "l1", targets)
    assert chance_loss(Task.RECONSTRUCTION, None, targets) is None


def test_the_running_mean_ignores_one_lucky_epoch() -> None:
    losses = [LN2, LN2, LN2 * 0.8, LN2, LN2]  # one epoch 20 % below chance
    assert train_loss_drop(losses, LN2) == pytest.approx(0.2 / 3)
    assert train_loss_drop(losses, LN2) < MIN_TRAIN_DROP
    assert math.isnan(train_loss_drop([float("nan")], LN2))
    assert diagnose_learning(Task.RECONSTRUCTION, history([0.1]), 0.2, {"loss": 0}) is None


# -- whole trainings ----------------------------------------------------------------------------------------


def shuffled(table: pd.DataFrame, splits: Splits) -> tuple[pd.DataFrame, Splits]:
    """The same images with their diagnoses permuted across participants: labels independent of the images."""
    participants = sorted(table["participant_id"].unique())
    permuted = np.random.default_rng(0).permutation([table.set_index("participant_id").loc[p, "label"]
                                                     for p in participants])  # fmt: skip
    labels = dict(zip(participants, permuted, strict=True))
    table = table.assign(label=table["participant_id"].map(labels))

    def relabel(rows: pd.DataFrame) -> pd.DataFrame:
        return rows.assign(label=rows["participant_id"].map(labels))

    folds = tuple(Fold(f.index, relabel(f.train), relabel(f.validation)) for f in splits.folds)
    return table, dataclasses.replace(splits, folds=folds)


@pytest.mark.parametrize("random_labels", [False, True], ids=["strong-effect", "shuffled-labels"])
def test_training_diagnoses_a_strong_effect_and_shuffled_labels(
    tmp_path: Path, random_labels: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """AD images are 0.6 brighter than CN ones (noise in [0, 1)): learned in 10 epochs; permuted labels are not."""
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    if random_labels:
        table, splits = shuffled(table, splits)
    cfg = make_config(tmp_path, epochs=10, learning_rate=0.01, dropout=0.2, selection_metrics=("loss",))
    with caplog.at_level(logging.WARNING, logger="bids_app.training.stage"):
        maps_dir = train(cfg, table, splits)
    learning = json.loads(MapsLayout(maps_dir).summary_json(0).read_text())["learning"]
    history = pd.read_csv(MapsLayout(maps_dir).training_tsv(0), sep="\t")
    assert history["validation_n_predicted_classes"].between(1, 2).all()
    warnings = [r.getMessage() for r in caplog.records if "did not learn" in r.getMessage()]
    if random_labels:
        assert learning["status"] == "did-not-learn" and learning["advice"]
        assert len(warnings) == 1 and warnings[0].startswith("Split 0: the network did not learn: ")
        assert learning["reason"] in warnings[0] and learning["advice"] in warnings[0]
    else:
        assert learning["status"] == "learned", learning["reason"]
        assert learning["train_loss_drop"] > 0.5 and learning["validation_loss_drop"] > 0.5
        assert not warnings
    assert learning["chance_loss"] == pytest.approx(-(3 / 7 * math.log(3 / 7) + 4 / 7 * math.log(4 / 7)))
    assert Maps.open(maps_dir).learning_status(0) == learning["status"]


@pytest.fixture(scope="module")
def random_label_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """The generator's diagnoses drawn independently of the images (``--random-labels``), trained and predicted."""
    root = tmp_path_factory.mktemp("random-labels")
    dataset, out = make_cohort(root, 10, 1, "--modes", "image", "--skip-bids-validation", seed=4, effect_size=0.8,
                               random_labels=True)  # fmt: skip
    result = run_cli(str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--mode", "image",
                     "--architecture", "small_cnn", "--epochs", "3", "--batch-size", "4", "--learning-rate", "0.001",
                     "--n-splits", "1", "--test-size", "2", "--n-bootstrap", "20", "--no-linear-baseline",
                     "--model-name", "random", "--seed", "3", "--skip-bids-validation")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "models" / "random", result.stderr, dataset.bids_dir


def metric_tables(maps_dir: Path) -> dict[str, pd.DataFrame]:
    return {path.name: pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
            for path in sorted(maps_dir.glob("split-0/best-loss/*/*_image_level_metrics.tsv"))}  # fmt: skip


def test_random_labels_raise_the_alarm_in_summary_log_and_metric_tsvs(random_label_run) -> None:
    maps_dir, log, _ = random_label_run
    learning = json.loads(MapsLayout(maps_dir).summary_json(0).read_text())["learning"]
    assert learning["status"] == "did-not-learn" and learning["reason"] and "--learning-rate" in log
    trained = [line for line in log.splitlines() if "WARNING" in line and "Split 0: the network did not learn" in line]
    predicting = [line for line in log.splitlines() if "WARNING" in line and "Split 0: predicting with a network "
                  "that did not learn" in line]  # fmt: skip
    assert len(trained) == 1 and len(predicting) == 1
    tables = metric_tables(maps_dir)
    assert set(tables) == {"validation_image_level_metrics.tsv", "test_image_level_metrics.tsv"}
    for table in tables.values():
        assert table.columns[-1] == "training_status" and set(table["training_status"]) == {"did-not-learn"}


def test_a_model_without_a_verdict_predicts_with_status_na(random_label_run, tmp_path: Path) -> None:
    """A split trained before the verdict existed: ``n/a``, and no warning."""
    maps_dir, _, bids_dir = random_label_run
    out = tmp_path / "out"
    shutil.copytree(maps_dir.parent.parent, out, symlinks=True)
    summary_path = MapsLayout(out / "models" / "random").summary_json(0)
    summary = json.loads(summary_path.read_text())
    del summary["learning"]
    summary_path.write_text(json.dumps(summary))
    result = run_cli(str(bids_dir), str(out), "group", "--stages", "predict", "--model-name", "random",
                     "--n-bootstrap", "20", "--skip-bids-validation")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "did not learn" not in result.stderr
    for table in metric_tables(out / "models" / "random").values():
        assert set(table["training_status"]) == {"n/a"}
