"""Four defects of input reading at the participant level: each refused or logged, and no earlier output lost.

1. a bit flip inside a ``.nii.gz`` that nibabel reads without error (it does not check the gzip CRC);
2. a header voxel size (``pixdim``) of 0, negative or NaN, read as 1 mm; gzip bombs: a header claiming an
   enormous volume (it ended in a MemoryError), a stream decompressing to GiBs past the image (ignored);
3. input discovery that depended on the folders above BIDS_DIR (pybids reads entities from the absolute path);
4. silent skips: a failed QC, a session without T1w.

The runs go through ``bids_app.cli.main.main`` in-process (see ``tests/test_bad_inputs.py``) on a tiny generated
dataset read from its template-space derivative (``-d``: no registration). Each bad run starts from a copy of
an output that already holds participants 001 and 002, and checks that every earlier file is byte-identical
afterwards (records of the run excepted), and that BIDS_DIR was not written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import math
import os
import re
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_app.config import AnalysisLevel, PreprocessConfig, RunConfig
from bids_app.derivatives import file_sha256
from bids_app.inputs.bids_query import ImageRecord, query_preprocessed_images, query_raw_images
from tests.conftest import TINY_CROP, make_dataset
from tests.test_bad_inputs import altered, errors_of, participant_args, run, tree_hashes

SPACE = "MNI152NLin2009aSym"


def bids_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def assert_nothing_lost(before: dict[str, str], after: dict[str, str], new_under: str | None = None) -> None:
    """Every earlier file is still there, byte-identical; new files only under ``new_under`` (a participant)."""
    assert {p: after.get(p) for p in before} == before
    new = sorted(set(after) - set(before))
    assert all(new_under and p.startswith(new_under) for p in new), new


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " WARNING " in line]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """3 participants x 2 sessions (raw T1w + FDG PET, template-space T1w derivative); 001 and 002 processed."""
    from bids_app.cli.main import main

    root = tmp_path_factory.mktemp("input_defects")
    dataset = make_dataset(root, 3, 2, seed=5, with_pet=True)
    out = root / "out"
    assert main(participant_args(dataset, out, "--participant-label", "001", "002")) == 0
    return {"dataset": dataset, "out": out}


@pytest.fixture
def earlier(world: dict[str, Any], tmp_path: Path) -> Path:
    """A private copy of the world's output (participants 001 and 002), for a bad run to write into."""
    out = tmp_path / "out"
    shutil.copytree(world["out"], out)
    return out


def derivative_t1w(dataset: Any, participant: str, session: str) -> Path:
    anat = dataset.derivative_dir / f"sub-{participant}" / f"ses-{session}" / "anat"
    return anat / f"sub-{participant}_ses-{session}_space-{SPACE}_desc-preproc_T1w.nii.gz"


def failed_rows(out: Path) -> pd.DataFrame:
    status = pd.read_csv(out / "participant_status.tsv", sep="\t", dtype=str, keep_default_na=False)
    return status[status["status"] == "failed"]


# -- 1. a bit flip inside a .nii.gz -----------------------------------------------------------------------


