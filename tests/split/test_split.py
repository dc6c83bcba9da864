"""Subject-level splits: no leak for any option, coverage, determinism, stratification, balance on counts,
nested (transfer-learning) splits, split files and tamper detection."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bids_app.config import SplitConfig, Task
from bids_app.errors import ConfigError, DataError, InputMissingError, LeakError
from bids_app.labels import format_label_table
from bids_app.maps.splits import Splits, check_disjoint, read_splits
from bids_app.split.balance import age_p_value, sex_p_value
from bids_app.split.files import load_split_file, write_splits
from bids_app.split.make import make_nested_splits, make_splits


def make_table(
    n_subjects: int = 40,
    max_sessions: int = 3,
    task: Task = Task.CLASSIFICATION,
    classes: tuple[str, ...] = ("AD", "CN"),
    seed: int = 0,
) -> pd.DataFrame:
    """A label table: 1..max_sessions sessions per participant, classes in turn, random age and sex."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_subjects):
        n_sessions = int(rng.integers(1, max_sessions + 1))
        base_age, sex = float(rng.normal(72, 6)), str(rng.choice(["F", "M"]))
        label: object = classes[i % len(classes)] if task is not Task.REGRESSION else float(rng.normal(25, 3))
        for s in range(n_sessions):
            session = f"ses-M{12 * s:03d}" if max_sessions > 1 else "n/a"
            rows.append(
                {
                    "participant_id": f"sub-{i:03d}",
                    "session_id": session,
                    "label": label,
                    "age": base_age + s,
                    "sex": sex,
                    "is_baseline": s == 0,
                }
            )
    return pd.DataFrame(rows)


def subjects(frame: pd.DataFrame) -> set[str]:
    return set(frame["participant_id"])


def split_texts(splits: Splits) -> list[str]:
    """Byte-exact rendering of a split, for equality checks."""
    return [format_label_table(splits.test)] + [
        format_label_table(t) for f in splits.folds for t in (f.train, f.validation)
    ]


def assert_leak_free_and_complete(table: pd.DataFrame, splits: Splits, cfg: SplitConfig) -> None:
    everyone = subjects(table)
    test = subjects(splits.test)
    assert len(splits.folds) == cfg.n_splits
    for fold in splits.folds:
        train, validation = subjects(fold.train), subjects(fold.validation)
        assert not train & validation and not test & train and not test & validation
        assert test | train | validation == everyone  # every participant in exactly one place
        seen = pd.concat([fold.train, fold.validation])
        expected = table[~table["participant_id"].isin(test)]
        assert len(seen) == len(expected)  # all sessions of every non-test participant, no more
        assert set(zip(seen["participant_id"], seen["session_id"], strict=True)) == set(
            zip(expected["participant_id"], expected["session_id"], strict=True)
        )
    rows_of_test = table[table["participant_id"].isin(test)]
    if cfg.test_baseline_only:
        rows_of_test = rows_of_test[rows_of_test["is_baseline"]]
    assert len(splits.test) == len(rows_of_test)
    if cfg.n_splits > 1:  # each non-test participant validates exactly once
        validated = [p for f in splits.folds for p in subjects(f.validation)]
        assert sorted(validated) == sorted(everyone - test)


OPTIONS = [
    pytest.param(SplitConfig(), Task.CLASSIFICATION, 3, id="kfold5-fraction-baseline"),
    pytest.param(SplitConfig(n_splits=1, validation_size=0.25), Task.CLASSIFICATION, 3, id="single-split"),
    pytest.param(SplitConfig(test_size=7, n_splits=3), Task.CLASSIFICATION, 3, id="count-test-size"),
    pytest.param(SplitConfig(test_baseline_only=False), Task.CLASSIFICATION, 3, id="all-test-sessions"),
    pytest.param(SplitConfig(n_splits=4), Task.REGRESSION, 3, id="regression"),
    pytest.param(SplitConfig(n_splits=2, validation_size=5), Task.RECONSTRUCTION, 1, id="reconstruction-1-session"),
    pytest.param(SplitConfig(test_size=0.0, n_splits=3), Task.CLASSIFICATION, 2, id="no-test-set"),
    pytest.param(SplitConfig(n_splits=1, validation_size=6, test_size=5), Task.REGRESSION, 1, id="single-counts"),
]


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
@pytest.mark.parametrize(("cfg", "task", "max_sessions"), OPTIONS)
def test_no_leak_and_full_coverage(cfg: SplitConfig, task: Task, max_sessions: int, seed: int) -> None:
    table = make_table(n_subjects=41, max_sessions=max_sessions, task=task, seed=seed, classes=("AD", "CN", "MCI"))
    cfg = SplitConfig(**{**cfg.__dict__, "max_attempts": 30})
    splits = make_splits(table, cfg, task, seed)
    assert_leak_free_and_complete(table, splits, cfg)
    n_test = round(cfg.test_size * 41) if cfg.test_size < 1 else int(cfg.test_size)
    assert len(subjects(splits.test)) == n_test


