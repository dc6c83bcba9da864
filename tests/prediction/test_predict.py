"""Prediction: validation-only voting weights, threshold, leak check, output TSVs, determinism."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bids_app.config import (
    AnalysisLevel,
    ExtractionMode,
    LabelConfig,
    PredictConfig,
    RunConfig,
    RuntimeConfig,
    SplitConfig,
    Task,
    TrainConfig,
)
from bids_app.data.dataset import TensorDataset
from bids_app.data.tables import index_tensors
from bids_app.derivatives import tensor_path
from bids_app.errors import ConfigError, DataError, InputMissingError, LeakError
from bids_app.extraction.storage import write_tensor
from bids_app.maps import Maps, MapsLayout
from bids_app.maps.folder import write_maps_json
from bids_app.maps.results import format_tsv, format_value
from bids_app.maps.weights import save_model
from bids_app.models import build_model
from bids_app.prediction.leakage import LeakFinding, check_leaks
from bids_app.prediction.stage import Predictor, run_predict_stage
from bids_app.prediction.voting import compute_voting_weights, soft_vote, vote_validation
from bids_app.split.files import write_splits
from bids_app.split.make import make_splits

CLASSES = ["CN", "AD"]
ENCODING = {"CN": 0, "AD": 1}
SCALE = 4.0


class MeanModel(nn.Module):
    """Logits ``(-m, m) * 4`` with ``m = mean(x) - 0.5``: a part filled with 1 votes AD, with 0 votes CN."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(SCALE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1) - 0.5
        return torch.stack([-m, m], dim=1) * self.scale


def p_ad(value: float) -> float:
    """The model's AD probability for a part filled with ``value``."""
    return float(1 / (1 + math.exp(-2 * SCALE * (value - 0.5))))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_images(
    root: Path, images: list[tuple[str, str, str, list[float]]], raw_sha: dict[str, str] | None = None, edge: int = 2
) -> pd.DataFrame:
    """Patch tensors ``(n_parts, 1, edge, edge, edge)`` filled with one value per part; returns the group table."""
    rows = []
    for participant, session, label, values in images:
        path = root / f"{participant}_{session}_desc-patch_T1w.npy"
        array = np.stack([np.full((1, edge, edge, edge), v, np.float32) for v in values])
        raw = (raw_sha or {}).get(participant, sha(f"raw {participant} {session}"))
        write_tensor(
            path, array, {"Mode": "patch", "SourceSHA256": sha(f"{participant} {session}"), "RawSourceSHA256": raw}
        )
        rows.append(
            {
                "participant_id": participant,
                "session_id": session,
                "tensor_path": str(path),
                "n_parts": len(values),
                "label": label,
                "source_sha256": sha(f"{participant} {session}"),
                "raw_source_sha256": raw,
            }
        )
    return pd.DataFrame(rows)


# Validation: part 0 always right (BA 1), part 1 wrong on sub-v1 only (BA 5/6), part 2 always says AD (BA 0.5).
VALIDATION = [
    ("sub-v1", "ses-M000", "CN", [0.0, 1.0, 1.0]),
    ("sub-v2", "ses-M000", "CN", [0.0, 0.0, 1.0]),
    ("sub-v3", "ses-M000", "CN", [0.0, 0.0, 1.0]),
    ("sub-v4", "ses-M000", "AD", [1.0, 1.0, 1.0]),
    ("sub-v5", "ses-M000", "AD", [1.0, 1.0, 1.0]),
    ("sub-v6", "ses-M000", "AD", [1.0, 1.0, 1.0]),
]
VALIDATION_WEIGHTS = [1.0, 5 / 6, 0.5]
TEST = [
    ("sub-t1", "ses-M000", "CN", [0.2, 0.9, 0.0]),
    ("sub-t2", "ses-M000", "AD", [0.7, 0.6, 1.0]),
    ("sub-t2", "ses-M006", "AD", [0.8, 0.1, 0.3]),
]


@pytest.fixture
def maps_dir(tmp_path: Path) -> Path:
    """A MAPS with its training/validation table (training images sub-r*, validation sub-v*)."""
    maps = tmp_path / "models" / "m"
    (maps / "groups").mkdir(parents=True)
    ids = [(f"sub-r{i}", "ses-M000") for i in range(1, 5)] + [(p, s) for p, s, _, _ in VALIDATION]
    train = pd.DataFrame(
        {
            "participant_id": [p for p, _ in ids],
            "session_id": [s for _, s in ids],
            "label": "CN",
            "source_sha256": [sha(f"{p} {s}") for p, s in ids],
            "raw_source_sha256": [sha(f"raw {p} {s}") for p, s in ids],
        }
    )
    train.to_csv(maps / "groups" / "train+validation.tsv", sep="\t", index=False)
    return maps


