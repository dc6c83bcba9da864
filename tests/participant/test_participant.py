"""Participant level end to end on the tiny generated dataset: outputs, idempotence, faults, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tests.conftest import run_cli, validate

CROP = (40, 48, 40)
PATCH = 16


def participant_args(dataset, bids_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(bids_dir), str(out), "participant",
        "--template", str(dataset.template_path),
        "--crop-shape", *map(str, CROP),
        "--modes", "image", "patch", "slice", "roi",
        "--patch-size", str(PATCH), "--stride", str(PATCH),
        "--discarded-slices", "2",
        "--roi-mask", f"hippocampus={dataset.roi_mask_path}",
        *extra,
    ]  # fmt: skip


def status_table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "participant_status.tsv", sep="\t", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def processed(tiny_dataset, tmp_path_factory: pytest.TempPathFactory):
    """Participants 001 and 002 processed once (shared by the read-only assertions below)."""
    out = tmp_path_factory.mktemp("participant") / "out"
    result = run_cli(*participant_args(tiny_dataset, tiny_dataset.bids_dir, out, "--participant-label", "001", "002"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_outputs_have_expected_shapes_and_counts(tiny_dataset, processed: Path) -> None:
    sessions = tiny_dataset.sessions
    for label in ("001", "002"):
        for session in sessions:
            anat = processed / f"sub-{label}" / f"ses-{session}" / "anat"
            preproc = anat / f"sub-{label}_ses-{session}_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz"
            image = nib.load(preproc)
            assert image.shape == CROP
            sidecar = json.loads(preproc.with_name(preproc.name.replace(".nii.gz", ".json")).read_text())
            assert sidecar["SkullStripped"] is False
            assert sidecar["Sources"] == [
                f"bids:raw:sub-{label}/ses-{session}/anat/sub-{label}_ses-{session}_T1w.nii.gz"
            ]
            assert sidecar["QC"]["correlation_to_template"] > 0.7  # 4 mm; the slow 1 mm test demands 0.9
            assert (anat / f"sub-{label}_ses-{session}_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.mat").is_file()
            dl = processed / f"sub-{label}" / f"ses-{session}" / "deeplearning"
            stem = f"sub-{label}_ses-{session}_space-MNI152NLin2009aSym_desc"
            n_patches = int(np.prod([c // PATCH for c in CROP]))
            expected = {
                "image": (1, *CROP),
                "patch": (n_patches, 1, PATCH, PATCH, PATCH),
                "slice": (CROP[0] - 4, 1, CROP[1], CROP[2]),
            }
            for mode, shape in expected.items():
                tensor = np.load(dl / f"{stem}-{mode}_T1w.npy", mmap_mode="r", allow_pickle=False)
                assert tensor.shape == shape
                assert tensor.dtype == np.float32
            roi = np.load(dl / f"{stem}-roi_T1w.npy", allow_pickle=False)
            assert roi.shape[:2] == (1, 1)
            assert roi.max() > 0
            # one tensor + one sidecar per image per mode, nothing else
            assert len(list(dl.iterdir())) == 2 * 4
            meta = json.loads((dl / f"{stem}-patch_T1w.json").read_text())
            assert meta["Complete"] is True
            assert meta["SourceSHA256"] and meta["RawSourceSHA256"] and meta["ConfigHash"]
        assert (processed / f"sub-{label}" / f"sub-{label}_report.html").is_file()
    assert not (processed / "sub-003").exists()


def test_report_shows_each_image_and_what_the_network_sees(tiny_dataset, processed: Path) -> None:
    """Registered raw images: a before/after (input row + registered row) and a mosaic per session, and a strip
    per extracted mode read back from the tensors, all embedded in the one page."""
    import re

    page = (processed / "sub-001" / "sub-001_report.html").read_text(encoding="utf-8")
    n_sessions = len(tiny_dataset.sessions)
    figures = re.findall(r'<figure class="([a-z-]+)"(?: data-mode="([a-z]+)")?><img src="data:image/png;base64,', page)
    assert [kind for kind, _ in figures].count("before-after") == n_sessions
    assert [kind for kind, _ in figures].count("mosaic") == n_sessions
    modes = [mode for kind, mode in figures if kind == "network-input"]
    assert sorted(modes) == sorted(["image", "patch", "roi", "slice"] * n_sessions)
    assert "input image (top)" in page  # the raw input was found and drawn
    assert f"slice</b>: tensor ({CROP[0] - 4}, 1, {CROP[1]}, {CROP[2]}) float32, zscore normalisation" in page
    assert not (processed / "sub-001" / "figures").exists()


def test_status_table_logs_and_description(processed: Path) -> None:
    table = status_table(processed)
    assert set(table["participant_id"]) == {"sub-001", "sub-002"}
    assert set(table["status"]) == {"ok"}
    assert {"preprocess", "extract-image", "extract-patch", "extract-slice", "extract-roi", "report"} <= set(
        table["stage"]
    )
    runs = list((processed / "logs").iterdir())
    assert len(runs) == 1
    for name in ("bids_app.log", "config.toml", "command.txt", "environment.json", "exit.json"):
        assert (runs[0] / name).is_file(), name
    env = json.loads((runs[0] / "environment.json").read_text())
    assert env["seed"] == 0 and env["key_packages"]["torch"]
    description = json.loads((processed / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "bids_app"


def test_output_passes_bids_validator(processed: Path) -> None:
    result = validate(processed)
    assert result.returncode == 0, result.stdout[-3000:]


def test_output_indexes_in_pybids(processed: Path) -> None:
    from bids import BIDSLayout

    layout = BIDSLayout(processed, validate=False)
    files = layout.get(suffix="T1w", desc="preproc", extension=".nii.gz", return_type="filename")
    assert len(files) == 4


def test_rerun_is_idempotent_and_overwrite_redoes(tiny_dataset, processed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(processed, out)
    tensor = next(out.glob("sub-001/ses-*/deeplearning/*desc-image_T1w.npy"))
    before = tensor.stat().st_mtime_ns
    args = participant_args(tiny_dataset, tiny_dataset.bids_dir, out, "--participant-label", "001")
    assert run_cli(*args).returncode == 0
    rows = status_table(out)
    rows = rows[rows["participant_id"] == "sub-001"]
    assert set(rows[rows["stage"] != "report"]["status"]) == {"skipped"}
    assert tensor.stat().st_mtime_ns == before
    assert run_cli(*args, "--overwrite").returncode == 0
    assert tensor.stat().st_mtime_ns != before


def test_changed_parameters_redo_only_affected_mode(tiny_dataset, processed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(processed, out)
    args = participant_args(tiny_dataset, tiny_dataset.bids_dir, out, "--participant-label", "001")
    args[args.index("--discarded-slices") + 1] = "3"
    assert run_cli(*args).returncode == 0
    rows = status_table(out).query("participant_id == 'sub-001'")
    by_stage = rows.groupby("stage")["status"].agg(set)
    assert by_stage["extract-slice"] == {"ok"}
    assert by_stage["extract-patch"] == {"skipped"}
    assert by_stage["preprocess"] == {"skipped"}
    tensor = next(out.glob("sub-001/ses-*/deeplearning/*desc-slice_T1w.npy"))
    assert np.load(tensor, mmap_mode="r").shape[0] == CROP[0] - 6


def test_broken_participant_is_reported_and_others_continue(tiny_dataset, tiny_copy: Path, tmp_path: Path) -> None:
    broken = next((tiny_copy / "sub-002").glob("ses-*/anat/*_T1w.nii.gz"))
    broken.write_bytes(broken.read_bytes()[:500])  # truncated gzip
    out = tmp_path / "out"
    args = participant_args(tiny_dataset, tiny_copy, out, "--participant-label", "001", "002",
                            "--skip-bids-validation")  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 65
    table = status_table(out)
    failed = table[table["status"] == "failed"]
    assert set(failed["participant_id"]) == {"sub-002"}
    assert broken.name in " ".join(failed["image"])
    assert set(table[table["participant_id"] == "sub-001"]["status"]) == {"ok"}
    # the broken image left no preprocessed file behind; the other session of sub-002 completed
    assert not list(out.glob(f"sub-002/**/{broken.name.replace('_T1w.nii.gz', '')}*desc-preproc*"))
    assert validate(out).returncode == 0


def test_preprocessed_derivative_input(tiny_dataset, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = participant_args(tiny_dataset, tiny_dataset.bids_dir, out, "--participant-label", "003",
                            "-d", str(tiny_dataset.derivative_dir))  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    images = sorted(out.glob("sub-003/ses-*/anat/*desc-preproc_T1w.nii.gz"))
    assert len(images) == len(tiny_dataset.sessions)
    assert nib.load(images[0]).shape == CROP
    assert not list(out.glob("sub-003/**/*_xfm.mat"))  # no registration ran
    assert validate(out).returncode == 0


def test_two_concurrent_runs_share_one_output(tiny_dataset, tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs = [
        subprocess.Popen([sys.executable, "-m", "bids_app",
                          *participant_args(tiny_dataset, tiny_dataset.bids_dir, out, "--participant-label", label)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for label in ("003", "004")
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    table = status_table(out)
    assert set(table["participant_id"]) == {"sub-003", "sub-004"}
    assert json.loads((out / "dataset_description.json").read_text())["Name"]
    assert validate(out).returncode == 0


def test_killed_run_leaves_no_complete_looking_file_and_rerun_completes(tiny_dataset, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = participant_args(tiny_dataset, tiny_dataset.bids_dir, out, "--participant-label", "004")
    proc = subprocess.Popen([sys.executable, "-m", "bids_app", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob("sub-004/*/anat/*desc-preproc_T1w.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # every tensor present has a complete sidecar that matches it, and no temporary file is mistaken for output
    for tensor in out.glob("sub-004/**/*.npy"):
        sidecar = tensor.with_suffix(".json")
        if sidecar.exists():
            meta = json.loads(sidecar.read_text())
            assert list(np.load(tensor, mmap_mode="r").shape) == meta["Shape"]
    assert run_cli(*args).returncode == 0
    assert not list(out.rglob(".*.tmp*"))
    for tensor in out.glob("sub-004/**/*.npy"):
        assert json.loads(tensor.with_suffix(".json").read_text())["Complete"] is True
    assert len(list(out.glob("sub-004/**/*.npy"))) == 4 * len(tiny_dataset.sessions)


def test_clinica_caps_input(tmp_path: Path) -> None:
    from bids_app.synthetic.dataset import generate_dataset

    dataset = generate_dataset(tmp_path / "bids", n_subjects=2, n_sessions=1, preset="tiny", seed=4,
                               preprocessed="caps")  # fmt: skip
    out = tmp_path / "out"
    args = participant_args(dataset, dataset.bids_dir, out, "-d", str(dataset.caps_dir))
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    images = sorted(out.glob("sub-*/ses-*/anat/*desc-preproc_T1w.nii.gz"))
    assert len(images) == 2
    assert all(nib.load(p).shape == CROP for p in images)
    sidecar = json.loads(images[0].with_name(images[0].name.replace(".nii.gz", ".json")).read_text())
    assert "derivatives/caps/subjects/" in sidecar["Sources"][0]
    assert validate(out).returncode == 0


def test_pet_linear_with_suvr(tmp_path: Path) -> None:
    from bids_app.synthetic.dataset import generate_dataset

    dataset = generate_dataset(tmp_path / "bids", n_subjects=2, n_sessions=1, preset="tiny", seed=5, with_pet=True)
    out = tmp_path / "out"
    args = participant_args(dataset, dataset.bids_dir, out, "--participant-label", "001", "--pet-tracer", "FDG")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    pet = next(out.glob("sub-001/ses-*/pet/*_trc-FDG_space-MNI152NLin2009aSym_desc-preproc_pet.nii.gz"))
    data = np.asarray(nib.load(pet).dataobj)
    assert data.shape == CROP
    sidecar = json.loads(pet.with_name(pet.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["Units"] == "SUVR"
    tensors = sorted(out.glob("sub-001/ses-*/deeplearning/*_trc-FDG_*desc-image_pet.npy"))
    assert len(tensors) == 1
    assert validate(out).returncode == 0


GOLDEN_TREE = Path(__file__).parents[1] / "golden" / "participant_tree.txt"


def output_tree(out: Path) -> list[str]:
    """Every file of an output, relative, with the run id masked (it holds a time stamp and a random part)."""
    names = []
    for path in sorted(out.rglob("*")):
        if path.is_file():
            parts = path.relative_to(out).parts
            if parts[0] == "logs":
                parts = (parts[0], "<run-id>", *parts[2:])
            names.append("/".join(parts))
    return sorted(set(names))


def test_output_tree_matches_the_golden_list(processed: Path) -> None:
    """The layout is a contract: change tests/golden/participant_tree.txt on purpose, in review."""
    tree = output_tree(processed)
    if os.environ.get("BIDS_APP_UPDATE_GOLDEN"):
        GOLDEN_TREE.write_text("\n".join(tree) + "\n")
    assert tree == GOLDEN_TREE.read_text().splitlines()
