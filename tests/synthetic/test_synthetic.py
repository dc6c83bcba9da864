"""The synthetic-data generator: layout, tables, determinism, disease effect, images, BIDS validity, CLI."""

from __future__ import annotations

import csv
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.cli.generate import main
from bids_app.errors import UsageError
from bids_app.synthetic import anatomy
from bids_app.synthetic.dataset import GeneratedDataset, generate_dataset
from bids_app.template import default_template_path

TINY_TEMPLATE_SHAPE = (49, 58, 47)
TINY_NATIVE_SHAPE = (44, 52, 44)
PREPROC = "space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz"


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _digests(root: Path, pattern: str = "*") -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob(pattern))
        if p.is_file()
    }


def _volume(path: Path) -> np.ndarray:
    return np.asarray(nib.Nifti1Image.from_filename(path).dataobj)


def _preproc(ds: GeneratedDataset, label: str, session: str) -> np.ndarray:
    assert ds.derivative_dir is not None
    name = f"sub-{label}_ses-{session}_{PREPROC}"
    return _volume(ds.derivative_dir / f"sub-{label}" / f"ses-{session}" / "anat" / name)


def _diagnoses(ds: GeneratedDataset) -> dict[str, str]:
    return {row["participant_id"][4:]: row["diagnosis"] for row in _read_tsv(ds.bids_dir / "participants.tsv")}


def _roi_means(ds: GeneratedDataset, session: str = "M000") -> dict[str, list[float]]:
    """Mean template-space intensity inside the ROI mask, per recorded diagnosis."""
    roi = _volume(ds.roi_mask_path) > 0
    means: dict[str, list[float]] = {"AD": [], "CN": []}
    for label, diagnosis in _diagnoses(ds).items():
        means[diagnosis].append(float(_preproc(ds, label, session)[roi].mean()))
    return means