@pytest.fixture
def maps(maps_dir: Path) -> Maps:
    """``maps_dir`` as the model folder of a classifier of ``CLASSES``."""
    return open_maps(maps_dir)


def open_maps(maps_dir: Path, task: Task = Task.CLASSIFICATION, mode: ExtractionMode = ExtractionMode.PATCH) -> Maps:
    """``maps_dir`` as the model folder of a ``task`` model (``maps.json`` and ``environment.json`` written):
    its record gives the task and, in classification, the class order ``CLASSES``."""
    classification = task is Task.CLASSIFICATION
    cfg = RunConfig(maps_dir.parent / "bids", maps_dir.parent, AnalysisLevel.GROUP, labels=LabelConfig(task=task),
                    train=TrainConfig(architecture="small_cnn", mode=mode))  # fmt: skip
    extra = {"input_shape": [1, 2, 2, 2], "n_outputs": 2 if classification else 1,
             "label_encoding": ENCODING if classification else None}  # fmt: skip
    return Maps.create(maps_dir, cfg, extra)


def predictor(maps: Maps, cfg: PredictConfig | None = None) -> Predictor:
    """A predictor of ``maps`` on the CPU, checking leaks against its ``groups/train+validation.tsv``."""
    return Predictor(maps, cfg or PredictConfig(n_bootstrap=50), RuntimeConfig(device="cpu"), maps.training_pool())


def predict(maps: Maps, group: str, table: pd.DataFrame, cfg: PredictConfig | None = None, model=None) -> Path:
    dataset = TensorDataset(table, ExtractionMode.PATCH, Task.CLASSIFICATION, label_encoding=ENCODING)
    predictor(maps, cfg).predict_group(model or MeanModel(), 0, "loss", group, table, dataset)
    return maps.layout.group_dir(0, "loss", group)


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def test_weights_come_from_validation_only(maps: Maps, tmp_path: Path) -> None:
    validation = predict(maps, "validation", write_images(tmp_path / "val", VALIDATION))
    # Validation itself is scored leave-one-participant-out: sub-v1's vote uses weights from sub-v2..v6.
    voted = read_tsv(validation / "validation_image_level_prediction.tsv")
    expected_v1 = np.average([p_ad(0), p_ad(1), p_ad(1)], weights=[1, 1, 0.5])
    assert float(voted["proba_AD"][0]) == pytest.approx(expected_v1, abs=1e-6)
    weights_path = maps.layout.best_dir(0, "loss") / "voting_weights.tsv"
    weights = read_tsv(weights_path)
    assert list(weights.columns) == ["part_id", "validation_metric", "validation_value", "weight"]
    np.testing.assert_allclose(weights["weight"].astype(float), VALIDATION_WEIGHTS, atol=1e-6)
    saved = weights_path.read_bytes()

    out = predict(maps, "test", write_images(tmp_path / "t1", TEST))
    image = read_tsv(out / "test_image_level_prediction.tsv")
    for (_, _, _, values), proba in zip(TEST, image["proba_AD"].astype(float), strict=True):
        expected = np.average([p_ad(v) for v in values], weights=VALIDATION_WEIGHTS)
        assert proba == pytest.approx(expected, abs=1e-6)

    # Same images, part predictions changed so that the test set would favour other parts: weights unchanged.
    flipped = [(p, s, lab, [1 - v for v in values[:2]] + [float(lab == "AD")]) for p, s, lab, values in TEST]
    out = predict(maps, "test", write_images(tmp_path / "t2", flipped))
    assert weights_path.read_bytes() == saved
    image = read_tsv(out / "test_image_level_prediction.tsv")
    for (_, _, _, values), proba in zip(flipped, image["proba_AD"].astype(float), strict=True):
        expected = np.average([p_ad(v) for v in values], weights=VALIDATION_WEIGHTS)
        assert proba == pytest.approx(expected, abs=1e-6)


