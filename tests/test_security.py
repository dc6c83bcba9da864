"""Security: nothing is unpickled, BIDS_DIR is never written, nothing goes to the network.

The malicious files carry a ``__reduce__`` that creates a marker file when unpickled; a control step shows
the payload is live (an ordinary unpickler creates the marker), then bids_app is shown to refuse the file
without creating it. Writes to BIDS_DIR and network use are caught twice: by a snapshot of BIDS_DIR (every
path, file hash and modification time, folders included) and by a Python audit hook that records every
``open`` for writing, every rename/removal under BIDS_DIR and every socket event during the runs.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bids_app.cli.main import main
from bids_app.derivatives import file_sha256
from tests.conftest import TINY_CROP, make_dataset

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.symlink",
               "os.link", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}  # fmt: skip

# Events that reach another host or a name server. Not listed, because they stay on the machine: the loopback
# bind urllib3 does at import to probe IPv6, and tensorboard's gethostname for its event file name.
NETWORK_EVENTS = {"socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
                  "socket.gethostbyaddr", "socket.getnameinfo", "urllib.Request", "http.client.connect",
                  "ftplib.connect", "smtplib.connect", "webbrowser.open"}  # fmt: skip


class Plant:
    """Unpickling this object creates ``marker`` (the stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


class Watch:
    """Audit hook state: writes under ``root`` and socket events while ``armed``."""

    def __init__(self) -> None:
        self.root: str | None = None
        self.armed = False
        self.writes: list[tuple[str, Any]] = []
        self.reads: list[str] = []
        self.network: list[tuple[str, Any]] = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.armed or self.root is None:
            return
        if event in NETWORK_EVENTS:
            self.network.append((event, args[:2]))
            return
        if event == "open":
            path, mode, flags = args
            if not isinstance(path, str | os.PathLike) or not self._inside(path):
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if writing:
                self.writes.append((event, str(path)))
            else:
                self.reads.append(str(path))
        elif event in PATH_EVENTS:
            # a link or copy made from BIDS_DIR to elsewhere only reads BIDS_DIR: check its destination
            targets = args[1:2] if event in ("os.symlink", "os.link", "shutil.copyfile") else args
            if any(isinstance(a, str | os.PathLike) and self._inside(a) for a in targets):
                self.writes.append((event, args))

    def _inside(self, path: Any) -> bool:
        assert self.root is not None
        return os.path.abspath(os.fspath(path)).startswith(self.root + os.sep)


WATCH = Watch()
sys.addaudithook(WATCH)  # audit hooks cannot be removed; WATCH does nothing unless armed


def snapshot(root: Path) -> dict[str, tuple[str, str | None, int]]:
    """Every path under ``root`` (folders too): kind, sha256 of files, modification time in ns."""
    found = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        if path.is_symlink():
            found[path.relative_to(root).as_posix()] = ("link", os.readlink(path), stat.st_mtime_ns)
        elif path.is_dir():
            found[path.relative_to(root).as_posix()] = ("dir", None, stat.st_mtime_ns)
        else:
            found[path.relative_to(root).as_posix()] = ("file", file_sha256(path), stat.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def watched_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Participant (raw with registration, then preprocessed input) and group runs, watched, in-process."""
    root = tmp_path_factory.mktemp("security")
    dataset = make_dataset(root, 8, 1, seed=9, effect_size=0.5)
    out = root / "out"
    common = ["--template", str(dataset.template_path), "--crop-shape", *TINY_CROP, "--modes", "image"]
    before = snapshot(dataset.bids_dir)
    WATCH.root, WATCH.armed = str(dataset.bids_dir.resolve()), True
    try:
        codes = [
            main([str(dataset.bids_dir), str(out), "participant", "--participant-label", "001", *common]),
            main([str(dataset.bids_dir), str(out), "participant", "-d", str(dataset.derivative_dir), *common]),
            main([str(dataset.bids_dir), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn",
                  "--mode", "image", "--epochs", "1", "--batch-size", "2", "--n-splits", "2", "--test-size", "0.25",
                  "--seed", "3", "--device", "cpu", "--track", "mlflow"]),  # tracking must not reach out either
        ]  # fmt: skip
    finally:
        WATCH.armed = False
    return {
        "dataset": dataset,
        "out": out,
        "codes": codes,
        "before": before,
        "after": snapshot(dataset.bids_dir),
        "writes": list(WATCH.writes),
        "reads": list(WATCH.reads),
        "network": list(WATCH.network),
    }


def test_bids_dir_is_never_written(watched_runs: dict[str, Any]) -> None:
    assert watched_runs["codes"] == [0, 0, 0]
    out = watched_runs["out"]
    assert len(list(out.glob("models/model/split-*/best-loss/test/test_image_level_prediction.tsv"))) == 2
    assert list(out.glob("sub-001/ses-*/anat/*_xfm.mat")), "the raw participant was registered"
    before, after = watched_runs["before"], watched_runs["after"]
    assert len(before) > 40 and any(kind == "file" for kind, _, _ in before.values())
    assert after == before  # same paths, same bytes, same modification times (folders: no temporary either)
    assert watched_runs["writes"] == []
    reads = watched_runs["reads"]
    assert any(p.endswith("participants.tsv") for p in reads), "the hook saw the label table being read"
    assert any(p.endswith("_T1w.nii.gz") for p in reads), "the hook saw the images being read"


def test_no_network_use_during_any_run(watched_runs: dict[str, Any], tmp_path: Path) -> None:
    assert watched_runs["network"] == []
    store = watched_runs["out"] / "mlruns"
    assert len(list(store.glob("*/*/meta.yaml"))) == 3, "the watched group run was tracked (MAPS run + 2 splits)"
    WATCH.root, WATCH.armed = str(tmp_path), True  # control: the hook does see network use
    try:
        socket.getaddrinfo("localhost", 80)
    finally:
        WATCH.armed = False
    assert any(event == "socket.getaddrinfo" for event, _ in WATCH.network)


def test_image_disables_update_checks_and_template_ships_with_nilearn() -> None:
    from bids_app.template import default_template_path, nilearn_data_dir

    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    assert "DENO_NO_UPDATE_CHECK=1" in dockerfile
    import nilearn

    path = default_template_path()
    assert path.is_file() and path.is_relative_to(Path(nilearn.__file__).resolve().parent)
    assert nilearn_data_dir() in path.parents


@pytest.fixture
def output_copy(watched_runs: dict[str, Any], tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(watched_runs["out"], out, ignore=shutil.ignore_patterns("logs"))
    return out


def predict_args(watched_runs: dict[str, Any], out: Path, *extra: str) -> list[str]:
    return [str(watched_runs["dataset"].bids_dir), str(out), "group", "--label", "diagnosis", "--architecture",
            "small_cnn", "--mode", "image", "--epochs", "1", "--batch-size", "2", "--n-splits", "2",
            "--test-size", "0.25", "--seed", "3", "--device", "cpu", *extra]  # fmt: skip


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_pickle_planted_as_a_model_is_refused_and_never_run(
    name: str, watched_runs: dict[str, Any], output_copy: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Plant(marker))
    pickle.loads(pickle.dumps(Plant(tmp_path / "control")))
    assert (tmp_path / "control").exists(), "the payload is live"
    best = output_copy / "models" / "model" / "split-0" / "best-loss"
    (best / "model.safetensors").unlink()
    (best / name).write_bytes(payload)
    code = main(predict_args(watched_runs, output_copy, "--stages", "predict"))
    err = capsys.readouterr().err
    assert code == 65
    assert "pickle" in err and name in err
    assert not marker.exists()


def test_pickle_planted_as_a_tensor_is_refused_and_never_run(
    watched_runs: dict[str, Any], output_copy: Path, tmp_path: Path, capsys
) -> None:
    from bids_app.errors import DataError
    from bids_app.extraction.storage import load_part, load_tensor

    marker = tmp_path / "pwned"
    tensor = next(output_copy.glob("sub-002/ses-*/deeplearning/*desc-image_T1w.npy"))
    np.save(tensor, np.array([Plant(marker)], dtype=object), allow_pickle=True)  # sidecar still says Complete
    np.load(tensor, allow_pickle=True)  # control: numpy's unpickler runs the payload ...
    assert marker.exists()
    marker.unlink()  # ... and now bids_app's readers must not
    with pytest.raises(DataError, match=r"not a readable numeric \.npy"):
        load_tensor(tensor)
    with pytest.raises(DataError, match="float32/float16"):
        load_part(tensor, 0)
    code = main(predict_args(watched_runs, output_copy, "--model-name", "again"))
    err = capsys.readouterr().err
    assert code == 65
    assert tensor.name in err
    assert not marker.exists()


def test_pickle_planted_as_a_checkpoint_is_refused_and_never_run(
    watched_runs: dict[str, Any], output_copy: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "pwned"
    split = output_copy / "models" / "model" / "split-1"
    (split / "training_logs" / "summary.json").unlink()  # make split 1 look interrupted
    checkpoint = split / "tmp" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    torch.save({"format_version": 1, "payload": Plant(marker)}, checkpoint)
    torch.load(checkpoint, weights_only=False)  # control: torch's full unpickler runs the payload ...
    assert marker.exists()
    marker.unlink()
    code = main(predict_args(watched_runs, output_copy, "--stages", "train", "--resume"))
    err = capsys.readouterr().err
    assert code == 65
    assert "cannot be read safely" in err and "checkpoint.pt" in err
    assert not marker.exists()