def flip_one_bit_keeping_the_stream_decodable(path: Path) -> None:
    """Flip one bit of a byte from the middle of ``path`` on such that the deflate stream still decodes to the
    same number of bytes: only the gzip CRC-32 tells (nibabel stops reading before it and sees nothing)."""
    data = path.read_bytes()
    for offset in range(len(data) // 2, len(data) - 8):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[offset] ^= 1 << bit
            try:
                zlib.decompress(bytes(damaged), wbits=31)
            except zlib.error as exc:
                if "incorrect data check" in str(exc):  # decoded to the end; only the CRC differs
                    path.write_bytes(bytes(damaged))
                    return
    raise AssertionError(f"no bit of {path} gives a decodable stream with a wrong CRC")


def test_bit_flip_in_nii_gz_fails_its_image_only(world: dict[str, Any], earlier: Path, capsys) -> None:
    dataset = world["dataset"]
    image = derivative_t1w(dataset, "002", "M000")
    before = tree_hashes(earlier)
    with altered(image):
        flip_one_bit_keeping_the_stream_decodable(image)
        bids_before = bids_hashes(dataset.bids_dir)
        code, err = run(participant_args(dataset, earlier, "--participant-label", "001", "002", "003"), capsys)
        assert bids_hashes(dataset.bids_dir) == bids_before
    assert code == 65
    assert re.search(
        rf"Cannot read preprocessed image \S*{image.name}: the file is corrupt \(its gzip stream fails zlib's "
        r"checks, gzip CRC or data: .*incorrect data check\)\. Re-export or re-download the image",
        errors_of(err),
    ), err[-3000:]
    failed = failed_rows(earlier)
    assert list(failed["participant_id"]) == ["sub-002"] and list(failed["image"]) == [image.name]
    # the other participants of the run are processed: 001 and 002's other session re-used, 003 new
    assert any((earlier / "sub-003" / "ses-M000" / "deeplearning").rglob("*.npy"))
    assert_nothing_lost(before, tree_hashes(earlier), new_under="sub-003/")


# -- 2. voxel sizes of 0, negative or NaN; gzip bombs -----------------------------------------------------

PIXDIM1_OFFSET = nib.Nifti1Header.template_dtype.fields["pixdim"][1] + 4  # pixdim[1], float32


def edit_nifti_bytes(path: Path, edit: Any) -> None:
    """Rewrite the ``.nii.gz`` ``path`` with ``edit(bytearray of the decompressed file)`` applied in place."""
    data = bytearray(gzip.decompress(path.read_bytes()))
    edit(data)
    path.write_bytes(gzip.compress(bytes(data)))


@pytest.mark.parametrize("value", [0.0, -4.0, math.nan])
def test_header_voxel_size_not_positive_is_refused(value: float, world: dict[str, Any], earlier: Path, capsys) -> None:
    dataset = world["dataset"]
    image = derivative_t1w(dataset, "002", "M000")
    before = tree_hashes(earlier)
    with altered(image):
        edit_nifti_bytes(image, lambda data: data.__setitem__(slice(PIXDIM1_OFFSET, PIXDIM1_OFFSET + 4),
                                                              struct.pack("<f", value)))  # fmt: skip
        bids_before = bids_hashes(dataset.bids_dir)
        code, err = run(participant_args(dataset, earlier, "--participant-label", "002"), capsys)
        assert bids_hashes(dataset.bids_dir) == bids_before
    assert code == 65
    assert re.search(
        rf"preprocessed image \S*{image.name} has an invalid voxel size in its header \(pixdim\[1\] = {value}; "
        rf"pixdim\[1\.\.3\] = \({value}, 4\.0, 4\.0\)\): a voxel size must be a positive, finite number of mm\. "
        r"Check the conversion from DICOM .* or set the voxel size",
        errors_of(err),
    ), err[-3000:]
    assert list(failed_rows(earlier)["image"]) == [image.name]
    assert_nothing_lost(before, tree_hashes(earlier))


def write_header_bomb(path: Path) -> None:
    """The image's own header claiming 2000 x 2000 x 2000 float32 (29.8 GiB), over its few voxels."""
    data = gzip.decompress(path.read_bytes())
    header = nib.Nifti1Header(data[:348], check=False)
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.float32)
    path.write_bytes(gzip.compress(header.binaryblock + data[348:]))


def write_stream_bomb(path: Path, n_gib: int) -> None:
    """The image, then gzip members of 64 MiB of zeros (64 KiB each on disk): an ``n_gib`` GiB longer stream."""
    zeros = gzip.compress(bytes(64 * 1024**2), compresslevel=9)
    path.write_bytes(path.read_bytes() + zeros * 16 * n_gib)


LONGER_THAN_HEADER = (
    r"while its header implies \d+\.\d MiB: the file holds more than the image \(a gzip bomb or a corrupt file\), so "
    r"it is not read\. Re-export or re-download"
)