def test_other_group_before_validation_is_refused(maps: Maps, tmp_path: Path) -> None:
    with pytest.raises(InputMissingError, match="Predict the 'validation' group"):
        predict(maps, "test", write_images(tmp_path / "t", TEST))


def test_parts_below_threshold_are_dropped(maps: Maps, tmp_path: Path) -> None:
    cfg = PredictConfig(voting_threshold=0.6, n_bootstrap=20)
    predict(maps, "validation", write_images(tmp_path / "val", VALIDATION), cfg)
    weights = read_tsv(maps.layout.best_dir(0, "loss") / "voting_weights.tsv")
    np.testing.assert_allclose(weights["weight"].astype(float), [1.0, 5 / 6, 0.0], atol=1e-6)
    first = read_tsv(predict(maps, "test", write_images(tmp_path / "a", TEST), cfg) / "test_image_level_prediction.tsv")
    changed = [(p, s, lab, [*values[:2], 1.0 - values[2]]) for p, s, lab, values in TEST]  # only part 2 changes
    second = read_tsv(
        predict(maps, "test", write_images(tmp_path / "b", changed), cfg) / "test_image_level_prediction.tsv"
    )
    pd.testing.assert_frame_equal(first, second)
    expected = np.average([p_ad(v) for v in TEST[0][3][:2]], weights=[1.0, 5 / 6])
    assert float(first["proba_AD"][0]) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ConfigError, match="drops every part"):
        predict(maps, "validation", write_images(tmp_path / "val", VALIDATION), PredictConfig(voting_threshold=1.1))


def part_table(images: list[tuple[str, str, str, list[float]]]) -> pd.DataFrame:
    rows = []
    for participant, session, label, values in images:
        for part, value in enumerate(values):
            p = p_ad(value)
            rows.append((participant, session, part, float(ENCODING[label]), 1 - p, p))
    return pd.DataFrame(rows, columns=["participant_id", "session_id", "part_id", "true_label", "proba_0", "proba_1"])


def test_validation_is_scored_leave_one_participant_out() -> None:
    parts = part_table(VALIDATION)
    voted = vote_validation(parts, Task.CLASSIFICATION, 2, threshold=0.0)
    for i, participant in enumerate(p for p, _, _, _ in VALIDATION):
        others = compute_voting_weights(parts[parts["participant_id"] != participant], Task.CLASSIFICATION, 2, 0.0)
        own = soft_vote(parts[parts["participant_id"] == participant], others, Task.CLASSIFICATION, 2)
        assert voted["proba_1"][i] == pytest.approx(own["proba_1"][0])
    # sub-v1 is the only image where part 1 errs: without it part 1 scores 1, so its vote differs from in-sample.
    in_sample = soft_vote(parts, compute_voting_weights(parts, Task.CLASSIFICATION, 2, 0.0), Task.CLASSIFICATION, 2)
    assert voted["proba_1"][0] != pytest.approx(in_sample["proba_1"][0])
    assert voted["proba_1"][0] == pytest.approx(np.average([p_ad(0), p_ad(1), p_ad(1)], weights=[1, 1, 0.5]))


def test_regression_voting_mean_or_inverse_mae() -> None:
    parts = pd.DataFrame(
        {
            "participant_id": ["sub-1"] * 2 + ["sub-2"] * 2,
            "session_id": "n/a",
            "part_id": [0, 1, 0, 1],
            "true_label": [70.0, 70.0, 80.0, 80.0],
            "predicted": [71.0, 66.0, 79.0, 84.0],  # part 0 MAE 1, part 1 MAE 4
        }
    )
    plain = compute_voting_weights(parts, Task.REGRESSION, 0, threshold=0.9)
    np.testing.assert_allclose(plain["validation_value"], [1.0, 4.0])
    np.testing.assert_allclose(plain["weight"], [1.0, 1.0])
    assert soft_vote(parts, plain, Task.REGRESSION, 0)["predicted"].tolist() == pytest.approx([68.5, 81.5])
    inverse = compute_voting_weights(parts, Task.REGRESSION, 0, threshold=0.9, inverse_mae=True)
    np.testing.assert_allclose(inverse["weight"], [1.0, 0.25])
    voted = soft_vote(parts, inverse, Task.REGRESSION, 0)["predicted"]
    assert voted.tolist() == pytest.approx([(71 + 0.25 * 66) / 1.25, (79 + 0.25 * 84) / 1.25])


