"""The generator's T2w and FLAIR (``--contrasts``, ``--missing-contrast-fraction``): files, contrast, poses."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_app.cli.generate import main
from bids_app.errors import UsageError
from bids_app.synthetic import anatomy, cohorts
from bids_app.synthetic.dataset import generate_dataset
from tests.conftest import validate


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_contrasts_are_written_per_session_with_their_own_pose_and_some_sessions_left_out(tmp_path: Path) -> None:
    plain = generate_dataset(tmp_path / "plain", n_subjects=2, n_sessions=2, seed=4)
    ds = generate_dataset(tmp_path / "bids", n_subjects=2, n_sessions=2, seed=4, contrasts=["T2w", "FLAIR"],
                          missing_contrast_fraction=0.25)  # fmt: skip
    assert ds.contrasts == ("T2w", "FLAIR")
    assert len(ds.sessions_without_contrasts) == 1  # round(0.25 * 4 sessions)
    for label in ds.participants:
        for session in ds.sessions:
            anat = ds.bids_dir / f"sub-{label}" / f"ses-{session}" / "anat"
            t1w = anat / f"sub-{label}_ses-{session}_T1w.nii.gz"
            # adding contrasts leaves the T1w (and every other default output) byte-identical
            assert _sha(t1w) == _sha(plain.bids_dir / t1w.relative_to(ds.bids_dir))
            written = sorted(p.name.split("_")[-1] for p in anat.glob("*.nii.gz"))
            if (label, session) in ds.sessions_without_contrasts:
                assert written == ["T1w.nii.gz"]
                continue
            assert written == ["FLAIR.nii.gz", "T1w.nii.gz", "T2w.nii.gz"]
            images = {c: nib.load(anat / f"sub-{label}_ses-{session}_{c}.nii.gz") for c in ("T1w", "T2w", "FLAIR")}
            assert images["T2w"].shape == images["T1w"].shape
            assert not np.allclose(images["T2w"].affine, images["T1w"].affine)  # a pose of its own
            zooms = [float(z) for z in images["FLAIR"].header.get_zooms()]
            assert zooms == [4.0, 4.0, 6.0]  # thick slices
            assert (anat / f"sub-{label}_ses-{session}_FLAIR.json").is_file()
    assert validate(ds.bids_dir).returncode == 0
    again = generate_dataset(tmp_path / "again", n_subjects=2, n_sessions=2, seed=4, contrasts=["T2w", "FLAIR"],
                             missing_contrast_fraction=0.25)  # fmt: skip
    files = sorted(p.relative_to(ds.bids_dir) for p in ds.bids_dir.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(again.bids_dir) for p in again.bids_dir.rglob("*.nii.gz"))
    assert all(_sha(ds.bids_dir / f) == _sha(again.bids_dir / f) for f in files)  # same seed, same bytes


def test_t2w_and_flair_have_their_tissue_contrast() -> None:
    space = anatomy.load_template_space(4)
    subject = cohorts.subject_anatomy("atrophy", 0, cohorts.draw_cohort(2, 1, 0, 0.5, False, 1, None, 0)[1][0])
    brain = space.t1 > 0
    csf = ndimage.binary_erosion(brain, iterations=2) & (space.gm + space.wm < 0.2)  # ventricles, not the rim
    gm, wm = brain & (space.gm > 0.7), brain & (space.wm > 0.7)
    means = {}
    for modality in ("T1w", "T2w", "FLAIR"):
        image = anatomy.render_subject(space, subject, modality).at(0)
        means[modality] = [float(image[tissue].mean()) for tissue in (csf, gm, wm)]
    t1_csf, t1_gm, t1_wm = means["T1w"]
    t2_csf, t2_gm, t2_wm = means["T2w"]
    flair_csf, flair_gm, flair_wm = means["FLAIR"]
    assert t1_csf < t1_gm < t1_wm
    assert t2_csf > t2_gm > t2_wm
    assert flair_csf < flair_wm < flair_gm


def test_bad_contrast_options_are_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="missing_contrast_fraction"):
        generate_dataset(tmp_path / "a", n_subjects=2, missing_contrast_fraction=0.5)
    with pytest.raises(UsageError, match="contrasts"):
        generate_dataset(tmp_path / "b", n_subjects=2, contrasts=["T2w", "T2w"])
    assert main([str(tmp_path / "c"), "--n-subjects", "2", "--contrasts", "T1w"]) == UsageError.exit_code
    assert not any(tmp_path.iterdir())
