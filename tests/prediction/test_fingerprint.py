"""Identity leaks: the same person re-scanned under another name is caught from the preprocessed images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_app.errors import DataError
from bids_app.prediction import identity as fingerprint
from tests.conftest import make_cohort, run_cli

CROP = ("40", "48", "40")


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


# -- calibration and matching on known vectors ----------------------------------------------------------


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_calibration_scores_pairs_as_new_images_and_sits_between_strangers_and_rescans() -> None:
    rng = np.random.default_rng(0)
    people = rng.standard_normal((6, 500))
    values = np.concatenate([people + 0.5 * rng.standard_normal(people.shape) for _ in range(2)])
    ids = [f"sub-{i}" for i in range(6)] * 2
    calibration = fingerprint.calibrate(values, ids, ["ses-1"] * 6 + ["ses-2"] * 6)
    assert calibration is not None
    # reference: a stranger is left out of the mean with all its images, a re-scan alone
    different, same = [], []
    for a in range(12):
        for b in range(12):
            if a == b:
                continue
            kept = [k for k in range(12) if (k != a if ids[a] == ids[b] else ids[k] != ids[a])]
            mean = values[kept].mean(axis=0)
            (same if ids[a] == ids[b] else different).append(cosine(values[a] - mean, values[b] - mean))
    assert calibration.n_different_pairs == 60 and calibration.n_same_pairs == 6
    assert calibration.max_different == pytest.approx(max(different), abs=1e-6)
    assert calibration.mean_different == pytest.approx(np.mean(different), abs=1e-6)
    assert abs(calibration.mean_different) < 0.05  # unbiased: the full-mean scores average -1/5
    assert calibration.min_same == pytest.approx(min(same), abs=1e-6)
    assert calibration.separable
    assert calibration.threshold == pytest.approx((max(different) + min(same)) / 2, abs=1e-5)

    # a new scan of person 2 is flagged against both of its sessions; a stranger against nothing
    mean = values.mean(axis=0)
    new = unit(np.stack([people[2] + 0.5 * rng.standard_normal(500), rng.standard_normal(500)]) - mean)
    pairs = fingerprint.matching_pairs(new, unit(values - mean), calibration.threshold)
    assert sorted((i, j) for i, j, _ in pairs) == [(0, 2), (0, 8)]
    assert all(score > calibration.threshold for *_, score in pairs)


def test_calibration_without_sessions_or_people() -> None:
    rng = np.random.default_rng(1)
    prints = rng.standard_normal((5, 200))
    calibration = fingerprint.calibrate(prints, [f"sub-{i}" for i in range(5)], ["n/a"] * 5)
    assert calibration is not None and calibration.min_same is None and calibration.n_same_pairs == 0
    assert calibration.threshold == pytest.approx(calibration.max_different + calibration.sd_different, abs=1e-5)
    assert fingerprint.calibrate(prints, ["sub-1"] * 5, [f"ses-{i}" for i in range(5)]) is None


def test_fingerprints_refuse_another_grid() -> None:
    volumes = np.random.default_rng(2).random((3, 4, 5, 6)).astype(np.float32) + 1
    model = fingerprint.fit_model(volumes)
    prints = fingerprint.fingerprints(volumes, model)
    assert prints.shape == (3, int(model.mask.sum()))
    np.testing.assert_allclose(np.linalg.norm(prints, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(DataError, match="preprocessed differently"):
        fingerprint.fingerprints(volumes[:, :3], model)


# -- end to end through the command line --------------------------------------------------------------


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory):
    """A trained cohort (8 x 2 sessions) and a second cohort whose first 3 participants are its re-scans."""
    root = tmp_path_factory.mktemp("identity")
    options = ("--modes", "image", "--skip-bids-validation")
    first, out_a = make_cohort(root / "a", 8, 2, *options, seed=21, effect_size=0.5)
    second, out_b = make_cohort(root / "b", 5, 1, *options, seed=22, effect_size=0.5, first_label=101,
                                rescans_of=first, n_rescans=3)  # fmt: skip
    train = run_cli(*group_args(first, out_a))
    assert train.returncode == 0, train.stderr[-3000:]
    return first, second, out_a, out_b


def group_args(dataset, out: Path, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn",
            "--mode", "image", "--epochs", "1", "--batch-size", "4", "--n-splits", "2", "--test-size", "0.25",
            "--model-name", "cnn", "--seed", "1", *extra]  # fmt: skip


def expected_pairs(first, second, maps: Path) -> set[tuple[str, str]]:
    pool = set(read_tsv(maps / "groups" / "train+validation.tsv")["participant_id"])
    return {(f"sub-{new}", f"sub-{old}") for new, old in second.rescans if f"sub-{old}" in pool}


def test_rescans_under_new_names_are_refused_and_distinct_people_pass(cohorts) -> None:
    first, second, out_a, out_b = cohorts
    assert [new for new, _ in second.rescans] == ["101", "102", "103"]
    maps = out_a / "models" / "cnn"
    expected = expected_pairs(first, second, maps)
    assert expected, "at least one re-scanned participant is in the training pool"
    result = run_cli(*group_args(first, out_a, "--stages", "predict", "--predict-from", str(out_b),
                                 "--group-name", "cohortb"))  # fmt: skip
    assert result.returncode == 65, result.stderr[-3000:]
    assert "fingerprint" in result.stderr and "groups/identity_fingerprints.json" in result.stderr
    assert any(f"{new} ses-M000 ~ {old}" in result.stderr for new, old in expected)
    record = json.loads((maps / "groups" / "identity_fingerprints.json").read_text())
    calibration = record["Calibration"]
    assert calibration["max_different"] < calibration["threshold"] < calibration["min_same"]
    assert calibration["n_same_pairs"] > 0 and calibration["separable"] is True
    pairs = record["Checks"]["cohortb"]["Pairs"]
    # every re-scan of a training participant, against each of its sessions; nobody else
    assert {(p["participant_id"], p["train_participant_id"]) for p in pairs} == expected
    assert len(pairs) == 2 * len(expected)
    assert all(p["similarity"] > calibration["threshold"] for p in pairs)
    assert not list(maps.glob("split-*/best-loss/cohortb/*_prediction.tsv"))


def test_allow_leak_predicts_and_records_the_identity_pairs(cohorts) -> None:
    first, second, out_a, out_b = cohorts
    maps = out_a / "models" / "cnn"
    result = run_cli(*group_args(first, out_a, "--stages", "predict", "--predict-from", str(out_b),
                                 "--group-name", "cohortb2", "--allow-leak"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for split in (0, 1):
        folder = maps / f"split-{split}" / "best-loss" / "cohortb2"
        assert len(read_tsv(folder / "cohortb2_image_level_prediction.tsv")) == 5
        warning = json.loads((folder / "leak_warning.json").read_text())
        identity = [p for p in warning["Pairs"] if p["reason"] == "fingerprint"]
        assert {(p["participant_id"], p["train_participant_id"]) for p in identity} == expected_pairs(
            first, second, maps
        )
        assert all(p["participant_id"] in {"sub-101", "sub-102", "sub-103"} for p in warning["Pairs"])


@pytest.mark.slow
def test_rescans_are_caught_after_t1_linear(tmp_path: Path) -> None:
    """Noise, bias and pose of a new acquisition, then t1-linear: the person is still recognised."""
    from bids_app.config import ExtractionMode
    from bids_app.data.tables import index_tensors
    from bids_app.synthetic.dataset import generate_dataset

    first = generate_dataset(tmp_path / "a", n_subjects=4, n_sessions=2, seed=31)
    second = generate_dataset(tmp_path / "b", n_subjects=4, n_sessions=1, seed=32, first_label=101,
                              rescans_of=first, n_rescans=2)  # fmt: skip
    tables = []
    for dataset, name in ((first, "out_a"), (second, "out_b")):
        result = run_cli(str(dataset.bids_dir), str(tmp_path / name), "participant", "--template",
                         str(dataset.template_path), "--crop-shape", *CROP, "--modes", "image", "--nprocs", "2",
                         "--skip-bids-validation")  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        tables.append(index_tensors(tmp_path / name, ExtractionMode.IMAGE))
    volumes = [
        np.stack([fingerprint.lowres_volume(fingerprint.preprocessed_image_path(Path(p))) for p in t["tensor_path"]])
        for t in tables
    ]
    model = fingerprint.fit_model(volumes[0])
    pool = fingerprint.fingerprints(volumes[0], model)
    values = fingerprint.features(volumes[0], model)
    calibration = fingerprint.calibrate(values, tables[0]["participant_id"].tolist(), tables[0]["session_id"].tolist())
    assert calibration is not None and calibration.separable
    pairs = fingerprint.matching_pairs(fingerprint.fingerprints(volumes[1], model), pool, calibration.threshold)
    found = {(tables[1]["participant_id"][i], tables[0]["participant_id"][j]) for i, j, _ in pairs}
    assert found == {(f"sub-{new}", f"sub-{old}") for new, old in second.rescans}
