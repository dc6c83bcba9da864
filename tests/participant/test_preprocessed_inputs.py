"""The participant level on already preprocessed inputs (``-d``): what the fast path must keep.

The preprocessed NIfTI's checksum is computed while it is written, the report draws its strips and input row from
the arrays the job held, and a re-run re-uses everything: the outputs must stay what they were (valid BIDS,
checksums that match the files, a complete report, idempotent re-runs).
"""

from __future__ import annotations

import json
import re

import pandas as pd

from bids_app.derivatives import file_sha256
from tests.conftest import run_cli, validate
from tests.participant.test_participant import CROP, participant_args

FIGURES = re.compile(r'<figure class="([a-z-]+)"(?: data-mode="([a-z]+)")?><img src="data:image/png;base64,([^"]+)"')


def _strips(page: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for kind, mode, data in FIGURES.findall(page):
        found.setdefault(mode or kind, []).append(data)
    return found


def test_preprocessed_inputs_checksums_report_and_rerun(tiny_dataset, tmp_path) -> None:
    out = tmp_path / "out"
    args = participant_args(tiny_dataset, tiny_dataset.bids_dir, out, "-d", str(tiny_dataset.derivative_dir),
                            "--participant-label", "001")  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    sessions = tiny_dataset.sessions
    for session in sessions:
        anat = out / "sub-001" / f"ses-{session}" / "anat"
        (preproc,) = anat.glob("*_desc-preproc_T1w.nii.gz")
        sidecar = json.loads(preproc.with_name(preproc.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["SHA256"] == file_sha256(preproc)  # hashed while written, equal to the file's bytes
        for tensor in (out / "sub-001" / f"ses-{session}" / "deeplearning").glob("*.npy"):
            meta = json.loads(tensor.with_suffix(".json").read_text())
            assert meta["SourceSHA256"] == sidecar["SHA256"]
            assert meta["TensorSHA256"] == file_sha256(tensor)
    report = out / "sub-001" / "sub-001_report.html"
    page = report.read_text(encoding="utf-8")
    strips = _strips(page)
    assert len(strips["before-after"]) == len(sessions) and "input image (top)" in page  # the input row is drawn
    assert {mode: len(strips[mode]) for mode in ("image", "patch", "slice", "roi")} == dict.fromkeys(
        ("image", "patch", "slice", "roi"), len(sessions)
    )
    assert f"slice</b>: tensor ({CROP[0] - 4}, 1, {CROP[1]}, {CROP[2]}) float32" in page
    assert "network-input-missing" not in page
    result = validate(out)
    assert result.returncode == 0, result.stdout[-3000:]

    files = {p: p.read_bytes() for p in (out / "sub-001").rglob("*") if p.is_file() and p.suffix in (".gz", ".npy")}
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    status = pd.read_csv(out / "participant_status.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert set(status.loc[status["stage"] != "report", "status"]) == {"skipped"}
    assert all(p.read_bytes() == data for p, data in files.items())  # nothing rewritten
    # the re-run reads the tensors back for the report: the same strips as those drawn from the arrays
    assert _strips(report.read_text(encoding="utf-8")) == strips