def test_same_seed_same_split_other_seed_differs() -> None:
    table = make_table(seed=3)
    first, again = (
        make_splits(table, SplitConfig(), Task.CLASSIFICATION, 11),
        make_splits(table, SplitConfig(), Task.CLASSIFICATION, 11),
    )
    assert split_texts(first) == split_texts(again) and first.p_values == again.p_values
    assert first.attempts == again.attempts
    others = [make_splits(table, SplitConfig(), Task.CLASSIFICATION, s) for s in (12, 13)]
    assert all(split_texts(o) != split_texts(first) for o in others)


@pytest.mark.parametrize("task", [Task.CLASSIFICATION, Task.REGRESSION])
def test_row_order_invariance(task: Task) -> None:
    table = make_table(task=task, seed=4)
    shuffled = table.sample(frac=1.0, random_state=9)[list(reversed(table.columns))]
    a, b = make_splits(table, SplitConfig(), task, 5), make_splits(shuffled, SplitConfig(), task, 5)
    assert split_texts(a) == split_texts(b)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_splits", [1, 3, 5])
def test_stratification_within_one_subject(seed: int, n_splits: int) -> None:
    table = make_table(n_subjects=53, classes=("AD", "CN", "CN", "MCI", "CN"), seed=seed)
    cfg = SplitConfig(n_splits=n_splits, validation_size=0.3, max_attempts=5)
    splits = make_splits(table, cfg, Task.CLASSIFICATION, seed)
    first = table.drop_duplicates("participant_id").set_index("participant_id")["label"]
    n_test = round(0.2 * 53)
    test = first[list(subjects(splits.test))]
    rest = first.drop(test.index)
    n_validation = round(0.3 * len(rest))
    for cls, n_cls in first.value_counts().items():
        assert abs((test == cls).sum() - n_cls * n_test / 53) < 1
        n_rest_cls = (rest == cls).sum()
        expected = n_rest_cls * n_validation / len(rest) if n_splits == 1 else n_rest_cls / n_splits
        for fold in splits.folds:
            assert abs((first[list(subjects(fold.validation))] == cls).sum() - expected) < 1
    sizes = [len(subjects(f.validation)) for f in splits.folds]
    assert max(sizes) - min(sizes) <= 1


def test_regression_strata_span_the_label_range() -> None:
    table = make_table(n_subjects=50, task=Task.REGRESSION, seed=3)
    splits = make_splits(table, SplitConfig(test_size=10, n_splits=5), Task.REGRESSION, 1)
    labels = table.drop_duplicates("participant_id").set_index("participant_id")["label"]
    deciles = (labels.rank(method="first").astype(int) - 1) * 10 // 50
    assert sorted(deciles[list(subjects(splits.test))]) == list(range(10))  # one test participant per decile
    for fold in splits.folds:  # 40 left, 8 bins of 5: one per bin in each validation fold
        ranks = (labels.drop(list(subjects(splits.test))).rank(method="first").astype(int) - 1) * 8 // 40
        assert sorted(ranks[list(subjects(fold.validation))]) == list(range(8))


def test_sex_balance_uses_counts_not_proportions() -> None:
    # A visibly imbalanced split: 18 F / 2 M on one side, 4 F / 16 M on the other.
    side_a, side_b = ["F"] * 18 + ["M"] * 2, ["F"] * 4 + ["M"] * 16
    threshold = SplitConfig().balance_p_threshold
    on_proportions = stats.chi2_contingency(np.array([[0.9, 0.1], [0.2, 0.8]])).pvalue
    assert on_proportions > threshold  # what ClinicaDL computed: accepted
    assert sex_p_value(side_a, side_b) < 1e-3 < threshold  # on counts: rejected
    assert sex_p_value(["F", "M"] * 10, ["M", "F"] * 10) > threshold
    assert sex_p_value(["F"] * 3, ["n/a", "F"]) == 1.0  # one sex: nothing to test


