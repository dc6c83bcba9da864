"""Preprocessed inputs in any MNI152 space, placed on the project's template grid by their world coordinates.

Every input here is made from the MNI152 2009a template by affine arithmetic, with a bright marker at a known
world coordinate (``MARKER_MM``): the marker must land within one voxel of the same world coordinate on the
output grid. Clinica's t1-linear crop of MNI152NLin2009cSym is the voxel box [12:181, 13:221, 0:179] of the 2009c
template grid (193 x 229 x 193 at 1 mm, first voxel at (-96, -132, -78) mm), i.e. a 169 x 208 x 179 grid whose
first voxel is at (-84, -119, -78) mm: a whole-voxel offset from the project's 2009a crop, copied without
interpolation. The fMRIPrep-style derivative is on a rotated 3 mm grid (trilinear). The refusals and the custom
map run on the generator's 4 mm template so they stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tests.conftest import run_cli, validate

MARKER_MM = np.array([30.0, -40.0, 20.0])  # inside the brain, off every axis of symmetry
CLINICA_CROP_AFFINE = np.array([[1.0, 0, 0, -84], [0, 1, 0, -119], [0, 0, 1, -78], [0, 0, 0, 1]])
CLINICA_CROP_SHAPE = (169, 208, 179)
TPL = "MNI152NLin2009aSym"
TINY_CROP = (40, 48, 40)


def write_image(path: Path, data: np.ndarray, affine: np.ndarray, code: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data.astype(np.float32), affine)
    image.set_sform(affine, code=code)
    image.set_qform(affine, code=code)
    nib.save(image, path)
    return path


def sample_template(template: nib.Nifti1Image, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The template's values at the world positions of a grid (trilinear, 0 outside): an image 'in MNI space'."""
    from scipy import ndimage

    to_template = np.linalg.solve(np.asarray(template.affine, dtype=np.float64), affine)
    data = np.asarray(template.dataobj, dtype=np.float32)
    return ndimage.affine_transform(data, to_template[:3, :3], to_template[:3, 3], output_shape=shape, order=1)


def add_marker(data: np.ndarray, affine: np.ndarray, world_mm: np.ndarray, size: int = 2) -> np.ndarray:
    """``data`` with a ``size``-voxel cube, 10 times its maximum, starting at the voxel nearest ``world_mm``."""
    index = np.round(np.linalg.solve(affine, [*world_mm, 1.0])[:3]).astype(int)
    marked = data.copy()
    marked[tuple(slice(i, i + size) for i in index)] = 10.0 * float(data.max())
    return marked


def marker_position_mm(path: Path) -> np.ndarray:
    """World position (mm) of the centre of the voxels above half the maximum of an image."""
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    hot = np.argwhere(data > 0.5 * data.max())
    return nib.affines.apply_affine(image.affine, hot.mean(axis=0))


