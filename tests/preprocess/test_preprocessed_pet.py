"""Already preprocessed PET (``-d`` with ``--pet-tracer``): found in a BIDS derivative or a Clinica CAPS, cropped,
SUVR-normalised and extracted in every mode like preprocessed T1w, re-used on re-runs; a PET on another grid
fails that image only, naming the file and the fix.

The PET images are made here from the generator's template-space T1w (a non-linear contrast change, so a PET
tensor can be told from the T1w's), on the full template grid or on the crop grid, as the two forms
``load_preprocessed_pet`` accepts.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_app.config import AnalysisLevel, ExtractionConfig, Normalization, PreprocessConfig, RunConfig
from bids_app.derivatives import file_sha256
from bids_app.extraction import normalize_volume
from bids_app.inputs.bids_query import query_preprocessed_images
from bids_app.preprocess.qc import brain_mask
from bids_app.preprocess.t1_linear import crop_box, crop_image, load_template
from tests.conftest import run_cli, validate
from tests.participant.test_participant import CROP, PATCH, participant_args, status_table
from tests.test_bad_inputs import tree_hashes

SPACE = "MNI152NLin2009aSym"
# (participant, session) → grid of its FDG PET in the derivative; sub-002 ses-M012 has none
PET_GRIDS = {("001", "M000"): "full", ("001", "M012"): "crop", ("002", "M000"): "full"}


def pet_like(t1w: np.ndarray) -> np.ndarray:
    """A positive PET-like volume (Bq/mL) from a template-space T1w, whose min-max normalisation is not the T1w's."""
    scaled = np.clip(t1w, 0.0, None) / float(t1w.max())
    return (5000.0 * np.sqrt(scaled) + 200.0).astype(np.float32)


def save_mni(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data.astype(np.float32), affine)
    image.set_sform(affine, code=4)
    image.set_qform(affine, code=4)
    nib.save(image, path)
    return path


def write_pet(path: Path, t1w_path: Path, box: Any | None, transform: Any = pet_like) -> Path:
    """``transform`` of the template-space T1w at ``t1w_path``, on its full grid or cropped to ``box``."""
    t1w = nib.load(t1w_path)
    image = nib.Nifti1Image(transform(np.asarray(t1w.dataobj, dtype=np.float32)), t1w.affine)
    if box is not None:
        image = crop_image(image, box)
    return save_mni(path, np.asarray(image.dataobj), image.affine)


def tiny_box(dataset: Any) -> Any:
    return crop_box(load_template(PreprocessConfig(template_path=dataset.template_path)), CROP)


def expected_image(pet_path: Path, box: Any) -> np.ndarray:
    """The image tensor's volume: the PET on the crop grid, normalised as by default (z-score since the effect
    sweep; SUVR scaling cancels out of min-max and z-score alike)."""
    data = np.asarray(nib.load(pet_path).dataobj, dtype=np.float32)
    default = ExtractionConfig().normalization
    assert default is Normalization.ZSCORE
    return normalize_volume(data[box] if data.shape != CROP else data, default)