def test_age_p_value() -> None:
    young, old = np.array([60.0, 61, 62, 63, 59]), np.array([80.0, 81, 79, 82, 78])
    assert age_p_value(young, old) < 1e-5 and age_p_value(young, young + 0.1) > 0.8
    assert age_p_value(np.array([70.0]), old) == 1.0 and age_p_value(np.array([70.0, np.nan]), old) == 1.0


def test_recorded_p_values_are_count_based_and_above_threshold() -> None:
    table = make_table(n_subjects=60, seed=8)
    cfg = SplitConfig(n_splits=3)
    splits = make_splits(table, cfg, Task.CLASSIFICATION, 2)
    assert splits.p_values and min(splits.p_values.values()) > cfg.balance_p_threshold
    first = table.drop_duplicates("participant_id").set_index("participant_id")
    for fold in splits.folds:
        val, train = first.loc[sorted(subjects(fold.validation))], first.loc[sorted(subjects(fold.train))]
        for cls in ("AD", "CN"):
            a, b = val[val["label"] == cls], train[train["label"] == cls]
            counts = np.array([[(a["sex"] == s).sum(), (b["sex"] == s).sum()] for s in ("F", "M")]).T
            expected = stats.chi2_contingency(counts).pvalue
            assert math.isclose(splits.p_values[f"split-{fold.index}/sex[{cls}]"], expected)
            welch = stats.ttest_ind(a["age"], b["age"], equal_var=False).pvalue
            assert math.isclose(splits.p_values[f"split-{fold.index}/age[{cls}]"], welch)


def test_attempts_are_bounded_and_best_draw_kept(caplog: pytest.LogCaptureFixture) -> None:
    table = make_table(n_subjects=30, seed=1)
    cfg = SplitConfig(n_splits=2, balance_p_threshold=0.999999, max_attempts=7)
    with caplog.at_level(logging.WARNING, logger="bids_app.split.balance"):
        splits = make_splits(table, cfg, Task.CLASSIFICATION, 0)
    assert splits.attempts == 14  # 7 per stage, then the best draw
    assert sum("best-balanced" in r.getMessage() for r in caplog.records) == 2
    assert "split-0/age[AD]=" in caplog.text
    assert_leak_free_and_complete(table, splits, cfg)


def test_balanced_split_needs_fewer_attempts_than_max() -> None:
    splits = make_splits(make_table(n_subjects=60, seed=2), SplitConfig(), Task.CLASSIFICATION, 0)
    assert 2 <= splits.attempts < 2 * SplitConfig().max_attempts


def test_too_few_participants_for_folds() -> None:
    with pytest.raises(
        DataError, match=r"Only 4 participant\(s\) remain after holding out 1 for test.*5 folds.*--n-splits"
    ):
        make_splits(make_table(n_subjects=5, task=Task.REGRESSION), SplitConfig(), Task.REGRESSION, 0)
    with pytest.raises(DataError, match=r"Regression labels must be numbers; got 'AD'"):
        make_splits(make_table(), SplitConfig(), Task.REGRESSION, 0)
    table = make_table(n_subjects=30, classes=("AD",) * 9 + ("CN",))  # 3 CN
    with pytest.raises(DataError, match=r"Class 'CN' has \d participant\(s\) outside the test set.*fewer than 5 folds"):
        make_splits(table, SplitConfig(), Task.CLASSIFICATION, 0)


@pytest.mark.parametrize(
    "cfg",
    [
        SplitConfig(n_splits=0),
        SplitConfig(test_size=2.5),
        SplitConfig(max_attempts=0),
        SplitConfig(n_splits=1, validation_size=0),
    ],
)
def test_config_errors(cfg: SplitConfig) -> None:
    with pytest.raises(ConfigError):
        make_splits(make_table(), cfg, Task.CLASSIFICATION, 0)


