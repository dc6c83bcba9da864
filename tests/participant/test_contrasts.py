"""Raw T2w and FLAIR (``--contrasts``) through the participant level: t2-linear / flair-linear through the
session's T1w, every extraction mode, QC, report, and sessions that lack a contrast or the T1w."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from bids_app.participant.qc_summary import qc_table
from bids_app.preprocess.qc import qc_rule
from tests.conftest import run_cli, validate
from tests.participant.test_participant import CROP, PATCH, participant_args, status_table

SPACE = "MNI152NLin2009aSym"
CONTRASTS = ("T2w", "FLAIR")


@pytest.fixture(scope="module")
def contrast_run(tmp_path_factory: pytest.TempPathFactory):
    """Three participants, one session each: ``full`` has T1w, T2w and FLAIR; ``bare`` its T1w only (generated
    without contrasts); ``orphan`` its T2w and FLAIR but no T1w (deleted). Processed once, all four modes."""
    from bids_app.synthetic.dataset import generate_dataset

    root = tmp_path_factory.mktemp("contrasts")
    dataset = generate_dataset(root / "bids", n_subjects=3, n_sessions=1, seed=2, contrasts=CONTRASTS,
                               missing_contrast_fraction=1 / 3)  # fmt: skip
    ((bare, session),) = dataset.sessions_without_contrasts
    full, orphan = (label for label in dataset.participants if label != bare)
    anat = dataset.bids_dir / f"sub-{orphan}" / f"ses-{session}" / "anat"
    for name in (f"sub-{orphan}_ses-{session}_T1w.nii.gz", f"sub-{orphan}_ses-{session}_T1w.json"):
        (anat / name).unlink()
    out = root / "out"
    result = run_cli(*participant_args(dataset, dataset.bids_dir, out, "--contrasts", *CONTRASTS, "--nprocs", "2"))
    return dataset, out, result, {"full": full, "bare": bare, "orphan": orphan, "session": session}


def _anat(out: Path, label: str, session: str, suffix: str) -> Path:
    name = f"sub-{label}_ses-{session}_space-{SPACE}_desc-preproc_{suffix}.nii.gz"
    return out / f"sub-{label}" / f"ses-{session}" / "anat" / name


def test_t2w_and_flair_are_registered_through_the_t1w_and_extracted_in_every_mode(contrast_run) -> None:
    _, out, _, who = contrast_run
    label, session = who["full"], who["session"]
    dl = out / f"sub-{label}" / f"ses-{session}" / "deeplearning"
    stem = f"sub-{label}_ses-{session}_space-{SPACE}_desc"
    for suffix in CONTRASTS:
        preproc = _anat(out, label, session, suffix)
        assert nib.load(preproc).shape == CROP
        sidecar = json.loads(preproc.with_name(preproc.name.replace(".nii.gz", ".json")).read_text())
        raw = f"bids:raw:sub-{label}/ses-{session}/anat/sub-{label}_ses-{session}"
        assert sidecar["RegisteredThroughT1w"] == f"{raw}_T1w.nii.gz"
        assert sidecar["Sources"] == [f"{raw}_{suffix}.nii.gz", f"{raw}_T1w.nii.gz"]
        assert (out / sidecar["T1wToTemplateTransform"]).is_file()
        assert "rigid registration (Mattes mutual information) to the session's raw T1w" in sidecar["Description"]
        assert qc_rule(suffix)[0] == "nmi_to_template"  # the T1 template's contrast is not theirs
        assert sidecar["QC"]["nmi_to_template"] > 1.0
        for mode in ("image", "patch", "slice", "roi"):
            tensor = np.load(dl / f"{stem}-{mode}_{suffix}.npy", allow_pickle=False)
            t1w = np.load(dl / f"{stem}-{mode}_T1w.npy", allow_pickle=False)
            assert tensor.shape == t1w.shape and tensor.dtype == np.float32
            assert json.loads((dl / f"{stem}-{mode}_{suffix}.json").read_text())["Complete"] is True
        assert np.load(dl / f"{stem}-patch_{suffix}.npy").shape[1:] == (1, PATCH, PATCH, PATCH)
    assert len(list(dl.glob("*.npy"))) == 3 * 4  # T1w, T2w, FLAIR x four modes
    qc = qc_table(out)
    rows = qc[(qc["participant_id"] == f"sub-{label}")]
    assert sorted(rows["suffix"]) == ["FLAIR", "T1w", "T2w"]
    for suffix in CONTRASTS:
        row = rows[rows["suffix"] == suffix].iloc[0]
        assert (row["qc_metric"], row["qc_threshold"]) == qc_rule(suffix)
        assert row["qc_pass"] == (row["nmi_to_template"] >= row["qc_threshold"])
    page = (out / f"sub-{label}" / f"sub-{label}_report.html").read_text(encoding="utf-8")
    for suffix in CONTRASTS:
        assert f'id="sub-{label}_ses-{session}_{suffix}"' in page


def _brain(path: Path) -> np.ndarray:
    """The head of a synthetic (skull-less) image: above a quarter of its 99th percentile, holes filled."""
    volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    mask = ndimage.binary_opening(volume > 0.25 * np.percentile(volume[volume > 0], 99))
    return ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=2))


def test_flair_lands_on_the_t1w_brain(contrast_run) -> None:
    """Registration sanity: the FLAIR's brain on the template grid is the T1w's (Dice), and a 2-voxel shift is not."""
    _, out, _, who = contrast_run
    t1w = _brain(_anat(out, who["full"], who["session"], "T1w"))
    flair = _brain(_anat(out, who["full"], who["session"], "FLAIR"))

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return 2 * float((a & b).sum()) / float(a.sum() + b.sum())

    assert dice(t1w, flair) > 0.9
    assert dice(t1w, np.roll(flair, 2, axis=0)) < dice(t1w, flair) - 0.05


def test_session_without_a_contrast_is_reported_and_not_a_failure(contrast_run) -> None:
    dataset, out, result, who = contrast_run
    bare, session = who["bare"], who["session"]
    table = status_table(out)
    missing = table[table["status"] == "missing"]
    assert sorted(missing["stage"]) == ["preprocess-FLAIR", "preprocess-T2w"]
    assert set(missing["participant_id"]) == {f"sub-{bare}"} and set(missing["session_id"]) == {f"ses-{session}"}
    assert "looked for anat/*_FLAIR.nii[.gz] with the filters {}" in " ".join(missing["message"])
    assert f"No FLAIR for sub-{bare} ses-{session}: looked for anat/*_FLAIR.nii[.gz]" in result.stderr
    bare_rows = table[table["participant_id"] == f"sub-{bare}"]
    assert set(bare_rows["status"]) == {"ok", "missing"}  # its T1w went through every mode
    # alone, a missing contrast is no failure: exit 0 (the T1w outputs are re-used)
    again = run_cli(*participant_args(dataset, dataset.bids_dir, out, "--contrasts", *CONTRASTS,
                                      "--participant-label", bare, "--skip-bids-validation"))  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"No T2w for sub-{bare} ses-{session}" in again.stderr


def test_contrast_without_the_sessions_t1w_fails_that_image_with_exit_65(contrast_run) -> None:
    _, out, result, who = contrast_run
    orphan, session = who["orphan"], who["session"]
    assert result.returncode == 65
    table = status_table(out)
    failed = table[table["status"] == "failed"]
    assert set(failed["participant_id"]) == {f"sub-{orphan}"}
    assert sorted(failed["image"]) == [
        f"sub-{orphan}_ses-{session}_FLAIR.nii.gz",
        f"sub-{orphan}_ses-{session}_T2w.nii.gz",
    ]
    message = " ".join(failed["message"])
    assert f"needs the T1w of sub-{orphan} session {session} (flair-linear registers it to that T1w)" in message
    assert "Add the T1w or drop FLAIR from --contrasts." in message
    assert f"No T1w for sub-{orphan} ses-{session}: skipped" in result.stderr
    assert not (out / f"sub-{orphan}" / f"ses-{session}" / "deeplearning").exists()


def test_contrast_outputs_pass_the_validator(contrast_run) -> None:
    _, out, _, _ = contrast_run
    checked = validate(out)
    assert checked.returncode == 0, checked.stdout[-3000:]


def test_contrasts_are_refused_with_derivatives_and_filters_are_honoured(contrast_run, tmp_path: Path) -> None:
    """``--contrasts`` with ``-d`` is refused before anything is written (exit 64); a ``flair`` filter that
    matches nothing reports the session's FLAIR as missing."""
    dataset, out, _, who = contrast_run
    refused = run_cli(str(dataset.bids_dir), str(tmp_path / "out"), "participant", "-d", str(dataset.bids_dir),
                      "--contrasts", "FLAIR")  # fmt: skip
    assert refused.returncode == 64
    assert "Invalid --contrasts (preprocess.contrasts) ['FLAIR']" in refused.stderr
    assert "run without -d" in refused.stderr
    assert not (tmp_path / "out").exists()
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"flair": {"acquisition": "axial"}}))
    copy = tmp_path / "out2"
    shutil.copytree(out, copy)
    filtered = run_cli(*participant_args(dataset, dataset.bids_dir, copy, "--contrasts", "FLAIR", "--participant-label",
                                         who["full"], "--bids-filter-file", str(filters),
                                         "--skip-bids-validation"))  # fmt: skip
    assert filtered.returncode == 0, filtered.stderr[-2000:]
    rows = pd.read_csv(copy / "status" / f"sub-{who['full']}_status.tsv", sep="\t", dtype=str)
    missing = rows[rows["status"] == "missing"]
    assert list(missing["stage"]) == ["preprocess-FLAIR"]
    assert '{"acquisition": "axial"}' in missing["message"].iloc[0]


