"""Dataset identity: a participant label names a person only inside its dataset; scans and anatomy are checked
across datasets (bids_app.data.origin, bids_app.prediction.leakage)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bids_app.config import ExtractionMode
from bids_app.data.origin import DatasetIdentity, identify_dataset, read_dataset_identity, same_dataset
from bids_app.data.tables import index_tensors
from bids_app.prediction.leakage import LabelCoincidence, LeakFinding, find_label_coincidences, find_leaks
from tests.conftest import make_cohort, make_dataset, run_cli

DESCRIPTION = {"Name": "Study", "BIDSVersion": "1.9.0", "Authors": ["A. B."], "DatasetDOI": "doi:10.1/x"}


def test_dataset_id_follows_the_description_not_its_path_nor_its_bids_version(tmp_path: Path) -> None:
    first = identify_dataset(DESCRIPTION)
    assert first == identify_dataset({**DESCRIPTION, "BIDSVersion": "1.10.0", "DatasetLinks": {"a": "b"}})
    assert first.name == "Study" and first.doi == "doi:10.1/x" and first.dataset_id.startswith("ds-")
    # same Name, independently made: another generator seed or other authors give another id
    other = identify_dataset({**DESCRIPTION, "GeneratedBy": [{"Name": "gen", "Description": "seed=2"}]})
    assert other.name == first.name and other.dataset_id != first.dataset_id
    assert identify_dataset({"Name": "Study"}).doi == "n/a"
    for folder in ("one", "two/deeper"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "dataset_description.json").write_text(json.dumps(DESCRIPTION))
    assert read_dataset_identity(tmp_path / "one") == read_dataset_identity(tmp_path / "two/deeper") == first
    assert read_dataset_identity(tmp_path / "absent") == DatasetIdentity()
    assert DatasetIdentity.from_sidecar(first.to_sidecar()) == first
    assert same_dataset("n/a", first.dataset_id) and not same_dataset(other.dataset_id, first.dataset_id)


def test_generated_datasets_differ_by_their_settings_and_repeat_with_them(tmp_path: Path) -> None:
    ids = [read_dataset_identity(make_dataset(tmp_path / name, 2, 1, seed=seed).bids_dir) for name, seed in
           (("a", 1), ("b", 2), ("c", 1))]  # fmt: skip
    assert ids[0].name == ids[1].name  # the generator writes one Name for every dataset
    assert ids[0].dataset_id != ids[1].dataset_id
    assert ids[0].dataset_id == ids[2].dataset_id  # same settings, same images: one dataset


def table(rows: list[tuple[str, str, str, str, str]]) -> pd.DataFrame:
    columns = ["participant_id", "session_id", "source_sha256", "raw_source_sha256", "dataset_id"]
    return pd.DataFrame(rows, columns=columns)


def test_participant_rule_inside_one_dataset_checksums_across_datasets() -> None:
    train = table([("sub-001", "ses-M000", "s1", "r1", "ds-a"), ("sub-002", "ses-M000", "s2", "r2", "ds-a")])
    group = table(
        [
            ("sub-001", "ses-M000", "s9", "r9", "ds-b"),  # same label, another dataset: information
            ("sub-002", "ses-M012", "s8", "r8", "ds-a"),  # same label, same dataset: a leak
            ("sub-003", "ses-M000", "s7", "r2", "ds-b"),  # sub-002's raw scan renamed in another dataset
            ("sub-001", "ses-M024", "s6", "r6", "n/a"),  # unknown dataset: the cautious side
        ]
    )
    assert find_leaks(group, train) == [
        LeakFinding("participant", "sub-002", "ses-M012", "sub-002", "ses-M000", ""),
        LeakFinding("participant", "sub-001", "ses-M024", "sub-001", "ses-M000", ""),
        LeakFinding("raw_source_sha256", "sub-003", "ses-M000", "sub-002", "ses-M000", "r2"),
    ]
    assert find_label_coincidences(group, train) == [
        LabelCoincidence("sub-001", "ses-M000", "ds-b", "sub-001", "ses-M000", "ds-a")
    ]
    # tables without dataset ids (an older model folder): every label is checked, none is information
    assert len(find_leaks(group.drop(columns="dataset_id"), train.drop(columns="dataset_id"))) == 4
    assert find_label_coincidences(group.drop(columns="dataset_id"), train) == []


# -- end to end through the command line --------------------------------------------------------------

OPTIONS = ("--modes", "image", "--skip-bids-validation")


def group_args(dataset, out: Path, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn",
            "--mode", "image", "--epochs", "1", "--batch-size", "4", "--n-splits", "2", "--test-size", "0.25",
            "--model-name", "cnn", "--seed", "1", *extra]  # fmt: skip


def copy_under_new_labels(src: Path, dst: Path, mapping: dict[str, str]) -> None:
    """``src`` (a BIDS dataset with its derivatives) copied to ``dst``, every ``sub-<old>`` renamed ``sub-<new>``."""

    def renamed(text: str) -> str:
        for old, new in mapping.items():
            text = text.replace(f"sub-{old}", f"sub-{new}")
        return text

    for path in sorted(src.rglob("*")):
        target = dst / renamed(path.relative_to(src).as_posix())
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix in (".tsv", ".json"):
            target.write_text(renamed(path.read_text()))
        else:
            shutil.copyfile(path, target)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory):
    """Site A (trained), B (independent, labels 001-004 like A's), C (A copied under labels 301-306) and D (labels
    005-007: 005 and 006 are re-scans of A's 001 and 002)."""
    root = tmp_path_factory.mktemp("sites")
    first, out_a = make_cohort(root / "a", 6, 2, *OPTIONS, seed=41, effect_size=0.5)
    _, out_b = make_cohort(root / "b", 4, 1, *OPTIONS, seed=42, effect_size=0.5)
    copy_under_new_labels(first.bids_dir, root / "c" / "bids", {f"00{k}": f"30{k}" for k in range(1, 7)})
    out_c = root / "c" / "out"
    result = run_cli(str(root / "c" / "bids"), str(out_c), "participant", "-d",
                     str(root / "c" / "bids" / "derivatives" / "preproc"), "--template", str(first.template_path),
                     "--crop-shape", "40", "48", "40", *OPTIONS)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    _, out_d = make_cohort(root / "d", 3, 1, *OPTIONS, seed=43, effect_size=0.5, first_label=5, rescans_of=first,
                           n_rescans=2)  # fmt: skip
    train = run_cli(*group_args(first, out_a))
    assert train.returncode == 0, train.stderr[-3000:]
    return first, out_a, out_b, out_c, out_d


def test_index_carries_each_images_dataset(sites) -> None:
    first, out_a, out_b, out_c, _ = sites
    tables = [index_tensors(out, ExtractionMode.IMAGE) for out in (out_a, out_b, out_c)]
    ids = [set(t["dataset_id"]) for t in tables]
    assert all(len(i) == 1 for i in ids)
    assert ids[0] != ids[1]  # independently generated, same Name
    assert ids[0] == ids[2]  # a copy at another path is the same dataset
    assert ids[0] == {read_dataset_identity(first.bids_dir).dataset_id}
    assert set(tables[1]["dataset_name"]) == {"bids_app synthetic dataset"} and set(tables[1]["dataset_doi"]) == {"n/a"}


def test_overlapping_labels_of_another_dataset_predict_and_are_reported(sites) -> None:
    first, out_a, out_b, _, _ = sites
    result = run_cli(*group_args(first, out_a, "--stages", "predict", "--predict-from", str(out_b),
                                 "--group-name", "siteb"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    maps = out_a / "models" / "cnn"
    pool = set(pd.read_csv(maps / "groups" / "train+validation.tsv", sep="\t")["participant_id"])
    shared = {f"sub-00{k}" for k in range(1, 5)} & pool
    assert shared, "some of site B's labels name training participants of site A"
    assert "not leaks" in result.stderr
    for split in (0, 1):
        folder = maps / f"split-{split}" / "best-loss" / "siteb"
        assert len(pd.read_csv(folder / "siteb_image_level_prediction.tsv", sep="\t")) == 4
        assert not (folder / "leak_warning.json").exists()
        report = json.loads((folder / "leak_report.json").read_text())
        assert report["Refused"] is False and report["Leaks"] == []
        pairs = report["SameLabelOtherDataset"]["Pairs"]
        assert {p["participant_id"] for p in pairs} == shared
        assert all(p["participant_id"] == p["train_participant_id"] for p in pairs)
        assert all(p["dataset_id"] != p["train_dataset_id"] for p in pairs)
        assert report["Datasets"]["Group"][0]["n_images"] == 4


def test_a_copy_under_new_labels_is_refused_by_its_checksums(sites) -> None:
    first, out_a, _, out_c, _ = sites
    result = run_cli(*group_args(first, out_a, "--stages", "predict", "--predict-from", str(out_c),
                                 "--group-name", "sitec"))  # fmt: skip
    assert result.returncode == 65, result.stderr[-3000:]
    assert "sub-301 ses-M000 ~ sub-001 ses-M000" in result.stderr or "sub-301" in result.stderr
    assert "source_sha256" in result.stderr and "(participant" not in result.stderr
    maps = out_a / "models" / "cnn"
    report = json.loads((maps / "split-0" / "best-loss" / "sitec" / "leak_report.json").read_text())
    assert report["Refused"] is True
    assert {p["reason"] for p in report["Leaks"]} >= {"source_sha256", "raw_source_sha256"}
    assert not list(maps.glob("split-*/best-loss/sitec/*_prediction.tsv"))


def test_rescans_in_another_dataset_are_refused_by_their_anatomy(sites) -> None:
    first, out_a, _, _, out_d = sites
    result = run_cli(*group_args(first, out_a, "--stages", "predict", "--predict-from", str(out_d),
                                 "--group-name", "sited"))  # fmt: skip
    assert result.returncode == 65, result.stderr[-3000:]
    assert "fingerprint" in result.stderr and "(participant" not in result.stderr
    maps = out_a / "models" / "cnn"
    pool = set(pd.read_csv(maps / "groups" / "train+validation.tsv", sep="\t")["participant_id"])
    report = json.loads((maps / "split-0" / "best-loss" / "sited" / "leak_report.json").read_text())
    found = {(p["participant_id"], p["train_participant_id"]) for p in report["Leaks"]}
    assert found == {(new, old) for new, old in (("sub-005", "sub-001"), ("sub-006", "sub-002")) if old in pool}
    assert {p["reason"] for p in report["Leaks"]} == {"fingerprint"}


def test_same_labels_inside_one_dataset_are_refused_as_participants(sites, tmp_path: Path) -> None:
    """Other scans filed under site A's own description (one dataset): its sub-00k are site A's sub-00k."""
    first, out_a, out_b, _, _ = sites
    bids = tmp_path / "bids"
    shutil.copytree(out_b.parent / "bids", bids)
    shutil.copyfile(first.bids_dir / "dataset_description.json", bids / "dataset_description.json")
    made = run_cli(str(bids), str(tmp_path / "out"), "participant", "-d", str(bids / "derivatives" / "preproc"),
                   "--template", str(first.template_path), "--crop-shape", "40", "48", "40", *OPTIONS)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    result = run_cli(*group_args(first, out_a, "--stages", "predict", "--predict-from", str(tmp_path / "out"),
                                 "--group-name", "samesite"))  # fmt: skip
    assert result.returncode == 65, result.stderr[-3000:]
    assert "(participant)" in result.stderr and "sha256" not in result.stderr.strip().splitlines()[-1]
    assert "give them a distinct Name or DatasetDOI" in result.stderr
    report = json.loads(
        (out_a / "models" / "cnn" / "split-0" / "best-loss" / "samesite" / "leak_report.json").read_text()
    )
    assert {p["reason"] for p in report["Leaks"]} == {"participant"}
    assert report["SameLabelOtherDataset"]["Pairs"] == []