def nested_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Subset: sMCI/pMCI participants; parent: CN/AD, where pMCI participants have later AD sessions."""
    subset = make_table(n_subjects=30, classes=("sMCI", "pMCI"), seed=5, max_sessions=1)
    parent_rows = []
    for row in subset.itertuples(index=False):
        if row.label == "pMCI":  # converted: an AD session two years later
            parent_rows.append({**row._asdict(), "session_id": "ses-M024", "label": "AD", "is_baseline": True})
    extra = make_table(n_subjects=40, classes=("CN", "AD"), seed=6, max_sessions=2)
    extra["participant_id"] = extra["participant_id"].str.replace("sub-", "sub-9")
    return subset, pd.concat([pd.DataFrame(parent_rows), extra], ignore_index=True)


@pytest.mark.parametrize("n_splits", [1, 3])
def test_nested_splits_keep_sides(n_splits: int) -> None:
    subset_table, parent_table = nested_tables()
    cfg = SplitConfig(n_splits=n_splits, max_attempts=50)
    subset, parent = make_nested_splits(subset_table, parent_table, cfg, Task.CLASSIFICATION, 3)
    in_parent = subjects(parent_table)
    assert subjects(subset.test) & in_parent  # the constraint is exercised
    assert subjects(subset.test) & in_parent <= subjects(parent.test)
    for child, adult in zip(subset.folds, parent.folds, strict=True):
        assert subjects(child.validation) & in_parent <= subjects(adult.validation)
        assert subjects(child.train) & in_parent <= subjects(adult.train)
        # the leak transfer learning would cause: the subset's evaluation participants in parent training
        assert not (subjects(subset.test) | subjects(child.validation)) & subjects(adult.train)
    assert_leak_free_and_complete(parent_table, parent, cfg)


def test_constraints_need_same_fold_count() -> None:
    subset_table, parent_table = nested_tables()
    subset = make_splits(subset_table, SplitConfig(n_splits=2), Task.CLASSIFICATION, 0)
    with pytest.raises(DataError, match=r"2 fold\(s\) but split\.n_splits is 3"):
        make_splits(parent_table, SplitConfig(n_splits=3), Task.CLASSIFICATION, 0, constraints=subset)


@pytest.mark.parametrize("first", ["bids_app.maps.splits", "bids_app.split.make", "bids_app.split.files"])
def test_split_modules_import_in_either_order(first: str) -> None:
    """split.files and split.make depend on maps.splits, never the reverse: a fresh interpreter may import any first."""
    check = (
        f"import sys, {first}; "
        f"assert {first!r} != 'bids_app.maps.splits' or not any(m.startswith('bids_app.split') for m in sys.modules); "
        "from bids_app.split import files, make; from bids_app.maps import splits; "
        "assert files.Splits is splits.Splits and make.Splits is splits.Splits"
    )
    subprocess.run([sys.executable, "-c", check], check=True, cwd=Path(__file__).parents[2], timeout=60)


def test_write_read_round_trip(tmp_path: Path) -> None:
    table = make_table(seed=2).assign(tensor_path="/abs/x.npy")  # joined by the group level; not written
    cfg = SplitConfig(n_splits=3)
    splits = make_splits(table, cfg, Task.CLASSIFICATION, 4)
    write_splits(tmp_path, splits, table, cfg)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert names == [
        "demographics.tsv",
        *[f"split-{k}/{s}.tsv" for k in range(3) for s in ("train", "validation")],
        "splits.json",
        "test/data.tsv",
        "train+validation.tsv",
    ]
    record = json.loads((tmp_path / "splits.json").read_text())
    assert record["seed"] == 4 and record["attempts"] == splits.attempts and record["config"]["n_splits"] == 3
    assert set(record["p_values"]) == {"test", "split-0", "split-1", "split-2"}
    for name, digest in record["files"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest
    assert len(record["label_table_sha256"]) == 64
    back = read_splits(tmp_path)
    assert "tensor_path" not in (tmp_path / "split-0" / "train.tsv").read_text()
    written = [
        t.drop(columns="tensor_path")
        for t in (splits.test, *(x for f in splits.folds for x in (f.train, f.validation)))
    ]
    assert split_texts(back) == [format_label_table(t) for t in written]
    assert back.p_values == splits.p_values and back.seed == 4
    union = pd.read_csv(tmp_path / "train+validation.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert len(union) == len(pd.concat([splits.folds[0].train, splits.folds[0].validation]))
    assert not subjects(union) & subjects(splits.test)


def test_rewrite_with_fewer_folds_removes_stale_folds(tmp_path: Path) -> None:
    table = make_table(seed=2)
    for n_splits in (4, 2):
        cfg = SplitConfig(n_splits=n_splits, max_attempts=20)
        write_splits(tmp_path, make_splits(table, cfg, Task.CLASSIFICATION, 0), table, cfg)
    assert sorted(p.name for p in tmp_path.glob("split-*")) == ["split-0", "split-1"]
    assert len(read_splits(tmp_path).folds) == 2


def test_read_splits_detects_tampering(tmp_path: Path) -> None:
    table = make_table(seed=2)
    write_splits(
        tmp_path, make_splits(table, SplitConfig(n_splits=2), Task.CLASSIFICATION, 0), table, SplitConfig(n_splits=2)
    )
    train = tmp_path / "split-0" / "train.tsv"
    moved = pd.read_csv(tmp_path / "test" / "data.tsv", sep="\t", dtype=str, keep_default_na=False).head(1)
    train.write_text(train.read_text() + format_label_table(moved).split("\n", 1)[1])  # a test participant
    with pytest.raises(DataError, match=r"split-0/train\.tsv changed after the split was written") as info:
        read_splits(tmp_path)
    assert info.value.exit_code == 65
    (tmp_path / "splits.json").unlink()
    with pytest.raises(InputMissingError, match=r"splits\.json"):
        read_splits(tmp_path)


def write_split_file(path: Path, rows: list[tuple[str, str, str]], sessions: list[str] | None = None) -> Path:
    frame = pd.DataFrame(rows, columns=["participant_id", "split", "side"])
    if sessions is not None:
        frame.insert(1, "session_id", sessions)
    frame.to_csv(path, sep="\t", index=False)
    return path


def test_load_split_file(tmp_path: Path) -> None:
    table = make_table(n_subjects=6, seed=1)
    rows = [("sub-000", "test", "n/a"), ("sub-001", "test", "")]
    rows += [("sub-002", "0", "validation"), ("sub-003", "0", "train"), ("sub-004", "0", "train")]
    rows += [("sub-002", "1", "train"), ("sub-003", "1", "validation"), ("sub-005", "1", "train")]
    splits = load_split_file(write_split_file(tmp_path / "split.tsv", rows), table)
    assert subjects(splits.test) == {"sub-000", "sub-001"} and splits.seed == -1
    assert len(splits.test) == len(table[table["participant_id"].isin(["sub-000", "sub-001"])])  # every session
    assert [subjects(f.validation) for f in splits.folds] == [{"sub-002"}, {"sub-003"}]
    assert [subjects(f.train) for f in splits.folds] == [{"sub-003", "sub-004"}, {"sub-002", "sub-005"}]
    with_sessions = write_split_file(tmp_path / "s.tsv", rows, ["ses-M000", *["n/a"] * 7])
    assert len(load_split_file(with_sessions, table).test) == 1 + len(table[table["participant_id"] == "sub-001"])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [("sub-001", "0", "train"), ("sub-001", "0", "validation"), ("sub-002", "0", "train")],
            r"fold 0 train vs validation.*sub-001",
        ),
        (
            [("sub-003", "test", ""), ("sub-003", "1", "train"), ("sub-004", "0", "validation")],
            r"test vs train/validation.*sub-003",
        ),
    ],
)
def test_split_file_with_leak_is_rejected(tmp_path: Path, rows: list[tuple[str, str, str]], message: str) -> None:
    with pytest.raises(LeakError, match=message) as info:
        load_split_file(write_split_file(tmp_path / "split.tsv", rows), make_table(n_subjects=6))
    assert info.value.exit_code == 65


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([("sub-001", "fold1", "train")], r"split='fold1'.*'test' or a fold index"),
        ([("sub-001", "0", "test")], r"side 'train' or 'validation'"),
        ([("sub-001", "0", "train"), ("sub-002", "2", "validation")], r"fold indices \[0, 2\]"),
    ],
)
def test_split_file_bad_values(tmp_path: Path, rows: list[tuple[str, str, str]], message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_split_file(write_split_file(tmp_path / "split.tsv", rows), make_table(n_subjects=6))


def test_check_disjoint_names_up_to_ten() -> None:
    a = pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(12)]})
    check_disjoint(a.head(5), a.tail(5), "test vs train")
    with pytest.raises(
        LeakError, match=r"test vs train: 12 participant\(s\) on both sides: sub-0, sub-1, .*sub-9 \.\.\. \(12 in all\)"
    ) as info:
        check_disjoint(a, a, "test vs train")
    assert "sub-10" not in str(info.value)