def test_leak_check_refuses_overlapping_participant(maps: Maps, tmp_path: Path) -> None:
    predict(maps, "validation", write_images(tmp_path / "val", VALIDATION))
    group = write_images(tmp_path / "g", [*TEST, ("sub-r2", "ses-M006", "CN", [0.0, 0.0, 0.0])])
    with pytest.raises(LeakError, match="sub-r2 ses-M006 ~ sub-r2 ses-M000 \\(participant\\)") as caught:
        predict(maps, "test", group)
    assert caught.value.exit_code == 65
    assert not (maps.layout.best_dir(0, "loss") / "test").exists()


def test_leak_check_refuses_renamed_duplicate_scan(maps: Maps, tmp_path: Path) -> None:
    predict(maps, "validation", write_images(tmp_path / "val", VALIDATION))
    renamed = {"sub-new": sha("raw sub-r3 ses-M000")}  # sub-r3's raw scan under another participant id
    group = write_images(tmp_path / "g", [("sub-new", "ses-M000", "AD", [1.0, 1.0, 1.0])], renamed)
    findings = check_leaks(maps, group)
    assert findings == [
        LeakFinding("raw_source_sha256", "sub-new", "ses-M000", "sub-r3", "ses-M000", sha("raw sub-r3 ses-M000"))
    ]
    with pytest.raises(LeakError, match="raw_source_sha256"):
        predict(maps, "external", group)

    out = predict(maps, "external", group, PredictConfig(allow_leak=True, n_bootstrap=20))
    warning = json.loads((out / "leak_warning.json").read_text())
    assert warning["Group"] == "external"
    assert warning["Pairs"] == [
        {
            "reason": "raw_source_sha256",
            "participant_id": "sub-new",
            "session_id": "ses-M000",
            "train_participant_id": "sub-r3",
            "train_session_id": "ses-M000",
            "sha256": sha("raw sub-r3 ses-M000"),
            "similarity": None,
        }
    ]
    assert (out / "external_image_level_prediction.tsv").is_file()
    # A later clean run on other images removes the stale warning.
    predict(maps, "external", write_images(tmp_path / "clean", TEST))
    assert not (out / "leak_warning.json").exists()


def test_leak_check_needs_checksums(maps: Maps, tmp_path: Path) -> None:
    group = write_images(tmp_path / "g", TEST).drop(columns="raw_source_sha256")
    with pytest.raises(DataError, match="no column\\(s\\) raw_source_sha256"):
        check_leaks(maps, group)
    assert check_leaks(maps, write_images(tmp_path / "ok", TEST)) == []


def test_prediction_tsv_columns_rows_and_metrics(maps: Maps, tmp_path: Path) -> None:
    predict(maps, "validation", write_images(tmp_path / "val", VALIDATION))
    out = predict(maps, "test", write_images(tmp_path / "t", TEST))
    assert sorted(p.name for p in out.iterdir()) == [
        "test_confusion_matrix.tsv",
        "test_image_level_metrics.tsv",
        "test_image_level_prediction.tsv",
        "test_patch_level_prediction.tsv",
    ]
    image = read_tsv(out / "test_image_level_prediction.tsv")
    assert list(image.columns) == [
        "participant_id",
        "session_id",
        "true_label",
        "predicted_label",
        "proba_CN",
        "proba_AD",
    ]
    assert image[["participant_id", "session_id"]].values.tolist() == [[p, s] for p, s, _, _ in TEST]
    assert image["true_label"].tolist() == ["CN", "AD", "AD"]
    probas = image[["proba_CN", "proba_AD"]].astype(float).to_numpy()
    np.testing.assert_allclose(probas.sum(axis=1), 1.0, atol=2e-6)
    assert image["predicted_label"].tolist() == [CLASSES[i] for i in probas.argmax(axis=1)]
    parts = read_tsv(out / "test_patch_level_prediction.tsv")
    assert list(parts.columns) == [
        "participant_id", "session_id", "part_id", "true_label", "predicted_label", "proba_CN", "proba_AD"
    ]  # fmt: skip
    assert len(parts) == 9
    assert parts["part_id"].tolist() == ["0", "1", "2"] * 3
    assert float(parts["proba_AD"][1]) == pytest.approx(p_ad(0.9), abs=1e-6)
    metrics = read_tsv(out / "test_image_level_metrics.tsv")
    assert list(metrics.columns) == [
        "metric", "value", "ci_low", "ci_high", "n_images", "n_participants", "positive_class", "warning",
        "training_status"
    ]  # fmt: skip
    assert set(metrics["training_status"]) == {"n/a"}, "no learning verdict: a split trained before the verdict existed"
    assert metrics["metric"].tolist() == [
        "balanced_accuracy", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "mcc", "roc_auc"
    ]  # fmt: skip
    matrix = read_tsv(out / "test_confusion_matrix.tsv")
    assert list(matrix.columns) == ["true_label", "CN", "AD"]
    assert matrix[["CN", "AD"]].astype(int).to_numpy().sum() == 3