def bids_root(root: Path, labels: tuple[str, ...], sessions: tuple[str, ...] = ()) -> Path:
    """A raw BIDS dataset with empty participant folders (the images come from -d)."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "raw", "BIDSVersion": "1.10.0"}))
    for label in labels:
        for session in sessions or ("",):
            (root / f"sub-{label}" / (f"ses-{session}" if session else "") / "anat").mkdir(parents=True)
    return root


def derivative_root(root: Path) -> Path:
    root.mkdir(parents=True)
    description = {"Name": "fmriprep-like", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
                   "GeneratedBy": [{"Name": "fmriprep"}]}  # fmt: skip
    (root / "dataset_description.json").write_text(json.dumps(description))
    return root


def sidecar(path: Path) -> dict[str, Any]:
    return json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())


def test_clinica_caps_2009c_crop_is_shifted_onto_the_2009a_grid(tmp_path: Path) -> None:
    from bids_app.template import default_template_path

    template = nib.load(default_template_path())  # nilearn's 2009a, 197 x 233 x 189, first voxel (-98, -134, -72)
    offset = np.round(np.linalg.solve(template.affine, CLINICA_CROP_AFFINE)[:3, 3]).astype(int)  # (14, 15, -6)
    source = np.zeros(CLINICA_CROP_SHAPE, dtype=np.float32)  # the template's voxels at the crop's world positions
    inside = [
        slice(max(0, -o), min(n, m - o)) for o, n, m in zip(offset, CLINICA_CROP_SHAPE, template.shape, strict=True)
    ]
    taken = tuple(slice(s.start + o, s.stop + o) for s, o in zip(inside, offset, strict=True))
    source[tuple(inside)] = np.asarray(template.dataobj)[taken]
    data = add_marker(source, CLINICA_CROP_AFFINE, MARKER_MM, size=1)
    caps = tmp_path / "caps"
    folder = caps / "subjects" / "sub-01" / "ses-M000" / "t1_linear"
    name = "sub-01_ses-M000_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_T1w.nii.gz"
    source = write_image(folder / name, data, CLINICA_CROP_AFFINE, code=1)  # coded scanner, as some CAPS files are
    (caps / "dataset_description.json").write_text(json.dumps({"Name": "caps", "BIDSVersion": "1.10.0",
                                                               "DatasetType": "derivative"}))  # fmt: skip
    bids = bids_root(tmp_path / "bids", ("01",), ("M000",))
    out = tmp_path / "out"
    filters = tmp_path / "filters.json"  # a CAPS is not filtered, and t2w without --contrasts is not read: warned
    filters.write_text(json.dumps({"t1w": {"acquisition": "none"}, "t2w": {"acquisition": "none"}}))
    result = run_cli(str(bids), str(out), "participant", "-d", str(caps), "--modes", "image",
                     "--skip-bids-validation", "--bids-filter-file", str(filters))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert any(f"key(s) t1w have no effect on the Clinica CAPS {caps}" in line for line in warnings), warnings
    assert any("key 't2w' has no effect: raw T2w images are read only with --contrasts T2w" in line
               for line in warnings), warnings  # fmt: skip
    assert ("sub-01 ses-M000: input in MNI152NLin2009cSym (169x208x179, 1 mm), shifted onto the "
            f"{TPL} grid by (0, 2, -6) voxels ({name})") in result.stderr  # fmt: skip
    preproc = out / "sub-01" / "ses-M000" / "anat" / f"sub-01_ses-M000_space-{TPL}_desc-preproc_T1w.nii.gz"
    image = nib.load(preproc)
    assert image.shape == CLINICA_CROP_SHAPE  # the project's default crop of 2009a has Clinica's shape
    assert int(image.header["sform_code"]) == 4  # on the MNI template's grid, not "scanner"
    assert np.abs(marker_position_mm(preproc) - MARKER_MM).max() <= 1.0
    meta = sidecar(preproc)
    assert meta["SourceSpace"] == "MNI152NLin2009cSym" and meta["Resampling"] == "integer shift"
    assert meta["SourceGrid"] == {"Shape": list(CLINICA_CROP_SHAPE), "VoxelSizeMM": [1.0, 1.0, 1.0],
                                  "Affine": CLINICA_CROP_AFFINE.tolist()}  # fmt: skip
    # values copied, not interpolated: the output holds the source's voxels, shifted
    out_data, src = np.asarray(image.dataobj), np.asarray(nib.load(source).dataobj)
    np.testing.assert_array_equal(out_data[:, 2:, :173], src[:, :-2, 6:])
    assert not out_data[:, :2, :].any() and not out_data[:, :, 173:].any()  # outside Clinica's box: zero
    tensor = out / "sub-01" / "ses-M000" / "deeplearning" / f"sub-01_ses-M000_space-{TPL}_desc-image_T1w"
    assert json.loads(tensor.with_suffix(".json").read_text())["SourceSpace"] == "MNI152NLin2009cSym"
    assert meta["QC"]["smoothed_correlation_to_template"] > 0.95


@pytest.fixture(scope="module")
def derivative_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One participant run on the 4 mm template over an fMRIPrep-like derivative holding, per participant:

    - 01: a T1w in MNI152NLin2009cAsym on a 3 mm grid rotated 4° about z (trilinear), and a GM probability map
      (``--custom-map gm``) in the same space on the 4 mm grid shifted by whole voxels;
    - 02: a T1w with no space entity; 03: space-T1w; 04: space-OASIS30ANTs; 05: an MNI T1w whose affine puts the
      brain 300 mm away. Each of 02-05 is refused with its fix; 01 is processed.
    """
    from bids_app.synthetic.anatomy import load_template_space

    root = tmp_path_factory.mktemp("template_space")
    space = load_template_space(4)
    template_path = write_image(root / "templates" / f"tpl-{TPL}_res-4mm_T1w.nii.gz", space.t1, space.affine)
    roi_path = write_image(root / "templates" / "roi.nii.gz", space.roi_mask().astype(np.float32), space.affine)
    template = nib.load(template_path)
    derivative = derivative_root(root / "fmriprep")
    anat = derivative / "sub-01" / "anat"

    theta = np.deg2rad(4.0)
    rotated = np.eye(4)
    rotated[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    affine = rotated @ np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-96.0, -130.0, -74.0]
    shape = (66, 78, 64)
    t1w = add_marker(sample_template(template, shape, affine), affine, MARKER_MM)
    write_image(anat / "sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz", t1w, affine)
    write_image(anat / "sub-01_desc-preproc_T1w.nii.gz", t1w, np.diag([3.0, 3.0, 3.0, 1.0]))  # native: ignored

    gm_affine = space.affine.copy()
    gm_affine[:3, 3] += [8.0, -4.0, 12.0]  # whole 4 mm voxels
    gm = sample_template(nib.Nifti1Image(space.gm, space.affine), space.gm.shape, gm_affine)
    gm_name = "sub-01_space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz"
    write_image(anat / gm_name, gm, gm_affine)
    write_image(anat / "sub-01_space-MNI152NLin2009cAsym_label-WM_probseg.nii.gz", gm, gm_affine)  # not selected

    refused = {"02": "sub-02_desc-preproc_T1w.nii.gz", "03": "sub-03_space-T1w_desc-preproc_T1w.nii.gz",
               "04": "sub-04_space-OASIS30ANTs_desc-preproc_T1w.nii.gz",
               "05": "sub-05_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz"}  # fmt: skip
    for label, name in refused.items():
        far = affine.copy()
        if label == "05":
            far[:3, 3] += 300.0
        write_image(derivative / f"sub-{label}" / "anat" / name, t1w, far)

    bids = bids_root(root / "bids", ("01", *refused))
    out = root / "out"
    result = run_cli(str(bids), str(out), "participant", "-d", str(derivative), "--template", str(template_path),
                     "--crop-shape", *map(str, TINY_CROP), "--modes", "image", "roi", "--roi-mask",
                     f"hippocampus={roi_path}", "--custom-map", "gm=suffix:probseg,label:GM,space:MNI152NLin2009cAsym",
                     "--skip-bids-validation")  # fmt: skip
    return {"result": result, "out": out, "derivative": derivative, "refused": refused, "gm": anat / gm_name,
            "space": space}  # fmt: skip


