"""Portable models end to end: export, import, predict at another site, and the travelling leak guard.

One model is trained on cohort A (8 participants x 2 sessions); the other sites are processed at participant
level like a receiving site would: B (4 new people), C (2 of its 4 participants are re-scans of A's, under new
names) and D (B plus a renamed byte-for-byte copy of a training participant's scan).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from bids_app.cli.model import main as model_main
from tests.conftest import TINY_CROP, make_cohort, run_cli

OPTIONS = ("--modes", "image", "--skip-bids-validation")


def group_args(bids_dir: Path, out: Path, *extra: str) -> list[str]:
    return [str(bids_dir), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn", "--mode",
            "image", "--epochs", "1", "--batch-size", "4", "--n-splits", "2", "--test-size", "0.25", "--model-name",
            "cnn", "--seed", "1", *extra]  # fmt: skip


def renamed_copy(first, second, root: Path, training_participant: str) -> tuple[Path, Path]:
    """Site B's dataset plus ``training_participant``'s first session of cohort A, renamed sub-301 (same bytes)."""
    bids = root / "bids"
    shutil.copytree(second.bids_dir, bids)
    label = training_participant.removeprefix("sub-")
    session = f"ses-{first.sessions[0]}"
    for source_root, dest_root in ((first.bids_dir, bids), (first.derivative_dir, bids / "derivatives" / "preproc")):
        for path in (source_root / training_participant / session / "anat").iterdir():
            dest = dest_root / "sub-301" / session / "anat" / path.name.replace(f"sub-{label}", "sub-301")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    sessions = pd.read_csv(first.bids_dir / training_participant / f"{training_participant}_sessions.tsv", sep="\t",
                           dtype=str, keep_default_na=False)  # fmt: skip
    sessions[sessions["session_id"] == session].to_csv(bids / "sub-301" / "sub-301_sessions.tsv", sep="\t", index=False)
    participants = pd.read_csv(first.bids_dir / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    row = participants[participants["participant_id"] == training_participant].assign(participant_id="sub-301")
    table = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    pd.concat([table, row]).to_csv(bids / "participants.tsv", sep="\t", index=False)
    out = root / "out"
    result = run_cli(str(bids), str(out), "participant", "-d", str(bids / "derivatives" / "preproc"), "--template",
                     str(first.template_path), "--crop-shape", *TINY_CROP, "--nprocs", "2", *OPTIONS)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return bids, out


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("portable")
    first, out_a = make_cohort(root / "a", 8, 2, *OPTIONS, seed=21, effect_size=0.5)
    train = run_cli(*group_args(first.bids_dir, out_a))
    assert train.returncode == 0, train.stderr[-3000:]
    second, out_b = make_cohort(root / "b", 4, 1, *OPTIONS, seed=22, effect_size=0.5, first_label=201)
    third, out_c = make_cohort(root / "c", 4, 1, *OPTIONS, seed=23, effect_size=0.5, first_label=101,
                               rescans_of=first, n_rescans=2)  # fmt: skip
    maps = out_a / "models" / "cnn"
    pool = pd.read_csv(maps / "groups" / "train+validation.tsv", sep="\t", dtype=str)
    bids_d, out_d = renamed_copy(first, second, root / "d", pool["participant_id"].iloc[0])
    archive = root / "cnn.zip"
    assert model_main(["export", str(maps), str(archive)]) == 0
    return {"root": root, "a": (first.bids_dir, out_a), "b": (second.bids_dir, out_b), "c": (third, out_c),
            "d": (bids_d, out_d), "maps": maps, "archive": archive, "pool": pool}  # fmt: skip


def predictions(maps: Path, group: str) -> dict[str, bytes]:
    """Every TSV the network and the linear baseline wrote for ``group``, by path in the model folder."""
    paths = [*maps.glob(f"split-*/best-*/{group}/*.tsv"), *maps.glob(f"split-*/baseline/best-*/{group}/*.tsv")]
    return dict(sorted((p.relative_to(maps).as_posix(), p.read_bytes()) for p in paths))


def test_export_import_predict_is_byte_identical_to_the_original_folder(sites, tmp_path: Path) -> None:
    bids_a, out_a = sites["a"]
    bids_b, out_b = sites["b"]
    original = run_cli(*group_args(bids_a, out_a, "--stages", "predict", "--predict-from", str(out_b),
                                   "--group-name", "siteb"))  # fmt: skip
    assert original.returncode == 0, original.stderr[-3000:]
    expected = predictions(sites["maps"], "siteb")
    kinds = ("confusion_matrix", "image_level_metrics", "image_level_prediction")
    network = [f"split-{k}/best-loss/siteb/siteb_{kind}.tsv" for k in (0, 1) for kind in kinds]
    baseline = [f"split-{k}/baseline/best-loss/siteb/siteb_{kind}.tsv" for k in (0, 1) for kind in kinds[1:]]
    assert set(network) <= set(expected) and set(baseline) <= set(expected), sorted(expected)
    assert b"baseline_value" in expected["split-0/best-loss/siteb/siteb_image_level_metrics.tsv"]

    # the archive given straight to the group level: imported into OUTPUT_DIR/models/cnn, then predicted
    site = tmp_path / "site_b"
    shutil.copytree(out_b, site)
    result = run_cli(str(bids_b), str(site), "group", "--model", str(sites["archive"]), "--group-name", "siteb")
    assert result.returncode == 0, result.stderr[-3000:]
    assert predictions(site / "models" / "cnn", "siteb") == expected
    report = json.loads((site / "models/cnn/split-0/best-loss/siteb/leak_report.json").read_text())
    assert report["IdentityCheck"]["Made"] is True and report["Leaks"] == [] and report["Refused"] is False

    # bids_app-model import, then --model on the folder (outside OUTPUT_DIR: copied in, never written to)
    site2 = tmp_path / "site_b2"
    shutil.copytree(out_b, site2)
    imported = tmp_path / "imported" / "cnn"
    assert model_main(["import", str(sites["archive"]), str(imported)]) == 0
    before = sorted(p.relative_to(imported) for p in imported.rglob("*"))
    result = run_cli(str(bids_b), str(site2), "group", "--model", str(imported), "--group-name", "siteb")
    assert result.returncode == 0, result.stderr[-3000:]
    assert predictions(site2 / "models" / "cnn", "siteb") == expected
    assert sorted(p.relative_to(imported) for p in imported.rglob("*")) == before


def test_export_twice_gives_identical_bytes_and_info_writes_nothing(sites, tmp_path: Path, capsys) -> None:
    again = tmp_path / "again.zip"
    assert model_main(["export", str(sites["maps"]), str(again)]) == 0
    assert again.read_bytes() == sites["archive"].read_bytes()
    with zipfile.ZipFile(again) as archive:
        names = archive.namelist()
        assert names == sorted(names)
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert not any(name.endswith((".pt", ".pkl", ".npy", ".html")) or "tensorboard" in name for name in names)
        assert "split-0/best-loss/model.safetensors" in names and "leak_guard/fingerprints.safetensors" in names
        assert "split-0/baseline/best-loss/model.safetensors" in names
        card = json.loads(archive.read("model_card.json"))
    assert card["classes"] == ["AD", "CN"] and card["positive_class"] == "CN" and card["input"]["mode"] == "image"
    assert card["input"]["crop_shape"] == [int(v) for v in TINY_CROP] and len(card["input"]["template_sha256"]) == 64
    assert card["training_data"]["n_participants_train_validation"] == sites["pool"]["participant_id"].nunique()
    assert all(row["n_images"] not in ("", "n/a") and row["ci_low"] for row in card["metrics"])
    assert card["provenance"]["seed"] == 1 and "--model-name cnn" in card["provenance"]["command"]
    assert card["leak_guard"]["fingerprints"] is True
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert model_main(["info", str(again)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("# Model card: cnn") and "What a fingerprint reveals" in shown and "sha256" in shown
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_subset_of_splits_exports_and_unknown_ones_are_refused(sites, tmp_path: Path) -> None:
    one = tmp_path / "one.zip"
    assert model_main(["export", str(sites["maps"]), str(one), "--splits", "1", "--metrics", "loss"]) == 0
    with zipfile.ZipFile(one) as archive:
        assert not any(name.startswith("split-0/") for name in archive.namelist())
        record = json.loads(archive.read("maps.json"))
    assert record["config"]["train"]["splits"] == [1]
    assert model_main(["import", str(one), str(tmp_path / "one")]) == 0
    assert model_main(["export", str(sites["maps"]), str(tmp_path / "x.zip"), "--splits", "7"]) == 64
    assert model_main(["export", str(sites["maps"]), str(tmp_path / "x.zip"), "--metrics", "accuracy"]) == 64
    assert not (tmp_path / "x.zip").exists()


def test_the_travelling_guard_refuses_a_rescan_under_a_new_name(sites, tmp_path: Path) -> None:
    third, out_c = sites["c"]
    pool = set(sites["pool"]["participant_id"])
    rescans = {(f"sub-{new}", f"sub-{old}") for new, old in third.rescans if f"sub-{old}" in pool}
    assert rescans, "a re-scanned participant is in the training pool"
    result = run_cli(str(third.bids_dir), str(out_c), "group", "--model", str(sites["archive"]), "--group-name",
                     "sitec")  # fmt: skip
    assert result.returncode == 65, result.stderr[-3000:]
    assert "fingerprint" in result.stderr
    assert any(f"{new} ses-M000 ~ {old}" in result.stderr for new, old in rescans)
    assert not list((out_c / "models" / "cnn").glob("split-*/best-*/sitec/*_prediction.tsv"))
    report = json.loads((out_c / "models/cnn/split-0/best-loss/sitec/leak_report.json").read_text())
    assert report["Refused"] is True
    assert {(p["participant_id"], p["train_participant_id"]) for p in report["Leaks"]} == rescans
    # the generator re-scans one of them with other noise: no checksum matches, the fingerprint alone finds it
    reasons: dict[str, set[str]] = {}
    for pair in report["Leaks"]:
        reasons.setdefault(pair["participant_id"], set()).add(pair["reason"])
    assert {"fingerprint"} in reasons.values()


def test_the_travelling_guard_refuses_a_renamed_copy(sites) -> None:
    bids_d, out_d = sites["d"]
    result = run_cli(str(bids_d), str(out_d), "group", "--model", str(sites["archive"]), "--group-name", "sited")
    assert result.returncode == 65, result.stderr[-3000:]
    copied = sites["pool"]["participant_id"].iloc[0]
    assert f"sub-301 ses-M000 ~ {copied} ses-M000" in result.stderr
    assert "raw_source_sha256" in result.stderr and "source_sha256" in result.stderr
    assert not list((out_d / "models" / "cnn").glob("split-*/best-*/sited/*_prediction.tsv"))


def test_without_fingerprints_prediction_says_the_identity_check_was_not_possible(sites, tmp_path: Path) -> None:
    archive = tmp_path / "bare.zip"
    assert model_main(["export", str(sites["maps"]), str(archive), "--no-fingerprints"]) == 0
    with zipfile.ZipFile(archive) as opened:
        assert "leak_guard/fingerprints.safetensors" not in opened.namelist()
        assert "NOT included" in opened.read("MODEL_CARD.md").decode()
    bids_b, out_b = sites["b"]
    site = tmp_path / "site_b"
    shutil.copytree(out_b, site)
    shutil.rmtree(site / "models", ignore_errors=True)
    result = run_cli(str(bids_b), str(site), "group", "--model", str(archive), "--group-name", "siteb")
    # predicted, after the id and checksum checks only, and the run says the identity check was not possible
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Identity check not possible for group 'siteb'" in result.stderr
    assert len(pd.read_csv(site / "models/cnn/split-0/best-loss/siteb/siteb_image_level_prediction.tsv", sep="\t")) == 4
    report = json.loads((site / "models/cnn/split-0/best-loss/siteb/leak_report.json").read_text())
    assert report["IdentityCheck"]["Made"] is False and "no fingerprints" in report["IdentityCheck"]["Reason"]


def test_model_options_are_refused_before_anything_is_written(sites, tmp_path: Path) -> None:
    bids_b, out_b = sites["b"]
    site = tmp_path / "site"
    shutil.copytree(out_b, site)
    before = sorted(p.relative_to(site) for p in site.rglob("*") if "logs" not in p.parts)
    cases = [
        ((), 64, "--group-name"),
        (("--group-name", "test"), 64, "--group-name"),
        (("--group-name", "x", "--stages", "train"), 64, "--stages"),
        (("--group-name", "x", "--predict-from", str(out_b)), 64, "--predict-from"),
    ]
    for extra, code, words in cases:
        result = run_cli(str(bids_b), str(site), "group", "--model", str(sites["archive"]), *extra)
        assert result.returncode == code and words in result.stderr, (extra, result.stderr[-2000:])
    result = run_cli(str(bids_b), str(site), "group", "--model", str(tmp_path / "absent.zip"), "--group-name", "x")
    assert result.returncode == 66 and "absent.zip" in result.stderr
    assert sorted(p.relative_to(site) for p in site.rglob("*") if "logs" not in p.parts) == before