def test_unlabelled_group_writes_predictions_only(maps: Maps, tmp_path: Path) -> None:
    predict(maps, "validation", write_images(tmp_path / "val", VALIDATION))
    table = write_images(tmp_path / "u", TEST)
    dataset = TensorDataset(table, ExtractionMode.PATCH, Task.CLASSIFICATION, label_encoding=ENCODING)
    dataset._targets = np.full(len(table), -1)  # unknown labels, as the data module encodes them
    predictor(maps, PredictConfig()).predict_group(MeanModel(), 0, "loss", "new", table, dataset)
    out = maps.layout.best_dir(0, "loss") / "new"
    assert sorted(p.name for p in out.iterdir()) == ["new_image_level_prediction.tsv", "new_patch_level_prediction.tsv"]
    assert read_tsv(out / "new_image_level_prediction.tsv")["true_label"].tolist() == ["n/a"] * 3


def test_same_model_and_data_give_identical_bytes(maps_dir: Path, tmp_path: Path) -> None:
    outputs = []
    for attempt in range(2):
        copy = tmp_path / f"copy{attempt}"
        copy.mkdir()
        (copy / "groups").mkdir()
        (copy / "groups" / "train+validation.tsv").write_bytes((maps_dir / "groups/train+validation.tsv").read_bytes())
        maps = open_maps(copy)
        predict(maps, "validation", write_images(tmp_path / f"val{attempt}", VALIDATION))
        out = predict(maps, "test", write_images(tmp_path / f"t{attempt}", TEST))
        files = [*sorted(out.iterdir()), maps.layout.best_dir(0, "loss") / "voting_weights.tsv"]
        outputs.append({p.name: p.read_bytes() for p in files})
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 5