@pytest.mark.parametrize(
    ("write", "pattern"),
    [
        pytest.param(write_header_bomb,
                     r"claims shape \(2000, 2000, 2000\) of float32 \(29\.8 GiB of voxel data at byte 352\): above "
                     r"the limit of 1024 voxels per axis and 2\.0 GiB for one image, so it is not read\. Its header is "
                     r"wrong or the file is not one brain image \(a gzip bomb\?\)", id="header-30GiB"),
        # 1.2 MiB on disk: decompression stops 1 MiB past the header's size
        pytest.param(lambda path: write_stream_bomb(path, 1), rf"decompresses to more than \d+\.\d MiB, "
                     rf"{LONGER_THAN_HEADER}", id="stream-1GiB"),
        # 4.2 MiB on disk, more than any gzip of the header's size: refused before decompressing
        pytest.param(lambda path: write_stream_bomb(path, 4), rf"is 4\.\d MiB, {LONGER_THAN_HEADER}",
                     id="stream-4GiB"),
    ],
)  # fmt: skip
def test_gzip_bomb_is_refused_before_allocating(
    write: Any, pattern: str, world: dict[str, Any], earlier: Path, capsys
) -> None:
    dataset = world["dataset"]
    image = derivative_t1w(dataset, "002", "M000")
    before = tree_hashes(earlier)
    with altered(image):
        write(image)
        assert image.stat().st_size < 8 * 1024**2
        code, err = run(participant_args(dataset, earlier, "--participant-label", "002"), capsys)
    assert code == 65
    assert re.search(rf"preprocessed image \S*{image.name} {pattern}", errors_of(err)), err[-3000:]
    assert "MemoryError" not in err and "Traceback" not in err
    assert list(failed_rows(earlier)["image"]) == [image.name]
    assert_nothing_lost(before, tree_hashes(earlier))


def test_stream_bomb_limit_is_the_header_size_plus_a_margin(tmp_path: Path) -> None:
    """Trailing bytes up to MAX_TRAILING_BYTES are tolerated (nibabel ignores them), one more is refused."""
    from bids_app.errors import DataError
    from bids_app.preprocess.nifti_checks import MAX_TRAILING_BYTES, load_checked_nifti

    image = nib.Nifti1Image(np.arange(8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10), np.diag([2.0, 2, 2, 1]))
    plain = tmp_path / "plain.nii"
    nib.save(image, plain)
    tolerated, refused = tmp_path / "tolerated.nii.gz", tmp_path / "refused.nii.gz"
    tolerated.write_bytes(gzip.compress(plain.read_bytes() + bytes(MAX_TRAILING_BYTES)))
    refused.write_bytes(gzip.compress(plain.read_bytes() + bytes(MAX_TRAILING_BYTES + 1)))
    assert np.array_equal(load_checked_nifti(tolerated).get_fdata(), image.get_fdata())
    with pytest.raises(DataError, match=r"refused\.nii\.gz decompresses to more than"):
        load_checked_nifti(refused)


# -- 3. folders above BIDS_DIR ----------------------------------------------------------------------------


def record_fields(record: ImageRecord, root: Path) -> tuple[Any, ...]:
    fields = dataclasses.asdict(record)
    fields["path"] = record.path.relative_to(root).as_posix()
    return tuple(sorted((key, str(value)) for key, value in fields.items()))