def test_fmriprep_derivative_on_a_rotated_3mm_grid_is_resampled_by_world_coordinates(derivative_run) -> None:
    out = derivative_run["out"]
    preproc = out / "sub-01" / "anat" / f"sub-01_space-{TPL}_desc-preproc_T1w.nii.gz"
    assert nib.load(preproc).shape == TINY_CROP
    assert np.abs(marker_position_mm(preproc) - MARKER_MM).max() <= 4.0  # one 4 mm voxel
    meta = sidecar(preproc)
    assert meta["SourceSpace"] == "MNI152NLin2009cAsym" and meta["Resampling"] == "trilinear"
    assert meta["SourceGrid"]["Shape"] == [66, 78, 64]
    assert meta["SourceGrid"]["VoxelSizeMM"] == pytest.approx([3.0, 3.0, 3.0])
    assert "resampled (trilinear) onto the MNI152NLin2009aSym grid" in derivative_run["result"].stderr
    tensor = out / "sub-01" / "deeplearning" / f"sub-01_space-{TPL}_desc-image_T1w.npy"
    assert np.load(tensor).shape == (1, *TINY_CROP)


def test_images_whose_space_cannot_be_told_are_refused_with_the_fix(derivative_run) -> None:
    result, out = derivative_run["result"], derivative_run["out"]
    assert result.returncode == 65, result.stderr[-3000:]
    errors = "\n".join(line for line in result.stderr.splitlines() if " ERROR " in line)
    derivative, refused = derivative_run["derivative"], derivative_run["refused"]
    path = {label: derivative / f"sub-{label}" / "anat" / name for label, name in refused.items()}
    assert f"Preprocessed T1w {path['02']} names no space (no space- entity" in errors
    assert f"Preprocessed T1w {path['03']} is in space T1w, the participant's own anatomy" in errors
    assert '--bids-filter-file {"t1w": {"space": "MNI152NLin2009cAsym"}}' in errors
    assert f"Preprocessed T1w {path['04']} is in space 'OASIS30ANTs'" in errors
    assert "--template FILE --template-space OASIS30ANTs" in errors
    assert f"Preprocessed T1w {path['05']} declares space MNI152NLin2009cAsym, but its grid" in errors
    assert "holds only 0.0% of the MNI152NLin2009aSym template's brain" in errors
    status = pd.read_csv(out / "participant_status.tsv", sep="\t", dtype=str, keep_default_na=False)
    failed = status[status["status"] == "failed"]
    assert sorted(failed["image"]) == sorted(refused.values()) and set(failed["stage"]) == {"preprocess"}
    assert not list(out.glob("sub-0[2-5]/**/*.nii.gz"))  # nothing written for a refused image
    # the participant with a placeable image is processed in full
    assert set(status[status["participant_id"] == "sub-01"]["status"]) == {"ok"}