def test_contrasts_from_toml_and_bad_values(tmp_path: Path) -> None:
    """``[preprocess] contrasts`` reads like ``--contrasts`` and survives the dumped config; a lower-case or
    repeated name is refused with the option, the value and the fix."""
    from bids_app.config import check_config_values
    from bids_app.config_file import config_to_nested, load_config_file, resolve_config
    from bids_app.errors import ConfigError

    base = {"run": {"bids_dir": str(tmp_path), "output_dir": str(tmp_path / "out"), "analysis_level": "participant"}}
    config = tmp_path / "config.toml"
    config.write_text('[preprocess]\ncontrasts = ["FLAIR"]\n\n[bids_filters.flair]\nacquisition = "axial"\n')
    cfg = resolve_config({**base, **load_config_file(config)})
    check_config_values(cfg)
    assert cfg.preprocess.contrasts == ("FLAIR",) and cfg.bids_filters == {"flair": {"acquisition": "axial"}}
    assert resolve_config(config_to_nested(cfg)) == cfg
    for bad in (["flair"], ["T2w", "T2w"]):
        with pytest.raises(ConfigError, match=r"Invalid --contrasts \(preprocess.contrasts\).*at most once"):
            check_config_values(resolve_config({**base, "preprocess": {"contrasts": bad}}))