@pytest.fixture(scope="module")
def pet_dataset(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """2 participants x 2 sessions with a BIDS derivative holding T1w and FDG PET (``PET_GRIDS``) and decoys."""
    from bids_app.synthetic.dataset import generate_dataset

    dataset = generate_dataset(tmp_path_factory.mktemp("pet_derivative") / "bids", n_subjects=2, n_sessions=2,
                               preset="tiny", seed=6, preprocessed="derivative")  # fmt: skip
    box = tiny_box(dataset)
    for (label, session), grid in PET_GRIDS.items():
        write_pet(pet_path(dataset, label, session), t1w_path(dataset, label, session), box if grid == "crop" else None)
    # decoys: another tracer, and an FDG PET in the participant's own space beside the template-space one (a space
    # that does not fit the template is never preferred to one that does)
    write_pet(pet_path(dataset, "002", "M000", tracer="AV45"), t1w_path(dataset, "002", "M000"), None)
    native = pet_path(dataset, "002", "M000").with_name("sub-002_ses-M000_trc-FDG_space-T1w_desc-preproc_pet.nii.gz")
    save_mni(native, np.ones((20, 24, 20), dtype=np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    return dataset


def t1w_path(dataset: Any, label: str, session: str) -> Path:
    folder = dataset.derivative_dir / f"sub-{label}" / f"ses-{session}" / "anat"
    return folder / f"sub-{label}_ses-{session}_space-{SPACE}_desc-preproc_T1w.nii.gz"


def pet_path(dataset: Any, label: str, session: str, tracer: str = "FDG") -> Path:
    folder = dataset.derivative_dir / f"sub-{label}" / f"ses-{session}" / "pet"
    return folder / f"sub-{label}_ses-{session}_trc-{tracer}_space-{SPACE}_desc-preproc_pet.nii.gz"


def pet_args(dataset: Any, bids_dir: Path, out: Path, *extra: str) -> list[str]:
    return participant_args(dataset, bids_dir, out, "-d", str(bids_dir / "derivatives" / "preproc"),
                            "--skip-bids-validation", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def processed_pet(pet_dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The derivative processed T1w only, then again with ``--pet-tracer FDG`` (every mode)."""
    out = tmp_path_factory.mktemp("pet_out") / "out"
    first = run_cli(*pet_args(pet_dataset, pet_dataset.bids_dir, out))
    assert first.returncode == 0, first.stderr[-3000:]
    t1w_tensors = {p: p.stat().st_mtime_ns for p in out.glob("sub-*/ses-*/deeplearning/*_T1w.npy")}
    second = run_cli(*pet_args(pet_dataset, pet_dataset.bids_dir, out, "--pet-tracer", "FDG"))
    assert second.returncode == 0, second.stderr[-3000:]
    return {"out": out, "t1w_tensors": t1w_tensors, "status": status_table(out), "stderr": second.stderr}


def test_preprocessed_pet_is_extracted_in_every_mode(pet_dataset, processed_pet: dict[str, Any]) -> None:
    out = processed_pet["out"]
    box = tiny_box(pet_dataset)
    n_patches = int(np.prod([c // PATCH for c in CROP]))
    expected_shapes = {"image": (1, *CROP), "patch": (n_patches, 1, PATCH, PATCH, PATCH),
                       "slice": (CROP[0] - 4, 1, CROP[1], CROP[2])}  # fmt: skip
    preprocessed = sorted(out.glob("sub-*/ses-*/pet/*_pet.nii.gz"))
    assert [p.name for p in preprocessed] == [
        f"sub-{label}_ses-{session}_trc-FDG_space-{SPACE}_desc-preproc_pet.nii.gz" for label, session in PET_GRIDS
    ]  # neither the AV45 PET nor the space-T1w one
    for (label, session), grid in PET_GRIDS.items():
        source = pet_path(pet_dataset, label, session)
        stem = f"sub-{label}_ses-{session}_trc-FDG"
        preproc = out / f"sub-{label}" / f"ses-{session}" / "pet" / f"{stem}_space-{SPACE}_desc-preproc_pet.nii.gz"
        image = nib.load(preproc)
        assert image.shape == CROP, grid
        suvr = np.asarray(image.dataobj)
        template = load_template(PreprocessConfig(template_path=pet_dataset.template_path))
        assert float(suvr[brain_mask(crop_image(template, box))].mean()) == pytest.approx(1.0, rel=1e-5)
        sidecar = json.loads(preproc.with_name(preproc.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["Units"] == "SUVR" and sidecar["Complete"] is True
        assert sidecar["Sources"] == [f"bids:raw:{source.relative_to(pet_dataset.bids_dir).as_posix()}"]
        assert sidecar["Description"].endswith("by its world coordinates, SUVR normalisation")
        assert sidecar["SourceSpace"] == SPACE and sidecar["SourceGrid"]["Shape"] == list(nib.load(source).shape)
        assert sidecar["Resampling"] == ("none" if grid == "crop" else "integer shift")
        assert sidecar["QC"]["suvr_reference_mean"] > 200.0 and sidecar["SHA256"] == file_sha256(preproc)
        qc_file = out / f"sub-{label}" / f"ses-{session}" / "qc" / f"{stem}_desc-qc_pet.json"
        assert json.loads(qc_file.read_text())["Image"] == source.name
        dl = out / f"sub-{label}" / f"ses-{session}" / "deeplearning"
        for mode in ("image", "patch", "slice", "roi"):
            tensor = np.load(dl / f"{stem}_space-{SPACE}_desc-{mode}_pet.npy", mmap_mode="r", allow_pickle=False)
            if mode == "roi":
                assert tensor.shape[:2] == (1, 1) and float(tensor.max()) > 0
            else:
                assert tensor.shape == expected_shapes[mode], mode
            assert tensor.dtype == np.float32
            meta = json.loads((dl / f"{stem}_space-{SPACE}_desc-{mode}_pet.json").read_text())
            assert meta["Complete"] is True and meta["Shape"] == list(tensor.shape)
            assert meta["Source"] == preproc.relative_to(out).as_posix()
            assert meta["SourceSHA256"] == file_sha256(preproc)
            assert meta["RawSource"] == str(source) and meta["RawSourceSHA256"] == file_sha256(source)
        # the tensor is the PET (on either input grid), not the session's T1w
        image_tensor = np.load(dl / f"{stem}_space-{SPACE}_desc-image_pet.npy")
        np.testing.assert_allclose(image_tensor[0], expected_image(source, box), atol=1e-6)
        t1w_tensor = np.load(dl / f"sub-{label}_ses-{session}_space-{SPACE}_desc-image_T1w.npy")
        assert np.abs(image_tensor - t1w_tensor).max() > 0.05
        # the participant report shows this PET (before/after, mosaic, network inputs) in its own section
        page = (out / f"sub-{label}" / f"sub-{label}_report.html").read_text(encoding="utf-8")
        section = page.split(f'id="{stem}_pet"')[1].split("</section>")[0]
        assert section.count('<figure class="before-after"') == 1 and section.count('<figure class="mosaic"') == 1
        assert section.count('<figure class="network-input"') == 4  # image, patch, slice, roi
    # 4 T1w + 3 PET, 4 modes each, no registration transform
    assert len(list(out.glob("sub-*/ses-*/deeplearning/*.npy"))) == (4 + 3) * 4
    assert not list(out.glob("sub-*/**/*_xfm.mat"))
    assert validate(out).returncode == 0


def test_adding_pet_keeps_t1w_outputs_and_a_rerun_skips_everything(
    pet_dataset, processed_pet: dict[str, Any], tmp_path: Path
) -> None:
    # the run that added --pet-tracer re-used every T1w output and processed the PET
    status = processed_pet["status"]
    t1w_rows = status[status["image"].str.endswith("_T1w.nii.gz") & (status["stage"] != "report")]
    pet_rows = status[status["image"].str.endswith("_pet.nii.gz")]
    assert len(t1w_rows) == 4 * 5 and set(t1w_rows["status"]) == {"skipped"}
    assert len(pet_rows) == 3 * 5 and set(pet_rows["status"]) == {"ok"}
    assert {p: p.stat().st_mtime_ns for p in processed_pet["t1w_tensors"]} == processed_pet["t1w_tensors"]
    # a plain re-run re-uses the PET outputs too
    out = tmp_path / "out"
    shutil.copytree(processed_pet["out"], out)
    before = {p: p.stat().st_mtime_ns for p in out.glob("sub-*/ses-*/**/*_pet.*")}
    result = run_cli(*pet_args(pet_dataset, pet_dataset.bids_dir, out, "--pet-tracer", "FDG"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = status_table(out)
    assert set(rows[rows["stage"] != "report"]["status"]) == {"skipped"}
    assert len(before) == 3 * (2 + 1 + 4 * 2)  # per PET: image + sidecar, QC JSON, 4 tensors + sidecars
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_preprocessed_pet_outside_the_template_fails_that_image_only(
    pet_dataset, processed_pet: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(processed_pet["out"], out)
    hashes = tree_hashes(out)
    bad = pet_path(pet_dataset, "001", "M000")
    original = bad.read_bytes()
    good = nib.load(bad)
    shifted = good.affine.copy()
    shifted[:3, 3] += 200.0  # the brain far outside the template's field of view
    save_mni(bad, np.asarray(good.dataobj), shifted)
    try:
        args = pet_args(pet_dataset, pet_dataset.bids_dir, out, "--pet-tracer", "FDG", "--participant-label", "001")
        result = run_cli(*args)
    finally:
        bad.write_bytes(original)  # the dataset is shared by this module's tests
    assert result.returncode == 65
    errors = "\n".join(line for line in result.stderr.splitlines() if " ERROR " in line)
    assert f"Preprocessed PET {bad} declares space {SPACE}, but its grid" in errors, result.stderr[-3000:]
    assert "holds only 0.0% of the" in errors and "--template FILE --template-space LABEL" in errors
    status = pd.read_csv(out / "status" / "sub-001_status.tsv", sep="\t", dtype=str, keep_default_na=False)
    failed = status[status["status"] == "failed"]
    assert list(failed["image"]) == [bad.name] and list(failed["stage"]) == ["preprocess"]
    assert f"{bad} declares space {SPACE}" in failed["message"].iloc[0]
    assert set(status[status["status"] != "failed"]["status"]) == {"skipped", "ok"}  # the others (report: ok)
    assert tree_hashes(out) == hashes  # the session's earlier PET outputs are kept, not half-replaced


def test_clinica_caps_pet_linear_output_is_extracted(tmp_path: Path) -> None:
    from bids_app.synthetic.dataset import generate_dataset

    dataset = generate_dataset(tmp_path / "bids", n_subjects=2, n_sessions=1, preset="tiny", seed=8,
                               preprocessed="caps")  # fmt: skip
    box = tiny_box(dataset)
    t1w = next(dataset.caps_dir.glob("subjects/sub-001/ses-M000/t1_linear/*_T1w.nii.gz"))
    folder = t1w.parent.parent / "pet_linear"
    stem = "sub-001_ses-M000_trc-18FFDG_space-MNI152NLin2009cSym"
    cropped = write_pet(folder / f"{stem}_desc-Crop_res-1x1x1_suvr-pons2_pet.nii.gz", t1w, box)
    uncropped = write_pet(folder / f"{stem}_res-1x1x1_suvr-pons2_pet.nii.gz", t1w, None, lambda v: v + 1.0)
    save_mni(folder / "sub-001_ses-M000_trc-18FFDG_space-T1w_pet.nii.gz", np.ones((20, 24, 20)), np.eye(4))
    out = tmp_path / "out"
    result = run_cli(str(dataset.bids_dir), str(out), "participant", "-d", str(dataset.caps_dir), "--template",
                     str(dataset.template_path), "--crop-shape", *map(str, CROP), "--modes", "image", "slice",
                     "--discarded-slices", "2", "--pet-tracer", "18FFDG", "--participant-label", "001")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"has 2 preprocessed pet candidates; using {cropped}" in result.stderr and str(uncropped) in result.stderr
    preproc = out / "sub-001/ses-M000/pet" / f"sub-001_ses-M000_trc-18FFDG_space-{SPACE}_desc-preproc_pet.nii.gz"
    sidecar = json.loads(preproc.with_name(preproc.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["Sources"] == [f"bids:raw:{cropped.relative_to(dataset.bids_dir).as_posix()}"]
    tensors = sorted(out.glob("sub-001/ses-M000/deeplearning/*_pet.npy"))
    assert [p.name.split("_desc-")[1] for p in tensors] == ["image_pet.npy", "slice_pet.npy"]
    image = np.load(tensors[0])
    assert image.shape == (1, *CROP) and np.load(tensors[1]).shape == (CROP[0] - 4, 1, CROP[1], CROP[2])
    np.testing.assert_allclose(image[0], expected_image(cropped, box), atol=1e-6)
    assert json.loads(tensors[0].with_suffix(".json").read_text())["RawSource"] == str(cropped)


# -- finding the images (no image is read) ---------------------------------------------------------------------


def touch(root: Path, *relative: str) -> None:
    for name in relative:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def query_cfg(
    tmp_path: Path, root: Path, pet_tracers: tuple[str, ...] = ("FDG",), template_space: str = SPACE, **changes: Any
) -> RunConfig:
    preprocess = PreprocessConfig(derivatives_dirs=(root,), pet_tracers=pet_tracers, template_space=template_space)
    return RunConfig(tmp_path, tmp_path / "out", AnalysisLevel.PARTICIPANT, preprocess=preprocess, **changes)


@pytest.fixture
def caps(tmp_path: Path) -> Path:
    root = tmp_path / "caps"
    session = "subjects/sub-01/ses-M000"
    t1w, pet = f"{session}/t1_linear/sub-01_ses-M000", f"{session}/pet_linear/sub-01_ses-M000"
    mni = "space-MNI152NLin2009cSym"
    touch(root, f"{t1w}_{mni}_desc-Crop_res-1x1x1_T1w.nii.gz", f"{t1w}_{mni}_res-1x1x1_T1w.nii.gz",
          f"{pet}_trc-FDG_{mni}_desc-Crop_res-1x1x1_suvr-pons2_pet.nii.gz",
          f"{pet}_trc-FDG_{mni}_res-1x1x1_suvr-pons2_pet.nii.gz",  # Clinica's uncropped image
          f"{pet}_trc-FDG_space-T1w_pet.nii.gz",  # Clinica's PET in T1w space: not template space
          f"{pet}_trc-AV45_{mni}_desc-Crop_res-1x1x1_suvr-pons2_pet.nii.gz",
          f"subjects/sub-01/ses-M012/pet_linear/sub-01_ses-M012_trc-FDG_{mni}_desc-Crop_pet.nii.gz",
          f"subjects/sub-02/ses-M000/pet_linear/sub-02_ses-M000_trc-FDG_{mni}_desc-Crop_pet.nii.gz")  # fmt: skip
    return root


def test_caps_pet_query_keeps_one_template_space_image_per_session_and_tracer(
    caps: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bids_app.inputs.bids_query"):
        records = query_preprocessed_images(query_cfg(tmp_path, caps), ["01"], "pet")
    assert [(r.participant_label, r.session_label, r.path.name) for r in records] == [
        ("01", "M000", "sub-01_ses-M000_trc-FDG_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_suvr-pons2_pet.nii.gz"),
        ("01", "M012", "sub-01_ses-M012_trc-FDG_space-MNI152NLin2009cSym_desc-Crop_pet.nii.gz"),
    ]
    assert all(r.suffix == "pet" and r.preprocessed for r in records)
    assert records[0].entities == {"subject": "01", "session": "M000", "tracer": "FDG", "space": "MNI152NLin2009cSym",
                                   "desc": "Crop", "res": "1x1x1", "suvr": "pons2"}  # fmt: skip
    assert "sub-01 ses-M000 has 2 preprocessed pet candidates" in caplog.text  # the space-T1w one is no candidate
    assert "_res-1x1x1_suvr-pons2_pet.nii.gz" in caplog.text.split("Others: ")[1]

    only_m012 = query_preprocessed_images(query_cfg(tmp_path, caps, session_labels=("M012",)), ["01"], "pet")
    assert [r.session_label for r in only_m012] == ["M012"]
    av45 = query_preprocessed_images(query_cfg(tmp_path, caps, pet_tracers=("AV45",)), ["01", "02"], "pet")
    assert [(r.participant_label, r.entities["tracer"]) for r in av45] == [("01", "AV45")]
    t1w = query_preprocessed_images(query_cfg(tmp_path, caps), ["01"])
    assert [r.path.name for r in t1w] == ["sub-01_ses-M000_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_T1w.nii.gz"]


def test_no_preprocessed_pet_is_a_warning_naming_the_expected_files(
    caps: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bids_app.inputs.bids_query"):
        assert query_preprocessed_images(query_cfg(tmp_path, caps, pet_tracers=("PIB",)), ["01"], "pet") == []
    assert f"No preprocessed PET with tracer(s) PIB for participant(s) 01 in {caps}" in caplog.text
    assert "pet_linear/*_trc-<tracer>_space-MNI152*_pet.nii.gz" in caplog.text and "run without -d" in caplog.text


def test_derivative_pet_query_honours_space_tracer_and_filters(tmp_path: Path) -> None:
    root = tmp_path / "preproc"
    root.mkdir()
    description = {"Name": "pet", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "x"}]}
    (root / "dataset_description.json").write_text(json.dumps(description))
    pet = "sub-01/ses-M000/pet/sub-01_ses-M000_trc-FDG"
    touch(root, f"{pet}_space-{SPACE}_desc-preproc_pet.nii.gz", f"{pet}_space-{SPACE}_desc-smooth_pet.nii.gz",
          f"{pet}_space-T1w_desc-preproc_pet.nii.gz", f"{pet}_desc-preproc_pet.nii.gz",
          f"sub-01/ses-M000/pet/sub-01_ses-M000_trc-AV45_space-{SPACE}_desc-preproc_pet.nii.gz",
          "sub-01/ses-M012/pet/sub-01_ses-M012_trc-FDG_space-tiny_pet.nii.gz")  # fmt: skip
    records = query_preprocessed_images(query_cfg(tmp_path, root), ["01"], "pet")
    # M000: the template-space images win over space-T1w and no space; M012's only PET is kept in its unknown
    # space, for the participant job to refuse with the fix
    assert [r.path.name for r in records] == [f"sub-01_ses-M000_trc-FDG_space-{SPACE}_desc-preproc_pet.nii.gz",
                                              "sub-01_ses-M012_trc-FDG_space-tiny_pet.nii.gz"]  # fmt: skip
    assert records[0].entities["tracer"] == "FDG" and records[0].suffix == "pet" and records[0].preprocessed
    # a filter chooses among the candidates; the template's own space label counts as template space
    smooth = query_cfg(tmp_path, root, bids_filters={"pet": {"desc": "smooth"}})
    chosen = query_preprocessed_images(smooth, ["01"], "pet")
    assert [r.path.name for r in chosen] == [f"sub-01_ses-M000_trc-FDG_space-{SPACE}_desc-smooth_pet.nii.gz"]
    tiny = query_cfg(tmp_path, root, template_space="tiny", session_labels=("M012",))
    assert [r.path.name for r in query_preprocessed_images(tiny, ["01"], "pet")] == [
        "sub-01_ses-M012_trc-FDG_space-tiny_pet.nii.gz"
    ]


@pytest.mark.slow
def test_preprocessed_pet_at_1mm_on_the_full_template_grid(tmp_path: Path) -> None:
    from bids_app.preprocess.qc import qc_passes
    from bids_app.synthetic.dataset import generate_dataset

    dataset = generate_dataset(tmp_path / "bids", n_subjects=2, n_sessions=1, preset="realistic", seed=9,
                               preprocessed="derivative")  # fmt: skip
    source = write_pet(pet_path(dataset, "001", "M000"), t1w_path(dataset, "001", "M000"), None)
    assert nib.load(source).shape == (197, 233, 189)  # nilearn's MNI152 2009a grid, 1 mm
    out = tmp_path / "out"
    result = run_cli(str(dataset.bids_dir), str(out), "participant", "-d", str(dataset.derivative_dir),
                     "--participant-label", "001", "--pet-tracer", "FDG", "--modes", "image", "patch")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    dl = out / "sub-001" / "ses-M000" / "deeplearning"
    stem = f"sub-001_ses-M000_trc-FDG_space-{SPACE}_desc"
    assert np.load(dl / f"{stem}-image_pet.npy", mmap_mode="r").shape == (1, 169, 208, 179)
    assert np.load(dl / f"{stem}-patch_pet.npy", mmap_mode="r").shape == (3 * 4 * 3, 1, 50, 50, 50)
    preproc = out / "sub-001" / "ses-M000" / "pet" / f"{stem}-preproc_pet.json"
    assert qc_passes(json.loads(preproc.read_text())["QC"], "pet")