def test_custom_map_is_placed_kept_and_extracted_in_image_and_roi_modes(derivative_run) -> None:
    out, space = derivative_run["out"], derivative_run["space"]
    preproc = out / "sub-01" / "maps" / f"sub-01_space-{TPL}_desc-preproc_gm.nii.gz"
    data = np.asarray(nib.load(preproc).dataobj)
    assert data.shape == TINY_CROP
    # values kept: the map's own (probabilities), shifted by whole voxels onto the grid, no rescaling
    source = np.asarray(nib.load(derivative_run["gm"]).dataobj)
    assert data.min() >= 0.0 and data.max() == pytest.approx(float(source.max()))
    from bids_app.config import PreprocessConfig
    from bids_app.preprocess.t1_linear import crop_box, load_template

    template_path = out.parent / "templates" / f"tpl-{TPL}_res-4mm_T1w.nii.gz"
    box = crop_box(load_template(PreprocessConfig(template_path=template_path)), TINY_CROP)
    covered = np.zeros(space.gm.shape, dtype=bool)
    covered[2:, :-1, 3:] = True  # the source grid starts (2, -1, 3) voxels into the template's
    np.testing.assert_allclose(data, np.where(covered, space.gm, 0.0)[box], atol=1e-6)
    meta = sidecar(preproc)
    assert meta["SourceSpace"] == "MNI152NLin2009cAsym" and meta["Resampling"] == "integer shift"
    assert meta["Description"].startswith("custom template-space map") and "SkullStripped" not in meta
    assert meta["QC"]["nmi_to_template"] > 1.06
    dl = out / "sub-01" / "deeplearning"
    assert np.load(dl / f"sub-01_space-{TPL}_desc-image_gm.npy").shape == (1, *TINY_CROP)
    roi = np.load(dl / f"sub-01_space-{TPL}_desc-roi_gm.npy")
    assert roi.shape[:2] == (1, 1) and roi.max() > 0
    assert (out / "sub-01" / "qc" / "sub-01_desc-qc_gm.json").is_file()
    from bids_app.participant.qc_summary import qc_table

    summary = qc_table(out)  # what the group level's qc_summary.tsv and --exclude-failed-qc read
    row = summary[summary["suffix"] == "gm"]
    assert list(row["qc_metric"]) == ["nmi_to_template"] and list(row["qc_pass"]) == [True]
    page = (out / "sub-01" / "sub-01_report.html").read_text(encoding="utf-8")
    assert 'id="sub-01_gm"' in page
    assert not list(out.glob("sub-01/**/*WM*"))  # the WM map did not match the filters
    assert validate(out).returncode == 0


