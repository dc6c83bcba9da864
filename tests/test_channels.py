"""Models of two channels end to end: ``--channels T1w pet-FDG`` and ``--channels T1w FLAIR`` in roi mode train,
predict and report.

One participant has no PET (no FLAIR): its session is listed in the model folder's ``excluded_sessions.tsv``, counted in
``maps.json``, named in the log and the group report, and left out of the split (never zero-padded). The same
seed twice gives the same prediction bytes; another output without the model's PET is refused before anything
is predicted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import TINY_CROP, make_dataset, run_cli

MISSING = "008"  # the participant without PET
GROUP = ("group", "--label", "diagnosis", "--mode", "roi", "--architecture", "small_cnn", "--epochs", "1",
         "--batch-size", "2", "--n-splits", "1", "--test-size", "2", "--n-bootstrap", "20", "--seed", "5",
         "--channels", "T1w", "pet-FDG")  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """8 participants in roi mode, T1w and a template-space "PET" (a copy of the T1w) for all but one."""
    root = tmp_path_factory.mktemp("channels")
    dataset = make_dataset(root, 8, 1, seed=11, effect_size=0.8)
    for t1w in sorted(dataset.derivative_dir.rglob("*_desc-preproc_T1w.nii.gz")):
        if f"sub-{MISSING}" not in t1w.name:
            pet_dir = t1w.parent.parent / "pet"
            pet_dir.mkdir()
            name = t1w.name.replace("_space-", "_trc-FDG_space-").replace("_T1w.", "_pet.")
            shutil.copyfile(t1w, pet_dir / name)
    mask = dataset.bids_dir / "code" / "template" / "roi-hippocampus_mask.nii.gz"
    out = root / "out"
    result = run_cli(str(dataset.bids_dir), str(out), "participant", "-d", str(dataset.derivative_dir), "--template",
                     str(dataset.template_path), "--crop-shape", *TINY_CROP, "--nprocs", "2", "--pet-tracer", "FDG",
                     "--modes", "roi", "--roi-mask", f"hippocampus={mask}", "--skip-bids-validation")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return dataset.bids_dir, out


@pytest.fixture(scope="module")
def trained(cohort: tuple[Path, Path]) -> tuple[Path, str]:
    bids_dir, out = cohort
    result = run_cli(str(bids_dir), str(out), *GROUP, "--model-name", "two")
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "models" / "two", result.stderr


def test_a_two_channel_roi_model_trains_predicts_and_lists_the_session_without_pet(trained, cohort) -> None:
    from bids_app.maps import Maps

    maps_dir, log = trained
    assert f"1 session(s) of {cohort[1]} lack one of the channels T1w, pet-FDG" in log
    assert f"sub-{MISSING} ses-M000 lacks pet-FDG" in log
    assert "have no tensor in" not in log  # its T1w is there: said once, as a missing channel
    excluded = pd.read_csv(maps_dir / "excluded_sessions.tsv", sep="\t", dtype=str)
    assert excluded.to_dict("records") == [
        {"participant_id": f"sub-{MISSING}", "session_id": "ses-M000", "missing_kinds": "pet-FDG"}
    ]
    record = json.loads((maps_dir / "maps.json").read_text())
    assert record["channels"] == ["T1w", "pet-FDG"] and record["config"]["train"]["channels"] == ["T1w", "pet-FDG"]
    assert record["input_shape"][0] == 2
    assert record["config"]["preprocess"]["pet_tracers"] == ["FDG"]  # what made the channels, not the defaults
    assert record["participant_settings"][0]["settings"]["pet_tracers"] == ["FDG"]
    assert record["excluded_sessions"] == {"n_sessions": 1, "by_missing_kind": {"pet-FDG": 1},
                                           "table": "excluded_sessions.tsv"}  # fmt: skip
    maps = Maps.open(maps_dir)
    model = maps.load_model(0, "loss")
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    assert first.weight.shape[1] == 2
    pool = pd.read_csv(maps_dir / "groups" / "train+validation.tsv", sep="\t", dtype=str)
    test = pd.read_csv(maps_dir / "split-0" / "best-loss" / "test" / "test_image_level_prediction.tsv", sep="\t")
    assert len(test) == 2 and len(pool) == 5  # 7 sessions with both kinds: nobody zero-padded in
    assert f"sub-{MISSING}" not in {*pool["participant_id"], *test["participant_id"]}
    report = (maps_dir / "report.html").read_text()
    assert "Input channel(s), in order: T1w, pet-FDG. 1 session(s) were left out" in report
    assert f"sub-{MISSING} ses-M000 (no pet-FDG)" in report


def test_the_same_seed_twice_predicts_the_same_bytes(trained, cohort) -> None:
    bids_dir, out = cohort
    maps_dir, _ = trained
    result = run_cli(str(bids_dir), str(out), *GROUP, "--model-name", "again")
    assert result.returncode == 0, result.stderr[-3000:]
    again = out / "models" / "again"
    files = sorted(p.relative_to(maps_dir) for p in maps_dir.glob("split-0/best-loss/*/*_prediction.tsv"))
    assert len(files) >= 2
    for name in files:
        assert (again / name).read_bytes() == (maps_dir / name).read_bytes(), name
    assert (again / "excluded_sessions.tsv").read_bytes() == (maps_dir / "excluded_sessions.tsv").read_bytes()


def test_an_output_without_the_models_pet_is_refused_before_any_prediction(trained, cohort, tmp_path) -> None:
    bids_dir, out = cohort
    maps_dir, _ = trained
    other = tmp_path / "other"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("models", "*_pet.*"))
    result = run_cli(str(bids_dir), str(out), "group", "--stages", "predict", "--model-name", "two",
                     "--predict-from", str(other), "--group-name", "site2", "--channels", "FLAIR")  # fmt: skip
    assert result.returncode == 66, result.stderr[-2000:]
    warning = "WARNING bids_app.levels: Model two reads the channels T1w, pet-FDG: those are used, not --channels FLAIR"
    assert warning in result.stderr
    assert "has no roi tensor of pet-FDG, but model two reads channels T1w, pet-FDG" in result.stderr
    assert "--pet-tracer FDG" in result.stderr
    assert not list(maps_dir.glob("split-*/best-*/site2"))


@pytest.fixture(scope="module")
def flair_cohort(tmp_path_factory: pytest.TempPathFactory):
    """8 participants with raw T1w and FLAIR but one session without FLAIR, through the participant level in roi
    mode (flair-linear: registered to the session's T1w)."""
    from bids_app.synthetic.dataset import generate_dataset

    root = tmp_path_factory.mktemp("flair")
    dataset = generate_dataset(root / "bids", n_subjects=8, n_sessions=1, preset="tiny", seed=11, effect_size=0.8,
                               contrasts=("FLAIR",), missing_contrast_fraction=1 / 8)  # fmt: skip
    out = root / "out"
    result = run_cli(str(dataset.bids_dir), str(out), "participant", "--template", str(dataset.template_path),
                     "--crop-shape", *TINY_CROP, "--modes", "roi", "--roi-mask", f"hippocampus={dataset.roi_mask_path}",
                     "--contrasts", "FLAIR", "--nprocs", "2", "--skip-bids-validation")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return dataset, out


def test_a_t1w_and_flair_roi_model_trains_predicts_and_reports_the_session_without_flair(flair_cohort) -> None:
    from bids_app.maps import Maps

    dataset, out = flair_cohort
    ((label, session),) = dataset.sessions_without_contrasts
    group = [arg if arg != "pet-FDG" else "FLAIR" for arg in GROUP]
    result = run_cli(str(dataset.bids_dir), str(out), *group, "--model-name", "t1w-flair")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"sub-{label} ses-{session} lacks FLAIR" in result.stderr
    maps_dir = out / "models" / "t1w-flair"
    excluded = pd.read_csv(maps_dir / "excluded_sessions.tsv", sep="\t", dtype=str)
    assert excluded.to_dict("records") == [
        {"participant_id": f"sub-{label}", "session_id": f"ses-{session}", "missing_kinds": "FLAIR"}
    ]
    record = json.loads((maps_dir / "maps.json").read_text())
    assert record["channels"] == ["T1w", "FLAIR"] and record["excluded_sessions"]["n_sessions"] == 1
    first = next(m for m in Maps.open(maps_dir).load_model(0, "loss").modules() if isinstance(m, torch.nn.Conv3d))
    assert first.weight.shape[1] == 2
    test = pd.read_csv(maps_dir / "split-0" / "best-loss" / "test" / "test_image_level_prediction.tsv", sep="\t")
    pool = pd.read_csv(maps_dir / "groups" / "train+validation.tsv", sep="\t", dtype=str)
    assert len(test) == 2 and len(test) + len(pool) == 7
    assert f"sub-{label}" not in {*pool["participant_id"], *test["participant_id"]}
    assert f"sub-{label} ses-{session} (no FLAIR)" in (maps_dir / "report.html").read_text()


def _participant(bids_dir: Path, out: Path, derivative: Path, *extra: str):
    return run_cli(str(bids_dir), str(out), "participant", "-d", str(derivative), "--nprocs", "2",
                   "--skip-bids-validation", *extra)  # fmt: skip


def test_from_model_alone_prepares_the_models_pet_channel_at_a_new_site(trained, cohort, tmp_path) -> None:
    bids_dir, out = cohort
    maps_dir, _ = trained
    derivative = bids_dir / "derivatives" / "preproc"
    site = tmp_path / "site2"
    refused = _participant(bids_dir, site, derivative, "--from-model", str(maps_dir), "--pet-tracer", "AV45")
    assert refused.returncode == 64, refused.stderr[-2000:]
    assert "--pet-tracer AV45 contradicts --from-model" in refused.stderr and not site.exists()
    test = pd.read_csv(maps_dir / "split-0" / "best-loss" / "test" / "test_image_level_prediction.tsv", sep="\t")
    unseen = sorted(test["participant_id"])  # the model's test participants: the leak guard lets them through
    result = _participant(bids_dir, site, derivative, "--from-model", str(maps_dir), "--participant-label",
                          *(p.removeprefix("sub-") for p in unseen))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pet = sorted(site.rglob("*_trc-FDG_*_desc-roi_pet.npy"))
    assert [p.name.split("_")[0] for p in pet] == unseen
    predicted = run_cli(str(bids_dir), str(out), "group", "--stages", "predict", "--model-name", "two",
                        "--predict-from", str(site), "--group-name", "fresh")  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    table = pd.read_csv(maps_dir / "split-0" / "best-loss" / "fresh" / "fresh_image_level_prediction.tsv", sep="\t")
    assert sorted(table["participant_id"]) == unseen


def test_channels_made_with_different_normalisations_are_refused(trained, cohort, tmp_path) -> None:
    bids_dir, out = cohort
    maps_dir, _ = trained
    # sub-001 made again with another normalisation, then only its PET tensor copied beside its old T1w one
    other, site = tmp_path / "minmax", tmp_path / "site"
    for folder in (other, site):
        shutil.copytree(out, folder, ignore=shutil.ignore_patterns("models"))
    mask = bids_dir / "code" / "template" / "roi-hippocampus_mask.nii.gz"
    template = json.loads(next(out.rglob("*_desc-roi_T1w.json")).read_text())["Preprocessing"]["TemplatePath"]
    result = _participant(bids_dir, other, bids_dir / "derivatives" / "preproc", "--template", template,
                          "--crop-shape", *TINY_CROP, "--pet-tracer", "FDG", "--modes", "roi", "--roi-mask",
                          f"hippocampus={mask}", "--normalization", "minmax", "--participant-label", "001")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pet = sorted(other.glob("sub-001/**/*_desc-roi_pet.*"))
    assert len(pet) == 2
    for path in pet:
        shutil.copyfile(path, site / path.relative_to(other))
    predicted = run_cli(str(bids_dir), str(out), "group", "--stages", "predict", "--model-name", "two",
                        "--predict-from", str(site), "--group-name", "mixed")  # fmt: skip
    assert predicted.returncode == 65, predicted.stderr[-2000:]
    assert "were made with different normalization" in predicted.stderr
    assert "sub-001_ses-M000" in predicted.stderr and not list(maps_dir.glob("split-*/best-*/mixed"))


def test_a_custom_map_model_records_its_filters_and_refuses_maps_selected_otherwise(cohort, tmp_path) -> None:
    bids_dir, out = cohort
    derivative, site, other = tmp_path / "derivative", tmp_path / "site", tmp_path / "other"
    shutil.copytree(bids_dir / "derivatives" / "preproc", derivative)
    for t1w in sorted(derivative.rglob("*_desc-preproc_T1w.nii.gz")):  # "maps": copies of the T1w
        for label in ("GM", "WM"):
            shutil.copyfile(t1w, t1w.parent / t1w.name.replace("_desc-preproc_T1w", f"_label-{label}_probseg"))
    shutil.copytree(out, site, ignore=shutil.ignore_patterns("models"))
    mask = bids_dir / "code" / "template" / "roi-hippocampus_mask.nii.gz"
    template = json.loads(next(out.rglob("*_desc-roi_T1w.json")).read_text())["Preprocessing"]["TemplatePath"]
    options = ("--template", template, "--crop-shape", *TINY_CROP, "--modes", "roi", "--roi-mask",
               f"hippocampus={mask}")  # fmt: skip
    result = _participant(bids_dir, site, derivative, *options, "--custom-map", "gm=suffix:probseg,label:GM")
    assert result.returncode == 0, result.stderr[-3000:]
    sidecar = json.loads(next(site.rglob("sub-001_*_desc-roi_gm.json")).read_text())
    assert sidecar["CustomMap"] == {"Name": "gm", "Filters": [["suffix", "probseg"], ["label", "GM"]],
                                    "SourceSpace": "MNI152NLin2009aSym"}  # fmt: skip
    group = [arg if arg != "pet-FDG" else "gm" for arg in GROUP]
    trained = run_cli(str(bids_dir), str(site), *group, "--model-name", "gm", "--stages", "split", "train")
    assert trained.returncode == 0, trained.stderr[-3000:]
    record = json.loads((site / "models" / "gm" / "maps.json").read_text())
    assert record["config"]["preprocess"]["custom_maps"] == ["gm=suffix:probseg,label:GM"]
    assert record["participant_settings"][0]["settings"]["custom_maps"] == ["gm=suffix:probseg,label:GM"]
    result = _participant(bids_dir, other, derivative, *options, "--custom-map", "gm=suffix:probseg,label:WM",
                          "--participant-label", "001", "002")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = run_cli(str(bids_dir), str(site), "group", "--stages", "predict", "--model-name", "gm",
                        "--predict-from", str(other), "--group-name", "wm")  # fmt: skip
    assert predicted.returncode == 65, predicted.stderr[-2000:]
    assert 'were made with custom_maps ["gm=suffix:probseg,label:WM"]' in predicted.stderr
    assert 'trained on tensors made with custom_maps ["gm=suffix:probseg,label:GM"]' in predicted.stderr


def test_excluded_sessions_follow_the_participant_selection_and_an_empty_index_is_refused(cohort, tmp_path) -> None:
    from bids_app.cli.arguments import parse_config
    from bids_app.config import ExtractionMode
    from bids_app.data.tables import index_channels, index_tensors
    from bids_app.errors import InputMissingError
    from bids_app.kinds import parse_kind
    from bids_app.levels import group_table, select_excluded

    bids_dir, out = cohort
    excluded = index_channels(out, ExtractionMode.ROI, [parse_kind("T1w"), parse_kind("pet-FDG")]).excluded
    assert list(excluded["participant_id"]) == [f"sub-{MISSING}"]
    base = [str(bids_dir), str(out), "group"]
    assert select_excluded(parse_config([*base, "--participant-label", "001", "002"]), excluded).empty
    assert select_excluded(parse_config([*base, "--participant-label", "001", MISSING]), excluded).equals(excluded)
    assert select_excluded(parse_config([*base, "--session-label", "M006"]), excluded).empty
    cfg = parse_config(base)
    with pytest.raises(InputMissingError, match="No complete roi tensors"):  # without kinds too
        group_table(cfg, index_tensors(tmp_path, ExtractionMode.ROI), cfg.labels, ExtractionMode.ROI)


def test_an_exported_model_keeps_its_excluded_sessions(trained, tmp_path) -> None:
    from bids_app.cli.model import main as model_main
    from bids_app.maps import Maps

    maps_dir, _ = trained
    archive, imported = tmp_path / "two.zip", tmp_path / "imported" / "two"
    assert model_main(["export", str(maps_dir), str(archive)]) == 0
    assert model_main(["import", str(archive), str(imported)]) == 0
    assert (imported / "excluded_sessions.tsv").read_bytes() == (maps_dir / "excluded_sessions.tsv").read_bytes()
    excluded = Maps.open(imported).excluded_sessions()
    assert excluded is not None and list(excluded["participant_id"]) == [f"sub-{MISSING}"]
