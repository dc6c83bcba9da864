"""Faults injected into real runs: kill -9 at chosen writes, many concurrent jobs, a full disk, out of memory.

Kills and the full disk are injected into ``python -m bids_app`` subprocesses through a ``sitecustomize``
module put on their PYTHONPATH (``FAULT_HOOK`` below). It wraps ``os.replace`` (the rename of every atomic
write, see ``derivatives.atomic_path``) and, on the n-th rename onto a file whose name matches a pattern,
sends the process SIGKILL just before or just after that rename, or raises ENOSPC for it and every later
rename (a disk that stays full). A kill at a rename is the worst moment for a writer: every window between
"data renamed" and "sidecar renamed" is hit on purpose instead of by luck of timing. Out-of-memory is
injected in-process (``cli.main``) by making the convolutions fail on batches larger than a limit.

See docs/reliability.md for what each test proves.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bids_app.cli.main import main
from bids_app.derivatives import BIDSIGNORE_ENTRIES, SHARED_TEMPORARY_AGE_S, file_sha256, sidecar_path
from bids_app.extraction.storage import load_tensor
from tests.conftest import TINY_CROP, make_cohort, make_dataset, validate

KILLED = -9  # Popen's returncode for a process ended by SIGKILL

FAULT_HOOK = """
import errno, fnmatch, os, signal

_SPEC = os.environ.get("BIDS_APP_TEST_FAULT", "")
if _SPEC:
    _KIND, _PATTERN, _NTH = _SPEC.split(":")
    _real_replace = os.replace
    _seen = [0]

    def _faulty_replace(src, dst, *args, **kwargs):
        if _KIND == "enospc" and _seen[0] >= int(_NTH):  # the disk stays full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))
        if not fnmatch.fnmatch(os.path.basename(os.fspath(dst)), _PATTERN):
            return _real_replace(src, dst, *args, **kwargs)
        _seen[0] += 1
        if _seen[0] < int(_NTH):
            return _real_replace(src, dst, *args, **kwargs)
        if _KIND == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))
        if _KIND == "kill-before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = _real_replace(src, dst, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    os.replace = _faulty_replace
