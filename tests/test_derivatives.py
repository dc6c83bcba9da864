"""Atomic writes and the derivative's shared files: nothing half-written, identical bytes from any writer."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from bids_app.derivatives import (
    atomic_path,
    atomic_write_text,
    bids_uri,
    init_derivative,
    remove_stale_temporaries,
    sidecar_path,
)
from bids_app.errors import IOFailure, OutputError


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_disk_full_is_an_io_failure_with_exit_74(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.json"
    target.write_text("old")

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(IOFailure) as info:
        atomic_write_text(target, "new")
    assert info.value.exit_code == 74
    assert str(target) in str(info.value)
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_unwritable_folder_is_an_output_error_with_exit_73(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError) as info:
        atomic_write_text(blocker / "sub" / "x.json", "data")
    assert info.value.exit_code == 73


def test_shared_files_are_identical_for_every_writer(tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    a, b = tmp_path / "a", tmp_path / "b"
    init_derivative(a, bids, "9.9.9")
    init_derivative(b, bids, "9.9.9")
    for name in ("dataset_description.json", "README.md", ".bidsignore"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    description = json.loads((a / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0] == {"Name": "bids_app", "Version": "9.9.9", "CodeURL": description[
        "GeneratedBy"][0]["CodeURL"]}  # fmt: skip
    assert all(not line.endswith("/") for line in (a / ".bidsignore").read_text().splitlines())


def test_container_tag_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDS_APP_CONTAINER", "docker:bids_app:1.2.3")
    init_derivative(tmp_path / "out", tmp_path, "1.2.3")
    generated = json.loads((tmp_path / "out" / "dataset_description.json").read_text())["GeneratedBy"][0]
    assert generated["Container"] == {"Type": "docker", "Tag": "bids_app:1.2.3"}


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    stale = tmp_path / "d" / ".x.npy.abc.tmp.npy"
    stale.write_bytes(b"")
    keep = tmp_path / "d" / "x.npy"
    keep.write_bytes(b"")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert keep.exists() and not stale.exists()


def test_paths_and_uris(tmp_path: Path) -> None:
    assert sidecar_path(Path("a/b_T1w.nii.gz")) == Path("a/b_T1w.json")
    assert sidecar_path(Path("a/b.npy")) == Path("a/b.json")
    raw = tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    assert bids_uri(tmp_path, raw) == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"
    assert bids_uri(tmp_path / "other", raw) is None


def test_written_files_follow_the_umask_not_mkstemp(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_nifti_checksum_is_computed_while_writing_and_equals_the_files(tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np

    from bids_app.derivatives import atomic_write_nifti, file_sha256

    data = np.random.default_rng(0).normal(size=(9, 10, 11)).astype(np.float32)
    data[:3] = 0  # background, as in a cropped brain
    image = nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0]))
    path = tmp_path / "sub-01" / "anat" / "sub-01_space-x_desc-preproc_T1w.nii.gz"
    sha = atomic_write_nifti(path, image)
    assert sha == file_sha256(path)
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip, as the name says
    loaded = nib.load(path)
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), data)
    np.testing.assert_array_equal(loaded.affine, image.affine)
    assert atomic_write_nifti(tmp_path / "again.nii.gz", image) == sha  # no time stamp: same image, same bytes
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left


@pytest.mark.parametrize("order", ["C", "F", "int16"])
def test_nifti_written_without_copying_holds_what_nibabel_would_write(tmp_path: Path, order: str) -> None:
    """The fast path (float voxels handed over as a view) and the fallback both store nibabel's own bytes."""
    import gzip

    import nibabel as nib
    import numpy as np

    from bids_app.derivatives import atomic_write_nifti

    data = np.random.default_rng(1).normal(size=(7, 8, 9)).astype(np.float32)
    data = np.asfortranarray(data) if order == "F" else data
    data = (data * 100).astype(np.int16) if order == "int16" else data
    image = nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0]))
    image.set_sform(image.affine, code=4)
    path = tmp_path / "x.nii.gz"
    atomic_write_nifti(path, image)
    assert gzip.decompress(path.read_bytes()) == image.to_bytes()