def test_reconstruction_outputs(maps_dir: Path, tmp_path: Path) -> None:
    table = write_images(tmp_path / "r", TEST).drop(columns="label")
    dataset = TensorDataset(table, ExtractionMode.PATCH, Task.RECONSTRUCTION, label_encoding=None)

    class Shrink(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.factor = nn.Parameter(torch.tensor(0.9))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.factor

    maps = open_maps(maps_dir, Task.RECONSTRUCTION)
    predictor(maps, PredictConfig(n_bootstrap=20)).predict_group(Shrink(), 0, "loss", "test", table, dataset)
    out = maps.layout.group_dir(0, "loss", "test")
    image = read_tsv(out / "test_image_level_prediction.tsv")
    assert list(image.columns) == ["participant_id", "session_id", "mae", "rmse", "psnr", "ssim"]
    assert len(image) == 3
    # Image sub-t1: parts filled with 0.2, 0.9, 0.0 → absolute errors 0.02, 0.09, 0.
    assert float(image["mae"][0]) == pytest.approx((0.02 + 0.09 + 0.0) / 3, abs=1e-6)
    metrics = read_tsv(out / "test_image_level_metrics.tsv")
    assert metrics["metric"].tolist() == ["mae", "rmse", "psnr", "ssim"]


def test_model_loaded_from_maps_with_its_label_encoding(maps_dir: Path, tmp_path: Path) -> None:

    train = TrainConfig(architecture="small_cnn", mode=ExtractionMode.PATCH)
    cfg = RunConfig(bids_dir=tmp_path / "bids", output_dir=tmp_path, analysis_level=AnalysisLevel.GROUP, train=train)
    write_maps_json(maps_dir, cfg, {"input_shape": [1, 8, 8, 8], "n_outputs": 2, "label_encoding": ENCODING})
    (maps_dir / "environment.json").write_text("{}")
    torch.manual_seed(0)
    model = build_model("small_cnn", task=Task.CLASSIFICATION, input_shape=(1, 8, 8, 8), n_outputs=2)
    save_model(maps_dir / "split-0" / "best-loss" / "model.safetensors", model)
    table = write_images(tmp_path / "val", VALIDATION, edge=8)
    dataset = TensorDataset(table, ExtractionMode.PATCH, Task.CLASSIFICATION, label_encoding=ENCODING)
    maps = Maps.open(maps_dir)
    assert maps.class_names == CLASSES
    model = maps.load_model(0, "loss")
    predictor(maps, PredictConfig(n_bootstrap=10)).predict_group(model, 0, "loss", "validation", table, dataset)
    image = read_tsv(maps.layout.prediction_tsv(0, "loss", "validation"))
    assert list(image.columns)[-2:] == ["proba_CN", "proba_AD"]
    assert len(image) == len(VALIDATION)


def test_format_value_is_fixed() -> None:
    assert format_value(-0.0) == "0.000000"
    assert format_value(-1e-9) == "0.000000"
    assert format_value(float("nan")) == "n/a"
    assert format_value(float("inf")) == "inf"
    assert format_value(np.float32(0.5)) == "0.500000"
    assert format_value(np.int64(3)) == "3"
    assert format_value("") == "n/a"
    assert format_tsv(pd.DataFrame({"a": [1.0], "b": ["x"]})) == "a\tb\n1.000000\tx\n"


def write_output_dir(
    output_dir: Path, labels: dict[str, str], edge: int = 8, raw_sha: dict[str, str] | None = None
) -> pd.DataFrame:
    """Patch tensors (3 parts) at their participant-level paths; AD images brighter. Returns labels + tensors."""

    rng = np.random.default_rng(0)
    for participant, label in labels.items():
        path = tensor_path(output_dir, participant, "M000", "MNI152NLin2009aSym", "patch", "T1w")
        array = rng.random((3, 1, edge, edge, edge), dtype=np.float32) * 0.5 + (0.5 if label == "AD" else 0.0)
        raw = (raw_sha or {}).get(participant, sha(f"raw {output_dir} {participant}"))
        source = {"SourceSHA256": sha(f"{output_dir} {participant}"), "RawSourceSHA256": raw}
        write_tensor(path, array.astype(np.float32), {"Mode": "patch", **source})
    tensors = index_tensors(output_dir, ExtractionMode.PATCH)
    label_column = [labels[p.removeprefix("sub-")] for p in tensors["participant_id"]]
    return tensors.assign(label=label_column, age=70.0, sex="F")


def test_predict_stage_predicts_validation_test_and_another_output(tmp_path: Path) -> None:

    output_dir = tmp_path / "out"
    labels = {f"{i:02d}": ("AD" if i % 2 else "CN") for i in range(1, 13)}
    table = write_output_dir(output_dir, labels)
    train = TrainConfig(architecture="small_cnn", mode=ExtractionMode.PATCH, selection_metrics=("loss",))
    split_cfg = SplitConfig(test_size=4, n_splits=2, balance_p_threshold=0.0)
    predict_cfg = PredictConfig(n_bootstrap=50)
    cfg = RunConfig(
        tmp_path / "bids", output_dir, AnalysisLevel.GROUP, train=train, split=split_cfg, predict=predict_cfg
    )
    maps_dir = output_dir / "models" / "model"
    layout = MapsLayout(maps_dir)
    splits = make_splits(table, split_cfg, Task.CLASSIFICATION, seed=0)
    write_splits(layout.groups_dir, splits, table, split_cfg)
    write_maps_json(maps_dir, cfg, {"input_shape": [1, 8, 8, 8], "n_outputs": 2, "label_encoding": ENCODING})
    (maps_dir / "environment.json").write_text("{}")
    torch.manual_seed(0)
    for split in (0, 1):
        model = build_model("small_cnn", task=Task.CLASSIFICATION, input_shape=(1, 8, 8, 8), n_outputs=2)
        save_model(layout.model_path(split, "loss"), model)
        layout.summary_json(split).parent.mkdir(parents=True, exist_ok=True)
        layout.summary_json(split).write_text("{}")

    maps = Maps.open(maps_dir)
    run_predict_stage(cfg, maps, table)
    for split in (0, 1):
        best = layout.best_dir(split, "loss")
        assert (best / "voting_weights.tsv").is_file()
        validation = read_tsv(best / "validation" / "validation_image_level_prediction.tsv")
        assert len(validation) == len(splits.folds[split].validation)
        test = read_tsv(best / "test" / "test_image_level_prediction.tsv")
        assert test["participant_id"].tolist() == splits.test["participant_id"].tolist()
        assert len(read_tsv(best / "test" / "test_patch_level_prediction.tsv")) == 3 * len(splits.test)
        assert (best / "test" / "test_image_level_metrics.tsv").is_file()

    # Another participant-level output whose raw dataset (DatasetLinks.raw) has the labels.
    other_dir = tmp_path / "other"
    other_table = write_output_dir(other_dir, {"x1": "AD", "x2": "CN"})
    raw = tmp_path / "other_raw"
    raw.mkdir()
    (raw / "participants.tsv").write_text("participant_id\tdiagnosis\nsub-x1\tAD\nsub-x2\tCN\n")
    (other_dir / "dataset_description.json").write_text(json.dumps({"DatasetLinks": {"raw": raw.as_uri()}}))
    external = dataclasses.replace(
        cfg, predict=PredictConfig(predict_from=other_dir, group_name="adni", n_bootstrap=20)
    )
    run_predict_stage(external, maps, table)
    adni = layout.group_dir(0, "loss", "adni")
    image = read_tsv(adni / "adni_image_level_prediction.tsv")
    assert image["true_label"].tolist() == ["AD", "CN"]
    assert (adni / "adni_image_level_metrics.tsv").is_file()
    assert len(other_table) == 2

    # The groups TSVs carry no checksums: the training images' ones come from OUTPUT_DIR's tensors.
    renamed = tmp_path / "renamed"
    write_output_dir(renamed, {"y1": "AD"}, raw_sha={"y1": sha(f"raw {output_dir} 03")})
    leaky = dataclasses.replace(cfg, predict=PredictConfig(predict_from=renamed, group_name="renamed"))
    training = set(splits.folds[0].train["participant_id"]) | set(splits.folds[0].validation["participant_id"])
    assert "sub-03" in training
    with pytest.raises(LeakError, match="sub-y1 ses-M000 ~ sub-03 ses-M000 \\(raw_source_sha256\\)"):
        run_predict_stage(leaky, maps, table)

    with pytest.raises(ConfigError, match="group-name"):
        run_predict_stage(dataclasses.replace(external, predict=PredictConfig(predict_from=other_dir)), maps, table)


def test_regression_image_mode_outputs(maps_dir: Path, tmp_path: Path) -> None:
    rows = []
    for i, (age, value) in enumerate([(70.0, 0.70), (80.0, 0.78), (60.0, 0.65)]):
        path = tmp_path / f"img{i}.npy"
        write_tensor(path, np.full((1, 2, 2, 2), value, np.float32), {"Mode": "image"})
        rows.append((f"sub-t{i}", "n/a", str(path), 1, age, f"s{i}", f"r{i}"))
    columns = ["participant_id", "session_id", "tensor_path", "n_parts", "label", "source_sha256", "raw_source_sha256"]
    table = pd.DataFrame(rows, columns=columns)
    dataset = TensorDataset(table, ExtractionMode.IMAGE, Task.REGRESSION, label_encoding=None)

    class Age(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(100.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1).mean(1, keepdim=True) * self.scale

    # Image mode needs no voting weights: the test group is predicted without a validation run.
    maps = open_maps(maps_dir, Task.REGRESSION, ExtractionMode.IMAGE)
    predictor(maps, PredictConfig(n_bootstrap=20)).predict_group(Age(), 0, "mae", "test", table, dataset)
    out = maps.layout.group_dir(0, "mae", "test")
    assert sorted(p.name for p in out.iterdir()) == ["test_image_level_metrics.tsv", "test_image_level_prediction.tsv"]
    image = read_tsv(out / "test_image_level_prediction.tsv")
    assert list(image.columns) == ["participant_id", "session_id", "true_label", "predicted_label"]
    np.testing.assert_allclose(image["predicted_label"].astype(float), [70.0, 78.0, 65.0], atol=1e-4)
    metrics = read_tsv(out / "test_image_level_metrics.tsv").set_index("metric")
    assert metrics.index.tolist() == ["mae", "rmse", "r2"]
    assert float(metrics.loc["mae", "value"]) == pytest.approx((0 + 2 + 5) / 3, abs=1e-4)