def _validate(root: Path) -> subprocess.CompletedProcess[str]:
    beside_python = Path(sys.executable).parent / "bids-validator-deno"
    binary = str(beside_python) if beside_python.exists() else shutil.which("bids-validator-deno")
    assert binary is not None, "bids-validator-deno is a declared dependency; install the project"
    return subprocess.run([binary, str(root)], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> GeneratedDataset:
    out = tmp_path_factory.mktemp("tiny") / "bids"
    return generate_dataset(out, n_subjects=6, n_sessions=2, seed=1, with_pet=True, preprocessed="derivative")


@pytest.fixture(scope="module")
def no_effect(tmp_path_factory: pytest.TempPathFactory) -> GeneratedDataset:
    out = tmp_path_factory.mktemp("no_effect") / "bids"
    return generate_dataset(out, n_subjects=6, n_sessions=2, seed=1, effect_size=0.0, preprocessed="derivative")


def test_file_tree_and_counts(tiny: GeneratedDataset) -> None:
    root = tiny.bids_dir
    assert tiny.participants == ("001", "002", "003", "004", "005", "006")
    assert tiny.sessions == ("M000", "M012")
    for name in ("dataset_description.json", "README", "participants.tsv", "participants.json", "sessions.json"):
        assert (root / name).is_file(), name
    assert tiny.template_path == root / "code/template/tpl-MNI152NLin2009aSym_res-4mm_T1w.nii.gz"
    assert tiny.roi_mask_path == root / "code/template/roi-hippocampus_mask.nii.gz"
    assert (root / "code/template/tpl-MNI152NLin2009aSym_res-4mm_label-GM_probseg.nii.gz").is_file()
    assert len(list(root.glob("sub-*/ses-*/anat/*_T1w.nii.gz"))) == 12
    assert len(list(root.glob("sub-*/ses-*/anat/*_T1w.json"))) == 12
    assert len(list(root.glob("sub-*/ses-*/pet/*_trc-FDG_pet.nii.gz"))) == 12
    assert len(list(root.glob("sub-*/ses-*/pet/*_trc-FDG_pet.json"))) == 12
    assert len(list(root.glob("sub-*/sub-*_sessions.tsv"))) == 6
    assert (root / "sub-003/ses-M012/anat/sub-003_ses-M012_T1w.nii.gz").is_file()
    assert tiny.derivative_dir == root / "derivatives/preproc"
    assert tiny.caps_dir is None
    assert len(list(tiny.derivative_dir.glob(f"sub-*/ses-*/anat/*_{PREPROC}"))) == 12
    assert len(list(tiny.derivative_dir.glob("sub-*/ses-*/anat/*_desc-preproc_T1w.json"))) == 12


def test_participants_table_is_balanced(tmp_path: Path) -> None:
    ds = generate_dataset(tmp_path / "bids", n_subjects=10, n_sessions=1, seed=4, effect_size=0.0)
    with (ds.bids_dir / "participants.tsv").open(encoding="utf-8") as handle:
        assert handle.readline().rstrip("\n").split("\t") == ["participant_id", "diagnosis", "age", "sex"]
    rows = _read_tsv(ds.bids_dir / "participants.tsv")
    assert [r["participant_id"] for r in rows] == [f"sub-{i:03d}" for i in range(1, 11)]
    groups = {dx: [r for r in rows if r["diagnosis"] == dx] for dx in ("AD", "CN")}
    assert len(groups["AD"]) == len(groups["CN"]) == 5
    for members in groups.values():
        assert {r["sex"] for r in members} == {"M", "F"}
        assert abs(sum(r["sex"] == "M" for r in members) - len(members) / 2) <= 0.5
    ages = {dx: [float(r["age"]) for r in members] for dx, members in groups.items()}
    assert all(60.0 <= a <= 85.0 for group in ages.values() for a in group)
    assert abs(np.mean(ages["AD"]) - np.mean(ages["CN"])) < 5.0  # stratified: age does not predict diagnosis


def test_sessions_tables_follow_time(tiny: GeneratedDataset) -> None:
    diagnoses = _diagnoses(tiny)
    baseline = {r["participant_id"][4:]: float(r["age"]) for r in _read_tsv(tiny.bids_dir / "participants.tsv")}
    for label in tiny.participants:
        rows = _read_tsv(tiny.bids_dir / f"sub-{label}" / f"sub-{label}_sessions.tsv")
        assert [r["session_id"] for r in rows] == ["ses-M000", "ses-M012"]
        ages = [float(r["age"]) for r in rows]
        assert ages[0] == pytest.approx(baseline[label], abs=0.051)
        assert ages[1] - ages[0] == pytest.approx(1.0, abs=0.11)
        assert {r["diagnosis"] for r in rows} == {diagnoses[label]}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    options = dict(n_subjects=2, n_sessions=1, with_pet=True, preprocessed="derivative")
    first = generate_dataset(tmp_path / "a", seed=7, **options)  # type: ignore[arg-type]
    second = generate_dataset(tmp_path / "b", seed=7, **options)  # type: ignore[arg-type]
    other = generate_dataset(tmp_path / "c", seed=8, **options)  # type: ignore[arg-type]
    digests = _digests(first.bids_dir)
    assert len(digests) > 20
    for path in first.bids_dir.rglob("*.nii.gz"):
        assert path.read_bytes()[4:8] == bytes(4), f"{path} has a gzip timestamp"
    assert digests == _digests(second.bids_dir)
    name = "sub-001/ses-M000/anat/sub-001_ses-M000_T1w.nii.gz"
    assert digests[name] != _digests(other.bids_dir)[name]
    a, c = _volume(first.bids_dir / name), _volume(other.bids_dir / name)
    assert a.shape == c.shape and not np.array_equal(a, c)


def test_disease_effect_lowers_roi_intensity(tiny: GeneratedDataset, no_effect: GeneratedDataset) -> None:
    with_effect, without = _roi_means(tiny), _roi_means(no_effect)
    assert len(with_effect["AD"]) == len(with_effect["CN"]) == 3
    relative = np.mean(with_effect["AD"]) / np.mean(with_effect["CN"]) - 1.0
    assert relative < -0.10
    assert abs(np.mean(without["AD"]) / np.mean(without["CN"]) - 1.0) < 0.05
    # the same seed draws the same anatomies: CN images do not depend on effect_size, AD ones darken
    for label, diagnosis in _diagnoses(tiny).items():
        a, b = _preproc(tiny, label, "M000"), _preproc(no_effect, label, "M000")
        assert np.array_equal(a, b) == (diagnosis == "CN")


def test_atrophy_progresses_only_in_ad(tiny: GeneratedDataset) -> None:
    roi = _volume(tiny.roi_mask_path) > 0
    for label, diagnosis in _diagnoses(tiny).items():
        baseline, later = _preproc(tiny, label, "M000"), _preproc(tiny, label, "M012")
        if diagnosis == "CN":
            assert np.array_equal(baseline, later)
        else:
            assert later[roi].mean() < baseline[roi].mean()


def test_pet_shows_hypometabolism_in_the_same_region() -> None:
    space = anatomy.load_template_space(4)
    roi, brain = space.roi_mask() > 0, space.t1 > 0
    healthy = anatomy.render_subject(space, anatomy.random_subject(np.random.default_rng(0), 0.0, 70.0), "pet").at(0)
    ad = anatomy.render_subject(space, anatomy.random_subject(np.random.default_rng(0), 0.4, 70.0), "pet").at(0)
    assert ad[roi].mean() < 0.85 * healthy[roi].mean()
    elsewhere = brain & (space.roi_weight < 0.01)
    assert ad[elsewhere].mean() == pytest.approx(healthy[elsewhere].mean(), rel=0.02)


def test_sessions_of_a_subject_are_closer_than_other_subjects(tiny: GeneratedDataset) -> None:
    def corr(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.corrcoef(x.ravel(), y.ravel())[0, 1])

    images = {label: _preproc(tiny, label, "M000") for label in tiny.participants}
    for label in tiny.participants:
        same = corr(images[label], _preproc(tiny, label, "M012"))
        others = [corr(images[label], images[o]) for o in tiny.participants if o != label]
        assert same > max(others)
        assert max(others) < 0.999  # subjects really differ


def test_random_labels_keep_images_and_shuffle_diagnoses(tmp_path: Path) -> None:
    real = generate_dataset(tmp_path / "real", n_subjects=8, seed=2)
    shuffled = generate_dataset(tmp_path / "shuffled", n_subjects=8, seed=2, random_labels=True)
    assert _digests(real.bids_dir, "*.nii.gz") == _digests(shuffled.bids_dir, "*.nii.gz")
    real_dx, shuffled_dx = _diagnoses(real), _diagnoses(shuffled)
    assert sorted(shuffled_dx.values()) == ["AD"] * 4 + ["CN"] * 4
    assert real_dx != shuffled_dx


def test_native_images_are_3d_ras_and_background_is_dark(tiny: GeneratedDataset) -> None:
    path = tiny.bids_dir / "sub-002/ses-M000/anat/sub-002_ses-M000_T1w.nii.gz"
    image = nib.Nifti1Image.from_filename(path)
    data = np.asarray(image.dataobj)
    assert data.shape == TINY_NATIVE_SHAPE
    assert image.get_data_dtype() == np.int16
    assert np.allclose(np.diag(image.affine)[:3], 4.0)
    assert np.allclose(image.affine[:3, :3], np.diag([4.0, 4.0, 4.0]))  # RAS+, no shear
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    assert image.header.get_xyzt_units()[0] == "mm"
    bright = np.percentile(data, 99)
    assert bright > 500
    border = np.concatenate([data[[0, -1]].ravel(), data[:, [0, -1]].ravel(), data[:, :, [0, -1]].ravel()])
    assert border.mean() < 0.03 * bright  # background ~0 (Rician floor) and the brain is not cut
    # each session has its own pose: images of one subject differ in native space
    other = _volume(tiny.bids_dir / "sub-002/ses-M012/anat/sub-002_ses-M012_T1w.nii.gz")
    assert not np.array_equal(data, other)
    pet = nib.Nifti1Image.from_filename(tiny.bids_dir / "sub-002/ses-M000/pet/sub-002_ses-M000_trc-FDG_pet.nii.gz")
    assert pet.shape == TINY_NATIVE_SHAPE and pet.get_data_dtype() == np.float32
    assert float(np.asarray(pet.dataobj).max()) > 1000.0  # Bq/mL


def test_template_grid_files_share_one_grid(tiny: GeneratedDataset) -> None:
    template = nib.Nifti1Image.from_filename(tiny.template_path)
    assert template.shape == TINY_TEMPLATE_SHAPE
    assert np.allclose(np.diag(template.affine)[:3], 4.0)
    mask = nib.Nifti1Image.from_filename(tiny.roi_mask_path)
    preproc = tiny.derivative_dir / "sub-001/ses-M000/anat" / f"sub-001_ses-M000_{PREPROC}"  # type: ignore[operator]
    for other in (mask, nib.Nifti1Image.from_filename(preproc)):
        assert other.shape == TINY_TEMPLATE_SHAPE
        assert np.allclose(other.affine, template.affine)
    data = np.asarray(mask.dataobj)
    assert set(np.unique(data)) == {0, 1}
    # one blob per hemisphere, centred near the hippocampi at MNI (±26, -20, -14) mm
    for side in (-1, 1):
        voxels = np.argwhere(data > 0)
        mm = voxels @ mask.affine[:3, :3].T + mask.affine[:3, 3]
        blob = mm[np.sign(mm[:, 0]) == side]
        assert len(blob) > 20
        assert np.allclose(blob.mean(axis=0), [26 * side, -20, -14], atol=4.0)


def test_raw_dataset_and_derivative_pass_the_validator(tiny: GeneratedDataset) -> None:
    raw = _validate(tiny.bids_dir)
    assert raw.returncode == 0, raw.stdout[-3000:]
    assert tiny.derivative_dir is not None
    derivative = _validate(tiny.derivative_dir)
    assert derivative.returncode == 0, derivative.stdout[-3000:]


def test_caps_holds_the_same_template_space_images(tmp_path: Path, tiny: GeneratedDataset) -> None:
    caps = generate_dataset(tmp_path / "bids", n_subjects=6, n_sessions=2, seed=1, with_pet=True, preprocessed="caps")
    assert caps.caps_dir == caps.derivative_dir == caps.bids_dir / "derivatives/caps"
    assert (caps.caps_dir / "dataset_description.json").is_file()
    files = sorted(caps.caps_dir.glob("subjects/sub-*/ses-*/t1_linear/*.nii.gz"))
    assert len(files) == 12
    name = "sub-004_ses-M012_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_T1w.nii.gz"
    path = caps.caps_dir / "subjects/sub-004/ses-M012/t1_linear" / name
    assert path in files
    assert np.array_equal(_volume(path), _preproc(tiny, "004", "M012"))
    assert _validate(caps.bids_dir).returncode == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_subjects": 1}, "n_subjects"),
        ({"n_sessions": 0}, "n_sessions"),
        ({"preset": "huge"}, "Unknown preset 'huge'"),
        ({"effect_size": 1.5}, "effect_size"),
        ({"effect_size": -0.1}, "effect_size"),
        ({"seed": -1}, "seed"),
        ({"preprocessed": "fmriprep"}, "Unknown preprocessed kind 'fmriprep'"),
    ],
)
def test_bad_arguments_raise_usage_error(tmp_path: Path, options: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        generate_dataset(tmp_path / "bids", **options)  # type: ignore[arg-type]
    assert not (tmp_path / "bids").exists()


def test_non_empty_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data", encoding="utf-8")
    with pytest.raises(UsageError, match="not empty"):
        generate_dataset(tmp_path, n_subjects=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_cli_writes_dataset_and_maps_errors_to_exit_64(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bids"
    assert main([str(out), "--n-subjects", "2", "--n-sessions", "2", "--seed", "3", "--effect-size", "0.3"]) == 0
    assert str(out) in capsys.readouterr().out
    assert len(list(out.glob("sub-*/ses-*/anat/*_T1w.nii.gz"))) == 4
    assert main([str(tmp_path / "other"), "--preset", "huge"]) == 64
    assert main([str(tmp_path / "other"), "--n-subjects", "1"]) == 64
    assert "n_subjects" in capsys.readouterr().err


@pytest.mark.slow
def test_realistic_preset_uses_the_1mm_template(tmp_path: Path) -> None:
    ds = generate_dataset(tmp_path / "bids", n_subjects=2, n_sessions=1, preset="realistic", preprocessed="derivative")
    assert ds.template_path == default_template_path()
    image = nib.Nifti1Image.from_filename(ds.bids_dir / "sub-001/ses-M000/anat/sub-001_ses-M000_T1w.nii.gz")
    assert image.shape == (176, 208, 176)
    assert np.allclose(image.affine[:3, :3], np.eye(3))
    template = nib.Nifti1Image.from_filename(default_template_path())
    for path in (ds.roi_mask_path, ds.derivative_dir / "sub-002/ses-M000/anat" / f"sub-002_ses-M000_{PREPROC}"):  # type: ignore[operator]
        other = nib.Nifti1Image.from_filename(path)
        assert other.shape == template.shape and np.allclose(other.affine, template.affine)
    assert _validate(ds.bids_dir).returncode == 0


def test_medium_preset_writes_its_2mm_template_and_names_it(tmp_path: Path) -> None:
    import json

    ds = generate_dataset(tmp_path / "bids", n_subjects=2, n_sessions=1, preset="medium", preprocessed="derivative")
    assert ds.template_path.name == "tpl-MNI152NLin2009aSym_res-2mm_T1w.nii.gz"
    assert ds.template_path.parent == ds.bids_dir / "code" / "template"
    assert (ds.template_path.parent / "tpl-MNI152NLin2009aSym_res-2mm_label-GM_probseg.nii.gz").is_file()
    template = nib.Nifti1Image.from_filename(ds.template_path)
    assert np.allclose(np.diag(template.affine)[:3], 2.0)
    raw = nib.Nifti1Image.from_filename(ds.bids_dir / "sub-001/ses-M000/anat/sub-001_ses-M000_T1w.nii.gz")
    assert raw.shape == (88, 104, 88) and np.allclose(np.abs(np.diag(raw.affine)[:3]), 2.0)
    preproc = ds.derivative_dir / "sub-002/ses-M000/anat" / f"sub-002_ses-M000_{PREPROC}"  # type: ignore[operator]
    for path in (ds.roi_mask_path, preproc):
        other = nib.Nifti1Image.from_filename(path)
        assert other.shape == template.shape and np.allclose(other.affine, template.affine)
    sidecar = json.loads(Path(str(preproc).replace(".nii.gz", ".json")).read_text())
    assert sidecar["SpatialReference"] == "bids:raw:code/template/tpl-MNI152NLin2009aSym_res-2mm_T1w.nii.gz"


# -- kinds, re-scans, labels --------------------------------------------------------------------------


def test_random_kind_is_one_anatomy_plus_noise(tmp_path: Path, tiny: GeneratedDataset) -> None:
    ds = generate_dataset(tmp_path / "random", n_subjects=4, seed=5, kind="random", preprocessed="derivative")
    assert ds.kind == "random"
    images = [_preproc(ds, label, "M000").astype(np.float64) for label in ds.participants]
    brain = images[0] > 0.2 * images[0].max()
    sigma = 0.05 * max(float(image.max()) for image in images)  # RANDOM_NOISE_FRACTION of the maximum
    for other in images[1:]:
        assert np.std((other - images[0])[brain]) == pytest.approx(np.sqrt(2) * sigma, rel=0.15)
        assert abs(np.mean((other - images[0])[brain])) < 0.1 * sigma  # no anatomy left, only noise
    # in the default kind, two participants differ by far more than that noise
    a, b = (_preproc(tiny, label, "M000").astype(np.float64) for label in tiny.participants[:2])
    assert np.std((a - b)[brain]) > 1.2 * np.sqrt(2) * sigma


def test_trivial_kind_is_separable_by_a_threshold_on_the_roi_mean(tmp_path: Path) -> None:
    ds = generate_dataset(tmp_path / "trivial", n_subjects=6, n_sessions=2, seed=6, kind="trivial",
                          preprocessed="derivative")  # fmt: skip
    for session in ds.sessions:
        means = _roi_means(ds, session)
        assert len(means["AD"]) == len(means["CN"]) == 3
        assert max(means["AD"]) < 0.7 * min(means["CN"])  # the region's intensity halved in AD
    # raw images carry it too: native images are written from the effect-bearing template images
    assert _validate(ds.bids_dir).returncode == 0


def test_rescans_share_anatomy_under_new_labels(tmp_path: Path, tiny: GeneratedDataset) -> None:
    second = generate_dataset(tmp_path / "second", n_subjects=3, n_sessions=1, seed=9, first_label=101,
                              rescans_of=tiny, n_rescans=2, preprocessed="derivative")  # fmt: skip
    assert second.participants == ("101", "102", "103")
    assert second.rescans == (("101", "001"), ("102", "002"))
    assert second.identities[:2] == tiny.identities[:2] and second.identities[2] not in tiny.identities
    rows = {r["participant_id"]: r for r in _read_tsv(second.bids_dir / "participants.tsv")}
    first_rows = {r["participant_id"]: r for r in _read_tsv(tiny.bids_dir / "participants.tsv")}
    for new, old in second.rescans:
        assert rows[f"sub-{new}"]["diagnosis"] == first_rows[f"sub-{old}"]["diagnosis"]
        assert rows[f"sub-{new}"]["sex"] == first_rows[f"sub-{old}"]["sex"]
        assert float(rows[f"sub-{new}"]["age"]) == pytest.approx(float(first_rows[f"sub-{old}"]["age"]) + 2)
        # same anatomy two years on: the template-space image is the original's, plus atrophy in AD only
        original, rescan = _preproc(tiny, old, "M012"), _preproc(second, new, "M000")
        same = np.corrcoef(original.ravel(), rescan.ravel())[0, 1]
        assert same > 0.999
        raw = "sub-{}/ses-M000/anat/sub-{}_ses-M000_T1w.nii.gz"
        assert (
            _volume(tiny.bids_dir / raw.format(old, old)).tobytes()
            != _volume(second.bids_dir / raw.format(new, new)).tobytes()
        )  # a new acquisition: other noise, pose and bias
    stranger = _preproc(second, "103", "M000")
    assert (
        max(np.corrcoef(stranger.ravel(), _preproc(tiny, p, "M000").ravel())[0, 1] for p in tiny.participants) < 0.999
    )
    assert _validate(second.bids_dir).returncode == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "noise"}, "Unknown kind"),
        ({"first_label": 0}, "first_label"),
        ({"n_rescans": 1}, "n_rescans must be 0 to 0"),
    ],
)
def test_bad_kind_and_rescan_arguments(tmp_path: Path, options: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        generate_dataset(tmp_path / "x", n_subjects=2, **options)  # type: ignore[arg-type]


def test_rescans_need_the_same_kind(tmp_path: Path, tiny: GeneratedDataset) -> None:
    with pytest.raises(UsageError, match="same kind"):
        generate_dataset(tmp_path / "x", n_subjects=2, kind="trivial", rescans_of=tiny, n_rescans=1)


def test_cli_kind_and_first_label(tmp_path: Path) -> None:
    out = tmp_path / "bids"
    assert main([str(out), "--n-subjects", "2", "--kind", "random", "--first-label", "7"]) == 0
    assert sorted(p.name for p in out.glob("sub-*")) == ["sub-007", "sub-008"]
    assert "kind='random'" in (out / "README").read_text()
    assert main([str(tmp_path / "other"), "--kind", "noise"]) == 64
