"""Truthful provenance and ``--from-model``: a model folder records the participant-level settings its tensors were
really made with, prediction refuses tensors made otherwise, and a new site prepares its data like the model's
in one command (bids_app.data.origin)."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_app.config import ExtractionMode
from bids_app.data.origin import DatasetIdentity as Identity
from bids_app.data.origin import (
    common_settings,
    read_settings,
    settings_by_dataset,
    settings_differences,
    tensor_settings,
)
from bids_app.data.tables import index_tensors
from bids_app.derivatives import file_sha256
from tests.conftest import TINY_CROP, make_cohort, make_dataset, run_cli

OPTIONS = ("--modes", "image", "--skip-bids-validation")


def test_settings_read_from_a_sidecar_and_summarised_per_dataset() -> None:
    sidecar = {
        "Mode": "patch",
        "ModeParameters": {"PatchSize": 8, "Stride": 8},
        "Normalization": "minmax",
        "Dtype": "float32",
        "BidsAppVersion": "1.0.0",
        "Preprocessing": {"TemplatePath": "/t/tpl-X_T1w.nii.gz", "TemplateSHA256": "ab", "Space": "X",
                          "CropShape": [4, 4, 4], "Registration": "AffineFast"},
    }  # fmt: skip
    settings = tensor_settings(sidecar)
    assert settings["template"] == "tpl-X_T1w.nii.gz" and settings["crop_shape"] == [4, 4, 4]
    assert settings["patch_size"] == 8 and settings["pipeline_version"] == "1.0.0"
    other = {**settings, "crop_shape": [5, 5, 5]}
    first, second = Identity("A", "n/a", "ds-a"), Identity("B", "n/a", "ds-b")
    summary = settings_by_dataset([(first, settings), (first, settings), (second, other)])
    assert [(e["dataset_id"], e["n_images"]) for e in summary] == [("ds-a", 2), ("ds-b", 1)]
    assert "crop_shape" not in common_settings(summary) and common_settings(summary)["patch_size"] == 8
    mixed = settings_by_dataset([(first, settings), (first, other)])
    assert mixed[0]["settings"]["crop_shape"] == {"mixed": [[4, 4, 4], [5, 5, 5]]}
    assert settings_differences(settings, other) == [("crop_shape", [4, 4, 4], [5, 5, 5])]
    assert settings_differences(settings, {**settings, "dtype": "float16"}) == []  # precision, not meaning


def group_args(bids_dir: Path, out: Path, *extra: str) -> list[str]:
    return [str(bids_dir), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn", "--mode",
            "image", "--epochs", "1", "--batch-size", "4", "--n-splits", "2", "--test-size", "0.25", "--model-name",
            "cnn", "--seed", "1", *extra]  # fmt: skip


def participant_args(dataset, out: Path, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "participant", "-d", str(dataset.derivative_dir), *OPTIONS, *extra]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    """Site A trained on tensors made with the generator's 4 mm template and a 40x48x40 crop; site B's raw data."""
    root = tmp_path_factory.mktemp("from_model")
    first, out_a = make_cohort(root / "a", 6, 1, *OPTIONS, seed=51, effect_size=0.5)
    train = run_cli(*group_args(first.bids_dir, out_a))
    assert train.returncode == 0, train.stderr[-3000:]
    second = make_dataset(root / "b", 4, 1, seed=52, effect_size=0.5)
    return first, out_a, second, root


def test_maps_json_and_config_toml_record_the_tensors_settings(site) -> None:
    first, out_a, _, _ = site
    maps = json.loads((out_a / "models" / "cnn" / "maps.json").read_text())
    (entry,) = maps["participant_settings"]
    settings = entry["settings"]
    assert entry["n_images"] == 6 and entry["dataset_name"] == "bids_app synthetic dataset"
    assert settings["crop_shape"] == [int(v) for v in TINY_CROP]
    assert settings["template"] == first.template_path.name
    assert settings["template_sha256"] == file_sha256(first.template_path)
    assert settings["mode"] == "image" and settings["normalization"] == "zscore" and settings["dtype"] == "float32"
    # the record's configuration is the data's, not the group run's defaults (crop 169x208x179, nilearn's MNI)
    assert maps["config"]["preprocess"]["crop_shape"] == [40, 48, 40]
    assert maps["config"]["preprocess"]["template_path"].endswith(first.template_path.name)
    assert maps["config"]["extraction"]["modes"] == ["image"]
    (config,) = [p for p in (out_a / "logs").glob("*_group_*/config.toml")]
    recorded = tomllib.loads(config.read_text())
    assert recorded["preprocess"]["crop_shape"] == [40, 48, 40]
    assert recorded["preprocess"]["template_path"].endswith(first.template_path.name)


def test_tensors_made_otherwise_are_refused_then_from_model_matches_them(site) -> None:
    first, out_a, second, root = site
    maps = out_a / "models" / "cnn"
    out_b = root / "b" / "out"
    made = run_cli(*participant_args(second, out_b, "--template", str(first.template_path), "--crop-shape", "36",
                                     "44", "36"))  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    predict = ("--stages", "predict", "--predict-from", str(out_b), "--group-name", "siteb")
    refused = run_cli(*group_args(first.bids_dir, out_a, *predict))
    assert refused.returncode == 65, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert "crop_shape [36, 44, 36]" in line and "crop_shape [40, 48, 40]" in line
    assert f"--from-model {maps}" in line
    # one command, no preprocessing option re-typed
    matched = run_cli(*participant_args(second, out_b, "--from-model", str(maps)))
    assert matched.returncode == 0, matched.stderr[-3000:]
    settings = read_settings(index_tensors(out_b, ExtractionMode.IMAGE))[0]["settings"]
    assert settings["crop_shape"] == [40, 48, 40] and settings["template_sha256"] == file_sha256(first.template_path)
    predicted = run_cli(*group_args(first.bids_dir, out_a, *predict))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    folder = maps / "split-0" / "best-loss" / "siteb"
    assert len(pd.read_csv(folder / "siteb_image_level_prediction.tsv", sep="\t")) == 4
    assert (folder / "siteb_image_level_metrics.tsv").is_file() and (folder / "leak_report.json").is_file()
    # the same site without its diagnoses: predictions and the leak report only
    for table in [second.bids_dir / "participants.tsv", *second.bids_dir.glob("sub-*/sub-*_sessions.tsv")]:
        pd.read_csv(table, sep="\t", dtype=str).drop(columns="diagnosis").to_csv(table, sep="\t", index=False)
    unlabelled = run_cli(*group_args(first.bids_dir, out_a, *predict[:-1], "siteb-unlabelled"))
    assert unlabelled.returncode == 0, unlabelled.stderr[-3000:]
    folder = maps / "split-0" / "best-loss" / "siteb-unlabelled"
    rows = pd.read_csv(folder / "siteb-unlabelled_image_level_prediction.tsv", sep="\t", keep_default_na=False)
    assert len(rows) == 4 and set(rows["true_label"]) == {"n/a"}
    assert (folder / "leak_report.json").is_file() and not list(folder.glob("*_metrics.tsv"))


def test_another_template_or_normalisation_is_named(site, tmp_path: Path) -> None:
    first, out_a, second, _ = site
    # the same space (an MNI152 one, so the site's template-space inputs fit it), another file
    other_template = tmp_path / "tpl-MNI152NLin2009aSym_res-4mm_desc-brighter_T1w.nii.gz"
    image = nib.load(first.template_path)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32) * 1.5, image.affine), other_template)
    for extra, named in (
        (("--template", str(other_template), "--template-space", "MNI152NLin2009aSym"), "template_sha256"),
        (("--template", str(first.template_path), "--normalization", "minmax"), "normalization"),  # not the default
    ):
        out = tmp_path / named
        made = run_cli(*participant_args(second, out, "--crop-shape", *TINY_CROP, *extra))
        assert made.returncode == 0, made.stderr[-3000:]
        refused = run_cli(*group_args(first.bids_dir, out_a, "--stages", "predict", "--predict-from", str(out),
                                      "--group-name", "other"))  # fmt: skip
        assert refused.returncode == 65, refused.stderr[-3000:]
        assert f"with {named} " in refused.stderr and "--from-model" in refused.stderr
        if named == "template_sha256":  # both templates named by file and checksum
            assert other_template.name in refused.stderr and first.template_path.name in refused.stderr


def test_from_model_refuses_contradicting_options_and_a_missing_template(site, tmp_path: Path) -> None:
    first, out_a, second, _ = site
    maps = out_a / "models" / "cnn"
    for extra, named in (
        (("--crop-shape", "36", "44", "36"), "--crop-shape 36 44 36"),
        (("--modes", "slice"), "--modes slice"),
        (("--normalization", "minmax"), "--normalization minmax"),
    ):
        result = run_cli(*participant_args(second, tmp_path / "out", "--from-model", str(maps), *extra))
        assert result.returncode == 64, result.stderr[-3000:]
        assert named in result.stderr and "contradicts --from-model" in result.stderr
        assert not (tmp_path / "out").exists()
    group = run_cli(*group_args(first.bids_dir, out_a, "--stages", "predict", "--from-model", str(maps)))
    assert group.returncode == 64 and "participant level" in group.stderr
    # a model folder whose template is not where it was recorded: the fix names --template
    moved = tmp_path / "moved"
    shutil.copytree(maps, moved)
    record = json.loads((moved / "maps.json").read_text())
    record["participant_settings"][0]["settings"]["template_path"] = str(tmp_path / "gone" / first.template_path.name)
    (moved / "maps.json").write_text(json.dumps(record))
    missing = run_cli(*participant_args(second, tmp_path / "out", "--from-model", str(moved)))
    assert missing.returncode == 66 and "--template PATH" in missing.stderr, missing.stderr[-3000:]
    given = run_cli(*participant_args(second, tmp_path / "out", "--from-model", str(moved), "--template",
                                      str(first.template_path)))  # fmt: skip
    assert given.returncode == 0, given.stderr[-3000:]


def fake_model(root: Path, settings: dict) -> Path:
    """A model folder (record and environment only) whose training tensors were made with ``settings``."""
    from bids_app.config import AnalysisLevel, RunConfig
    from bids_app.maps import Maps

    entry = {"dataset_id": "ds-a", "dataset_name": "A", "dataset_doi": "n/a", "n_images": 2, "settings": settings}
    extra = {"input_shape": [1, 2, 2, 2], "n_outputs": 2, "label_encoding": {"AD": 0, "CN": 1},
             "participant_settings": [entry]}  # fmt: skip
    Maps.create(root / "maps", RunConfig(root / "bids", root / "out", AnalysisLevel.GROUP), extra)
    return root / "maps"


def test_from_model_copies_roi_masks_and_checks_every_file_by_checksum(tmp_path: Path) -> None:
    from bids_app.data.origin import model_participant_config
    from bids_app.errors import InputMissingError, UsageError
    from bids_app.template import default_template_path

    template, mask = tmp_path / "tpl-X_T1w.nii.gz", tmp_path / "hippo.nii.gz"
    template.write_bytes(b"template")
    mask.write_bytes(b"mask")
    settings = {"template_path": str(template), "template_sha256": file_sha256(template), "template_space": "X",
                "crop_shape": [4, 5, 6], "mode": "roi", "roi_names": ["hippo"], "roi_crop": False,
                "roi_mask_path": {"hippo": str(mask)}, "roi_mask_sha256": {"hippo": file_sha256(mask)},
                "normalization": "zscore", "dtype": "float16"}  # fmt: skip
    maps = fake_model(tmp_path, settings)
    nested = model_participant_config({"run": {"seed": 3}}, maps)
    assert nested["run"] == {"seed": 3}
    assert nested["preprocess"] == {"template_path": str(template), "template_space": "X", "crop_shape": [4, 5, 6]}
    assert nested["extraction"] == {"modes": ["roi"], "roi_masks": [["hippo", str(mask)]], "roi_crop": False,
                                    "normalization": "zscore", "dtype": "float16"}  # fmt: skip
    other = tmp_path / "other.nii.gz"
    other.write_bytes(b"another mask")
    with pytest.raises(UsageError, match=r"--roi-mask hippo=.*other.nii.gz contradicts --from-model"):
        model_participant_config({"extraction": {"roi_masks": [["hippo", str(other)]]}}, maps)
    agreeing = model_participant_config({"extraction": {"modes": ["image", "roi"], "roi_crop": False}}, maps)
    assert agreeing["extraction"]["modes"] == ["image", "roi"]
    mask.write_bytes(b"edited since")
    with pytest.raises(InputMissingError, match="--roi-mask hippo=PATH"):
        model_participant_config({}, maps)
    template.write_bytes(b"edited since")
    with pytest.raises(InputMissingError, match="--template PATH"):
        model_participant_config({}, maps)
    # a model from another machine made with nilearn's MNI152: found where this installation keeps it
    default = default_template_path()
    moved = fake_model(tmp_path / "moved", {"template_path": "/elsewhere/" + default.name, "mode": "image",
                                            "template_sha256": file_sha256(default)})  # fmt: skip
    assert model_participant_config({}, moved)["preprocess"]["template_path"] == str(default)