def test_custom_map_specs_are_checked_before_anything_runs(tmp_path: Path) -> None:
    from bids_app.cli.arguments import parse_config
    from bids_app.errors import ConfigError

    bids = bids_root(tmp_path / "bids", ("01",))
    base = [str(bids), str(tmp_path / "out"), "participant"]
    cfg = parse_config([*base, "-d", str(tmp_path), "--custom-map", "gm=suffix:probseg,label:GM", "fa=suffix:FA"])
    assert cfg.preprocess.custom_maps == ("gm=suffix:probseg,label:GM", "fa=suffix:FA")
    for specs, message in (
        (["GM=suffix:probseg"], "Invalid --custom-map name 'GM'"),
        (["pet=suffix:probseg"], "Invalid --custom-map name 'pet'"),
        (["gm=suffix"], "'suffix' is not ENTITY:VALUE"),
        (["gm"], "expected NAME=ENTITY:VALUE"),
        (["gm=suffix:a", "gm=suffix:b"], "the name(s) gm are given twice"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_config([*base, "-d", str(tmp_path), "--custom-map", *specs])
    with pytest.raises(ConfigError, match="custom maps are selected in the --derivatives"):
        parse_config([*base, "--custom-map", "gm=suffix:probseg"])
    # the TOML spelling, and the resolved configuration written back reads the same
    from bids_app.config_file import dump_config

    toml = tmp_path / "config.toml"
    toml.write_text(
        f'[preprocess]\nderivatives_dirs = ["{tmp_path}"]\ncustom_maps = ["fa=desc:FA,space:MNI152NLin6Asym"]\n'
    )
    from_file = parse_config([*base, "--config", str(toml)])
    assert from_file.preprocess.custom_maps == ("fa=desc:FA,space:MNI152NLin6Asym",)
    toml.write_text(dump_config(from_file))
    assert parse_config([*base, "--config", str(toml)]).preprocess.custom_maps == from_file.preprocess.custom_maps


def test_custom_map_named_like_a_bids_suffix_exits_64_before_anything_is_written(tmp_path: Path) -> None:
    from bids_app.errors import ConfigError
    from bids_app.kinds import parse_custom_map

    bids = bids_root(tmp_path / "bids", ("01",))
    out = tmp_path / "out"
    result = run_cli(str(bids), str(out), "participant", "-d", str(tmp_path), "--custom-map", "flair=suffix:probseg")
    assert result.returncode == 64, result.stderr
    assert "Invalid --custom-map name 'flair'" in result.stderr and "e.g. flairmap=suffix:probseg" in result.stderr
    assert not out.exists()
    for name in ("t1w", "t2W", "pET", "pdw", "bold"):
        with pytest.raises(ConfigError, match=f"Invalid --custom-map name '{name}'"):
            parse_custom_map(f"{name}=desc:x")
    assert parse_custom_map("flairmap=desc:x").name == "flairmap"


def test_custom_maps_are_found_in_a_clinica_caps_by_their_file_name_entities(tmp_path: Path) -> None:
    from bids_app.config import AnalysisLevel, PreprocessConfig, RunConfig
    from bids_app.inputs.bids_query import query_custom_maps

    caps = tmp_path / "caps"
    dartel = "t1/spm/dartel/group-AD"
    names = {
        f"subjects/sub-01/ses-M000/{dartel}/sub-01_ses-M000_T1w_segm-graymatter_space-Ixi549Space_modulated-on_"
        "probability.nii.gz",
        f"subjects/sub-01/ses-M000/{dartel}/sub-01_ses-M000_T1w_segm-whitematter_space-Ixi549Space_modulated-on_"
        "probability.nii.gz",
        f"subjects/sub-02/ses-M000/{dartel}/sub-02_ses-M000_T1w_segm-graymatter_space-Ixi549Space_modulated-on_"
        "probability.nii.gz",
    }
    for name in names:
        (caps / name).parent.mkdir(parents=True, exist_ok=True)
        (caps / name).write_bytes(b"")
    preprocess = PreprocessConfig(derivatives_dirs=(caps,), custom_maps=("gm=segm:graymatter,suffix:probability",))
    cfg = RunConfig(tmp_path, tmp_path / "out", AnalysisLevel.PARTICIPANT, preprocess=preprocess)
    records = query_custom_maps(cfg, ["01"])
    assert [(r.participant_label, r.session_label, r.suffix, r.custom) for r in records] == [("01", "M000", "gm", True)]
    assert "segm-graymatter" in records[0].path.name and records[0].entities["space"] == "Ixi549Space"


def test_a_flipped_and_permuted_grid_on_the_same_lattice_is_copied_not_interpolated() -> None:
    """FSL-style storage (x stored right to left) with the axes in another order, offset by whole voxels: the
    fast path copies the source's values (no interpolation) to the target voxels at the same world positions."""
    from bids_app.preprocess.template_space import Resampling, TemplateGrid, to_template_grid

    def field(world: np.ndarray) -> np.ndarray:  # a positive, asymmetric function of the world position (mm)
        x, y, z = world[..., 0], world[..., 1], world[..., 2]
        return (np.exp(-(x**2 + y**2 + z**2) / 200.0) * (2.0 + 0.01 * x + 0.02 * y + 0.03 * z)).astype(np.float32)

    def centres(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
        return nib.affines.apply_affine(affine, np.stack(np.indices(shape), axis=-1))

    target_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    target_affine[:3, 3] = [-20.0, -24.0, -18.0]
    target_shape = (20, 24, 18)
    grid = TemplateGrid.of(nib.Nifti1Image(field(centres(target_shape, target_affine)), target_affine), TPL)
    # source voxel (i, j, k): world x = 30 - 2j (flipped), y = -22 + 2k, z = -22 + 2i
    source_affine = np.array([[0.0, -2, 0, 30], [0, 0, 2, -22], [2, 0, 0, -22], [0, 0, 0, 1]])
    source_shape = (20, 25, 22)  # x from 30 down to -18, y -22 to 20, z -22 to 16
    source = nib.Nifti1Image(field(centres(source_shape, source_affine)), source_affine)
    image, placement = to_template_grid(source, "MNI152NLin6Asym", grid, Path("flipped.nii.gz"), "Preprocessed T1w")
    assert placement.resampling is Resampling.SHIFT and placement.brain_coverage > 0.8
    world = centres(target_shape, target_affine)
    covered = (world[..., 0] >= -18) & (world[..., 1] >= -22) & (world[..., 1] <= 20)
    out = np.asarray(image.dataobj)
    np.testing.assert_array_equal(out[covered], field(world)[covered])  # the source's own float32 values
    assert not out[~covered].any()
    np.testing.assert_array_equal(image.affine, target_affine)


def test_an_image_whose_bright_mass_lies_outside_the_template_brain_is_refused() -> None:
    """A field of view that holds the template's brain but whose intensities sit elsewhere (a scanner-space image
    named as if in MNI space): refused, naming where the intensities are centred and the fix."""
    from bids_app.errors import DataError
    from bids_app.preprocess.template_space import TemplateGrid, to_template_grid

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-20.0, -24.0, -18.0]
    centres = nib.affines.apply_affine(affine, np.stack(np.indices((20, 24, 18)), axis=-1))
    blob = np.exp(-(centres**2).sum(axis=-1) / 200.0).astype(np.float32)
    grid = TemplateGrid.of(nib.Nifti1Image(blob, affine), TPL)
    wide = np.diag([2.0, 2.0, 2.0, 1.0])
    wide[:3, 3] = [-100.0, -100.0, -100.0]  # 200 mm each way: the template's brain is well inside
    head = np.zeros((100, 100, 100), dtype=np.float32)
    head[70:90, 70:90, 70:90] = 1.0  # centred at (59, 59, 59) mm
    with pytest.raises(DataError, match=r"its intensities are centred at \(59, 59, 59\) mm, outside the") as refusal:
        to_template_grid(nib.Nifti1Image(head, wide), "MNI152NLin2009cAsym", grid, Path("x.nii.gz"), "Preprocessed T1w")
    assert "--template FILE --template-space LABEL" in str(refusal.value)
    head[:] = 0.0
    head[45:55, 45:55, 45:55] = 1.0  # the same field of view, its mass where the template's brain is: accepted
    image, placement = to_template_grid(nib.Nifti1Image(head, wide), "MNI152NLin2009cAsym", grid, Path("x.nii.gz"),
                                        "Preprocessed T1w")  # fmt: skip
    assert placement.brain_coverage == 1.0 and np.asarray(image.dataobj).any()


def test_oblique_fine_source_is_smoothed_by_its_footprint_and_outputs_are_template_coded() -> None:
    """A 45-degree rotated 0.5 mm source under a 1 mm target: one target voxel spans 2 source voxels along every
    source axis (sigma 0.5, not 0.21 from the largest matrix entry); and an image placed on the template grid is
    coded MNI (4) even when its file was coded scanner (1)."""
    from scipy.spatial.transform import Rotation

    from bids_app.preprocess.t1_linear import template_space_image
    from bids_app.preprocess.template_space import TemplateGrid, anti_alias_steps, to_template_grid

    source_affine = np.eye(4)
    source_affine[:3, :3] = 0.5 * Rotation.from_euler("z", 45, degrees=True).as_matrix()
    to_source = np.linalg.solve(source_affine, np.eye(4))
    np.testing.assert_allclose(anti_alias_steps(to_source), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(anti_alias_steps(np.diag([2.0, 0.5, 1.0, 1.0])), [2.0, 0.5, 1.0])  # anisotropic

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-20.0, -24.0, -18.0]
    centres = nib.affines.apply_affine(affine, np.stack(np.indices((20, 24, 18)), axis=-1))
    blob = np.exp(-(centres**2).sum(axis=-1) / 200.0).astype(np.float32)
    grid = TemplateGrid.of(nib.Nifti1Image(blob, affine), TPL)
    scanner = nib.Nifti1Image(blob, affine)
    scanner.set_sform(affine, code=1)
    scanner.set_qform(affine, code=1)
    image, _ = to_template_grid(scanner, "MNI152NLin2009cAsym", grid, Path("caps.nii.gz"), "Preprocessed T1w")
    assert (int(image.header["sform_code"]), int(image.header["qform_code"])) == (4, 4)
    assert int(template_space_image(blob, affine, scanner).header["sform_code"]) == 2  # aligned, not scanner


def test_space_refusals_offer_a_fix_that_works_where_the_image_came_from() -> None:
    """A custom map is re-selected by its own --custom-map filters, a CAPS image by its file (a CAPS ignores
    --bids-filter-file, and --bids-filter-file has no custom_maps key); a derivative by --bids-filter-file."""
    from bids_app.config import FILTER_KINDS
    from bids_app.preprocess.template_space import space_error

    assert "custom_maps" not in FILTER_KINDS
    for space in (None, "T1w"):
        custom = str(space_error(Path("gm.nii.gz"), space, TPL, "Custom map 'gm'", "custom_maps"))
        assert "add space:<label> to that map's --custom-map filters" in custom
        assert "--bids-filter-file" not in custom and "raw image" not in custom
        caps = str(space_error(Path("t1.nii.gz"), space, TPL, "Preprocessed T1w", "t1w", caps=True))
        assert "--bids-filter-file does not apply" in caps and "process the raw image without -d" in caps
        assert '{"t1w"' not in caps
        derivative = str(space_error(Path("t1.nii.gz"), space, TPL, "Preprocessed T1w", "t1w"))
        assert '--bids-filter-file {"t1w": {"space": "MNI152NLin2009cAsym"}}' in derivative