def query_all(bids_dir: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The records of the raw T1w and PET queries and of ``-d`` with ``--pet-tracer FDG`` (T1w and PET)."""
    raw = RunConfig(bids_dir, bids_dir.parent / "out", AnalysisLevel.PARTICIPANT)
    preprocess = PreprocessConfig(derivatives_dirs=(bids_dir / "derivatives" / "preproc",), pet_tracers=("FDG",))
    derived = dataclasses.replace(raw, preprocess=preprocess)
    participants = ["001", "002"]
    found = {
        "raw t1w": query_raw_images(raw, participants, "t1w"),
        "raw pet": query_raw_images(raw, participants, "pet"),
        "-d t1w": query_preprocessed_images(derived, participants, "t1w"),
        "-d pet": query_preprocessed_images(derived, participants, "pet"),
    }
    return {kind: [record_fields(r, bids_dir) for r in records] for kind, records in found.items()}


def cli_run(bids_dir: Path, out: Path) -> int:
    from bids_app.cli.main import main

    return main([str(bids_dir), str(out), "participant", "-d", str(bids_dir / "derivatives" / "preproc"),
                 "--pet-tracer", "FDG", "--template", str(next((bids_dir / "code/template").glob("tpl-*_T1w.nii.gz"))),
                 "--crop-shape", *TINY_CROP, "--modes", "image", "--skip-bids-validation"])  # fmt: skip


def outputs(out: Path) -> dict[str, str]:
    """Output files (records of the run excepted); tensors by hash, the rest by name (sidecars hold paths)."""
    return {p: h if p.endswith(".npy") else "" for p, h in tree_hashes(out).items()}


@pytest.fixture(scope="module")
def neutral(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A dataset with raw T1w + PET and a template-space derivative with T1w + PET, under a neutral parent."""
    from bids_app.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("parents")
    dataset = generate_dataset(root / "neutral" / "bids", n_subjects=2, n_sessions=1, preset="tiny", seed=3,
                               with_pet=True, preprocessed="derivative")  # fmt: skip
    for t1w in sorted(dataset.derivative_dir.rglob(f"*_space-{SPACE}_desc-preproc_T1w.nii.gz")):
        pet_dir = t1w.parent.parent / "pet"
        pet_dir.mkdir()
        name = t1w.name.replace(f"_space-{SPACE}", f"_trc-FDG_space-{SPACE}").replace("_T1w.", "_pet.")
        shutil.copyfile(t1w, pet_dir / name)  # a template-space "PET": a positive image on the template grid
    records = query_all(dataset.bids_dir)
    assert all(len(records[kind]) == 2 for kind in records), records
    assert cli_run(dataset.bids_dir, root / "neutral" / "out") == 0
    return {"bids_dir": dataset.bids_dir, "records": records, "outputs": outputs(root / "neutral" / "out")}


@pytest.mark.parametrize("parent", ["pet", "anat", "sub-01", "ses-x", "derivatives"])
def test_folders_above_bids_dir_do_not_matter(parent: str, neutral: dict[str, Any], tmp_path: Path) -> None:
    bids_dir = tmp_path / parent / "bids"
    shutil.copytree(neutral["bids_dir"], bids_dir)
    assert query_all(bids_dir) == neutral["records"]
    bids_before = bids_hashes(bids_dir)
    assert cli_run(bids_dir, tmp_path / parent / "out") == 0
    assert outputs(tmp_path / parent / "out") == neutral["outputs"]
    assert bids_hashes(bids_dir) == bids_before


# -- 4. silent skips --------------------------------------------------------------------------------------


def test_failed_qc_is_logged(world: dict[str, Any], earlier: Path, capsys) -> None:
    dataset = world["dataset"]
    image = derivative_t1w(dataset, "003", "M000")
    before = tree_hashes(earlier)
    with altered(image):
        good = nib.load(image)
        shifted = np.roll(np.asarray(good.dataobj), (4, 4), axis=(0, 1))  # 16 mm off: a failed registration
        nib.save(nib.Nifti1Image(shifted, good.affine, good.header), image)
        args = participant_args(dataset, earlier, "--participant-label", "003")
        runs = [run(args, capsys), run(args, capsys)]  # processed, then re-used: each run's log says it
    for code, err in runs:
        assert code == 0
        failed = [line for line in warnings_of(err) if "QC failed" in line]
        assert len(failed) == 1, err[-3000:]
        assert re.search(
            rf"WARNING bids_app\.participant\.job: sub-003 ses-M000 {image.name}: QC failed: "
            r"smoothed_correlation_to_template = 0\.\d+ \(rule for T1w: smoothed_correlation_to_template >= 0\.7\)\. "
            r"The image is processed; check its registration in \S+sub-003_report\.html",
            failed[0],
        ), failed
    assert_nothing_lost(before, tree_hashes(earlier), new_under="sub-003/")


def test_session_without_t1w_is_logged_with_derivatives(world: dict[str, Any], earlier: Path, capsys) -> None:
    dataset = world["dataset"]
    session = Path("sub-002") / "ses-M012"
    t1w = sorted((dataset.bids_dir / session / "anat").glob("*_T1w.*"))
    preprocessed = sorted((dataset.derivative_dir / session / "anat").glob("*_T1w.*"))
    before = tree_hashes(earlier)
    with altered(*t1w, *preprocessed):
        for path in [*t1w, *preprocessed]:
            path.unlink()
        code, err = run(participant_args(dataset, earlier, "--participant-label", "002"), capsys)
    assert code == 0
    assert re.search(
        r"WARNING bids_app\.inputs\.bids_query: No T1w for sub-002 ses-M012: skipped \(no preprocessed T1w in "
        rf"\S+derivatives/preproc; \S+{session} holds anat/, pet/\)\. Add the T1w or exclude the session",
        err,
    ), err[-3000:]
    assert sum("No T1w for" in line for line in warnings_of(err)) == 1
    assert_nothing_lost(before, tree_hashes(earlier))  # the session's earlier outputs are kept


@contextlib.contextmanager
def logged(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records of logger ``name`` (bids_app's tree does not propagate to pytest's caplog once configured)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_session_without_t1w_is_logged_for_raw_input(world: dict[str, Any], tmp_path: Path) -> None:
    bids_dir = tmp_path / "bids"
    shutil.copytree(world["dataset"].bids_dir, bids_dir, ignore=shutil.ignore_patterns("derivatives"))
    shutil.rmtree(bids_dir / "sub-002" / "ses-M012" / "anat")  # only PET left
    for child in (bids_dir / "sub-003" / "ses-M012").iterdir():  # nothing left
        shutil.rmtree(child)
    cfg = RunConfig(bids_dir, tmp_path / "out", AnalysisLevel.PARTICIPANT)
    with logged("bids_app.inputs.bids_query") as records:
        found = query_raw_images(cfg, ["001", "002", "003"], "t1w")
    assert [(r.participant_label, r.session_label) for r in found] == [
        ("001", "M000"), ("001", "M012"), ("002", "M000"), ("003", "M000")
    ]  # fmt: skip
    messages = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(messages) == 2, messages
    assert messages[0].startswith("No T1w for sub-002 ses-M012: skipped (no raw T1w with the active filters {}; ")
    assert messages[0].endswith(f"{bids_dir}/sub-002/ses-M012 holds pet/). Add the T1w or exclude the session with "
                                "--session-label or --bids-filter-file.")  # fmt: skip
    assert messages[1].startswith("No T1w for sub-003 ses-M012: skipped (")
    assert "sub-003/ses-M012 holds no image folder)" in messages[1]


def test_a_crashing_validator_is_a_tool_failure_not_a_finding(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A validator that dies without a report says nothing about the dataset: exit 1, not 16 (failed validation)."""
    fake = tmp_path / "bin" / "bids-validator-deno"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho \"thread 'main' panicked at deno/runtime\" >&2\nexit 101\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    args = [a for a in participant_args(world["dataset"], out, "--participant-label", "001")
            if a != "--skip-bids-validation"]  # fmt: skip
    code, err = run(args, capsys)
    assert code == 1
    assert "bids-validator-deno did not run to the end on" in errors_of(err)
    assert "(exit 101: thread 'main' panicked at deno/runtime); this is not a verdict on the dataset" in err
    assert "failed BIDS validation" not in err