"""


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fault_hook")
    (folder / "sitecustomize.py").write_text(FAULT_HOOK)
    return folder


def run_faulty(hook: Path, args: Iterable[str], fault: str = "") -> subprocess.CompletedProcess[str]:
    """``python -m bids_app *args`` with the fault ``kind:pattern:n`` armed ("" arms nothing)."""
    env = {**os.environ, "BIDS_APP_TEST_FAULT": fault}
    env["PYTHONPATH"] = os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "bids_app", *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )


def tree_hashes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path → sha256 of every file under ``root`` whose path does not start with a ``skip`` entry."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and not relative.startswith(skip):
            found[relative] = file_sha256(path)
    return found


def assert_nothing_looks_complete_but_is_not(out: Path) -> None:
    """Every output that claims completeness is whole and matches what vouches for it.

    - a tensor with a sidecar: the sidecar says ``Complete`` and the tensor loads with the recorded shape;
    - a preprocessed image with a sidecar: the sidecar's ``SHA256`` is the image's;
    - every JSON and TSV file parses (an atomic rename never exposes a half-written file);
    - every model file is a loadable safetensors file;
    - temporary files are hidden (``.<name>.*.tmp*``), so no reader mistakes them for outputs.
    """
    from safetensors.torch import load_file

    for path in out.rglob("*"):
        if not path.is_file() or "tensorboard" in path.parts or path.name.startswith("."):
            continue
        assert ".tmp" not in path.name, path
        if path.suffix == ".npy" and sidecar_path(path).exists():
            sidecar = json.loads(sidecar_path(path).read_text())
            assert sidecar["Complete"] is True, path
            assert list(load_tensor(path).shape) == sidecar["Shape"], path
        elif path.name.endswith("desc-preproc_T1w.nii.gz") and sidecar_path(path).exists():
            assert json.loads(sidecar_path(path).read_text())["SHA256"] == file_sha256(path), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".tsv":
            pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        elif path.suffix == ".safetensors":
            assert load_file(str(path)), path


# -- participant level -------------------------------------------------------------------------------------


def participant_args(dataset: Any, out: Path, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "participant", "-d", str(dataset.derivative_dir),
            "--template", str(dataset.template_path), "--crop-shape", *TINY_CROP, "--modes", "image", "patch",
            "--patch-size", "16", "--stride", "16", "--skip-bids-validation", *extra]  # fmt: skip


# Files that legitimately differ between two complete runs: run logs, timings and the HTML report's figures.
VOLATILE = ("logs/", "status/", "participant_status.tsv", "sub-001/figures/", "sub-001/sub-001_report.html")

# Each kill lands in a different window of the participant job (the counts restart in every process, and a
# re-run skips what is complete, so each kill falls later in the work):
PARTICIPANT_KILLS = (
    "kill-before:.bidsignore:1",  # shared root files: a temporary is left at the output root
    "kill-after:*desc-preproc_T1w.nii.gz:1",  # preprocessed image renamed, its sidecar not yet written
    "kill-after:*desc-image_T1w.npy:1",  # tensor renamed, its sidecar not yet written
    "kill-before:*desc-patch_T1w.npy:2",  # tensor of the second session still a temporary
    "kill-after:*_status.tsv:1",  # every output written, status table not yet rebuilt
)


def test_participant_killed_at_each_write_window_then_rerun_matches_uninterrupted(
    tiny_dataset, hook_dir: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    assert run_faulty(hook_dir, participant_args(tiny_dataset, reference, "--participant-label", "001")).returncode == 0
    out = tmp_path / "out"
    args = participant_args(tiny_dataset, out, "--participant-label", "001")
    left: set[str] = set()
    for fault in PARTICIPANT_KILLS:
        result = run_faulty(hook_dir, args, fault)
        assert result.returncode == KILLED, (fault, result.stderr[-2000:])
        assert_nothing_looks_complete_but_is_not(out)
        left |= {p.name for p in out.rglob(".*.tmp*")}
    assert any(name.startswith("..bidsignore.") for name in left) and any(".npy" in name for name in left)
    for shared in out.glob(".*.tmp*"):  # shared folders are cleaned of temporaries older than 10 minutes
        os.utime(shared, (shared.stat().st_atime, shared.stat().st_mtime - SHARED_TEMPORARY_AGE_S))
    result = run_faulty(hook_dir, args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(out.rglob(".*.tmp*")), "the re-run removes the temporaries the killed runs left"
    assert tree_hashes(out, VOLATILE) == tree_hashes(reference, VOLATILE)
    status = pd.read_csv(out / "participant_status.tsv", sep="\t", dtype=str)
    assert set(status["status"]) <= {"ok", "skipped"}
    assert validate(out).returncode == 0


@pytest.mark.slow  # ~45 s of CPU; run by `make test` (CI), skipped by `make test-fast`
def test_twenty_concurrent_participant_processes_share_one_output(hook_dir: Path, tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path, 20, 1, seed=8, effect_size=0.5)
    out = tmp_path / "out"
    env = {**os.environ, "BIDS_APP_TEST_FAULT": ""}
    procs = [
        subprocess.Popen([sys.executable, "-m", "bids_app", str(dataset.bids_dir), str(out), "participant",
                          "-d", str(dataset.derivative_dir), "--template", str(dataset.template_path),
                          "--crop-shape", *TINY_CROP, "--modes", "image", "--skip-bids-validation",
                          "--participant-label", label],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        for label in dataset.participants
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-2000:]
    assert len(dataset.participants) == 20
    status = pd.read_csv(out / "participant_status.tsv", sep="\t", dtype=str)
    assert set(status["participant_id"]) == {f"sub-{p}" for p in dataset.participants}
    assert set(status["status"]) == {"ok"}
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "bids_app"
    assert (out / ".bidsignore").read_text().splitlines() == list(BIDSIGNORE_ENTRIES)
    tensors = sorted(out.glob("sub-*/ses-*/deeplearning/*desc-image_T1w.npy"))
    assert len(tensors) == 20
    for tensor in tensors:
        assert load_tensor(tensor).shape == (1, *map(int, TINY_CROP))
    exits = [json.loads(p.read_text())["exit_code"] for p in out.glob("logs/*/exit.json")]
    assert exits == [0] * 20
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert_nothing_looks_complete_but_is_not(out)
    assert validate(out).returncode == 0


def test_full_disk_in_a_participant_run_exits_74_and_leaves_nothing_half_written(
    tiny_dataset, hook_dir: Path, tmp_path: Path
) -> None:
    """The disk fills up at the first tensor and stays full (status table and exit record fail too)."""
    out = tmp_path / "out"
    result = run_faulty(hook_dir, participant_args(tiny_dataset, out, "--participant-label", "002"),
                        "enospc:*desc-image_T1w.npy:1")  # fmt: skip
    assert result.returncode == 74, result.stderr[-2000:]
    assert "No space left on device" in result.stderr
    assert "Check free space on the output disk" in result.stderr
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], "temporaries are removed when a write fails"
    assert not list(out.rglob("*.npy")), "the tensor that could not be renamed is not there at all"
    assert len(list(out.glob("sub-002/ses-*/anat/*desc-preproc_T1w.json"))) == 1
    assert_nothing_looks_complete_but_is_not(out)


def test_one_unwritable_output_file_exits_74_not_65(
    tiny_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    real_replace = os.replace

    def full_for_tensors(src: Any, dst: Any) -> None:
        if str(dst).endswith(".npy"):
            raise OSError(28, "No space left on device", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_for_tensors)
    code = main(participant_args(tiny_dataset, tmp_path / "out", "--participant-label", "002"))
    assert "No space left on device" in capsys.readouterr().err
    assert code == 74


# -- group level: training and prediction ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """8 participants, one session, image tensors (no registration)."""
    root = tmp_path_factory.mktemp("fault_cohort")
    return make_cohort(root, 8, 1, "--modes", "image", "--skip-bids-validation", seed=2, effect_size=0.5)


def group_args(dataset: Any, out: Path, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn",
            "--mode", "image", "--epochs", "2", "--batch-size", "2", "--learning-rate", "0.01", "--n-splits", "2",
            "--test-size", "0.25", "--seed", "5", "--device", "cpu", *extra]  # fmt: skip


def copy_output(out: Path, dest: Path) -> Path:
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("logs"))
    return dest


# Kills in training and prediction, each followed by a ``--resume`` run (counts restart in every process):
GROUP_KILLS = (
    "kill-after:model.safetensors:1",  # split 0 epoch 0: best model saved, no checkpoint yet
    "kill-before:checkpoint.pt:2",  # split 0 epoch 1: checkpoint still a temporary; the resume loads epoch 0's
    "kill-after:*_prediction.tsv:3",  # both splits trained; prediction stage killed after three tables
)
# environment.json names the machine and the run (id, command line); report.html shows the runs' ids
MAPS_VOLATILE = ("environment.json", "report.html", "split-0/training_logs/tensorboard",
                 "split-1/training_logs/tensorboard")  # fmt: skip


@pytest.mark.slow  # ~45 s of CPU; run by `make test` (CI), skipped by `make test-fast`
def test_training_and_prediction_killed_then_resumed_match_uninterrupted(
    cohort: tuple[Any, Path], hook_dir: Path, tmp_path: Path
) -> None:
    dataset, participant_out = cohort
    reference = copy_output(participant_out, tmp_path / "reference")
    result = run_faulty(hook_dir, group_args(dataset, reference))
    assert result.returncode == 0, result.stderr[-3000:]
    out = copy_output(participant_out, tmp_path / "out")
    logs = []
    for i, fault in enumerate(GROUP_KILLS):
        result = run_faulty(hook_dir, group_args(dataset, out, *(["--resume"] if i else [])), fault)
        assert result.returncode == KILLED, (fault, result.stderr[-3000:])
        assert_nothing_looks_complete_but_is_not(out / "models")
        logs.append(result.stderr)
    assert "Split 0 resumed after epoch 0" in logs[2], "the third run continued from a checkpoint"
    result = run_faulty(hook_dir, group_args(dataset, out, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    maps_ref, maps_out = reference / "models" / "model", out / "models" / "model"
    expected = tree_hashes(maps_ref, MAPS_VOLATILE)
    assert {name for name in expected if name.endswith("model.safetensors")} == {
        f"split-{k}/{kind}/model.safetensors" for k in (0, 1) for kind in ("best-loss", "baseline/best-loss")
    }  # the network of each split, and the linear baseline fitted beside it
    assert any(name.endswith("test_image_level_prediction.tsv") for name in expected)
    assert tree_hashes(maps_out, MAPS_VOLATILE) == expected
    assert not list(maps_out.glob("split-*/tmp")), "checkpoints are removed once a split is trained"
    for k in (0, 1):
        summary = json.loads((maps_out / f"split-{k}/training_logs/summary.json").read_text())
        assert summary["epochs_completed"] == 2
    assert validate(out).returncode == 0


def fill_disk_at(monkeypatch: pytest.MonkeyPatch, pattern: str) -> None:
    """In-process twin of ``enospc:<pattern>:1``: the first rename onto ``pattern`` and every later one fail."""
    real_replace = os.replace
    full = [False]

    def replace(src: Any, dst: Any) -> None:
        full[0] = full[0] or fnmatch.fnmatch(Path(dst).name, pattern)
        if full[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_full_disk_during_training_exits_74_and_leaves_no_temporary(
    cohort: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    dataset, participant_out = cohort
    out = copy_output(participant_out, tmp_path / "out")
    fill_disk_at(monkeypatch, "checkpoint.pt")
    assert main(group_args(dataset, out, "--stages", "split", "train")) == 74
    assert "No space left on device" in capsys.readouterr().err
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not list(out.glob("models/model/split-*/training_logs/summary.json")), "no split claims to be trained"
    assert_nothing_looks_complete_but_is_not(out / "models")


def test_run_killed_while_splitting_resumes(cohort: tuple[Any, Path], tmp_path: Path, capsys) -> None:
    """The state a kill during the split stage leaves: split tables written, ``splits.json`` (last) not."""
    dataset, participant_out = cohort
    out = copy_output(participant_out, tmp_path / "out")
    assert main(group_args(dataset, out, "--stages", "split")) == 0
    (out / "models/model/groups/splits.json").unlink()
    code = main(group_args(dataset, out, "--stages", "split", "train", "--epochs", "1", "--resume"))
    assert code == 0, capsys.readouterr().err[-2000:]


# -- out of memory -----------------------------------------------------------------------------------------


def limit_batch(monkeypatch: pytest.MonkeyPatch, max_batch: int, error: BaseException) -> None:
    """Make every 3D convolution raise ``error`` on batches larger than ``max_batch`` (an oversized batch)."""
    import torch

    forward = torch.nn.Conv3d.forward

    def limited(self: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > max_batch:
            raise error
        return forward(self, x)

    monkeypatch.setattr(torch.nn.Conv3d, "forward", limited)


OOM_ERRORS = {
    "python": MemoryError(),
    "cuda": RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"),
    "cpu-allocator": RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)"
    ),
}


@pytest.mark.parametrize(
    "kind",
    [
        "python",
        "cuda",
        "cpu-allocator",
    ],
)
def test_oversized_batch_exits_75_asking_for_a_lower_batch_size(
    kind: str, cohort: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    dataset, participant_out = cohort
    out = copy_output(participant_out, tmp_path / "out")
    limit_batch(monkeypatch, 1, OOM_ERRORS[kind])
    code = main(group_args(dataset, out, "--stages", "split", "train", "--epochs", "1"))
    assert code == 75
    err = capsys.readouterr().err
    assert "Out of memory" in err and "Lower --batch-size (e.g. to 1" in err and "--resume" in err
    # the advice works: the same run resumed with a batch that fits completes
    code = main(group_args(dataset, out, "--stages", "split", "train", "--epochs", "1", "--batch-size", "1",
                           "--resume"))  # fmt: skip
    assert code == 0, capsys.readouterr().err[-2000:]
    summaries = sorted(out.glob("models/model/split-*/training_logs/summary.json"))
    assert [json.loads(p.read_text())["epochs_completed"] for p in summaries] == [1, 1]


def test_hook_counts_only_matching_renames(hook_dir: Path, tmp_path: Path) -> None:
    """The injector itself: it fires on the n-th matching rename only (else the tests above prove nothing)."""
    script = (
        "import os, pathlib\n"
        "d = pathlib.Path(os.environ['D'])\n"
        "for name in ['a.txt', 'b.json', 'c.txt', 'd.json']:\n"
        "    (d / ('.' + name)).write_text(name)\n"
        "    os.replace(d / ('.' + name), d / name)\n"
    )
    env = {**os.environ, "D": str(tmp_path), "PYTHONPATH": str(hook_dir), "BIDS_APP_TEST_FAULT": "kill-after:*.json:2"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, check=False)
    assert proc.returncode == KILLED
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "a.txt",
        "b.json",
        "c.txt",
        "d.json",
    ]
    env["BIDS_APP_TEST_FAULT"] = "enospc:*.json:1"
    for p in tmp_path.iterdir():
        p.unlink()
    proc = subprocess.run([sys.executable, "-c", script], env=env, check=False, capture_output=True, text=True)
    assert proc.returncode == 1 and "No space left on device" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["a.txt"]


def test_shared_temporaries_are_removed_only_once_old(tmp_path: Path) -> None:
    """A dead writer's temporary at the root goes; a live writer's (fresh) one is left alone."""
    from bids_app.derivatives import init_derivative

    out = tmp_path / "out"
    (out / "status").mkdir(parents=True)
    dead = [out / "..bidsignore.a1b2.tmp", out / "status" / ".sub-01_status.tsv.c3d4.tmp.tsv"]
    live = out / ".dataset_description.json.e5f6.tmp.json"
    for path in (*dead, live):
        path.write_text("partial")
    for path in dead:
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime - SHARED_TEMPORARY_AGE_S - 1))
    init_derivative(out, tmp_path / "bids", "0.1.0")
    assert [p.exists() for p in dead] == [False, False]
    assert live.exists()
