"""Tensors and outputs that cannot be trusted or written: checksums, NaN tensors, read-only and full disks.

- Tensor checksums: ``write_tensor`` records the sha256 of the ``.npy`` bytes (``TensorSHA256``);
  ``data.tables.verify_tensors`` refuses a tensor changed since (zeroed, swapped) and accepts, with one warning,
  tensors of an older bids_app that recorded none.
- A tensor full of NaN stops training or validation at the first non-finite loss with a ``DataError`` naming
  the image, on every rank of a process group, and no split claims to be trained.
- A read-only OUTPUT_DIR (or ``logs/`` of it) ends with exit 73, a full disk while writing weights with exit 74:
  one log line naming the path, no traceback, nothing that was there changed.

Because the tests run as root here, ``chmod`` cannot make a folder read-only, so the faults are injected into real
``python -m bids_app`` processes by a ``sitecustomize`` module (``IO_HOOK``) put on their PYTHONPATH:

- ``BIDS_APP_TEST_READ_ONLY=<folder>``: every ``os.open`` for writing, ``open``/``io.open`` in a writing mode,
  ``os.mkdir`` of a new folder, rename, removal, ``chmod``, ``utime``, link or truncation under ``<folder>``
  raises ``EROFS``, as the kernel does on a read-only mount (``mkdir`` of an existing folder raises ``EEXIST``
  there too, which ``exist_ok`` accepts).
- ``BIDS_APP_TEST_FULL_AT=<name>``: safetensors' writer fails on ``<name>`` the way it fails on a full disk
  (the message of safetensors 0.8.0 on a full tmpfs), and from then on the disk stays full: every later
  safetensors write and every rename raises ``ENOSPC``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bids_app.config import ExtractionMode, Task
from bids_app.data import tables
from bids_app.data.tables import index_tensors
from bids_app.derivatives import file_sha256, sidecar_path
from bids_app.errors import DataError, IOFailure, OutputError
from bids_app.extraction.storage import read_sidecar, write_tensor
from bids_app.maps.folder import MapsLayout
from tests.conftest import TINY_CROP, make_cohort
from tests.data.test_data import write_tensors
from tests.test_faults import assert_nothing_looks_complete_but_is_not, group_args, tree_hashes

IO_HOOK = r"""
import builtins, errno, fnmatch, io, os

_READ_ONLY = os.environ.get("BIDS_APP_TEST_READ_ONLY", "")
_FULL_AT = os.environ.get("BIDS_APP_TEST_FULL_AT", "")

if _READ_ONLY:
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def _under(path, dir_fd=None):
        if isinstance(path, int):
            return False
        path = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        path = os.path.abspath(path)
        return path == _READ_ONLY or path.startswith(_READ_ONLY + os.sep)

    def _refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def _guard(name, n_paths, fd_key="dir_fd"):
        real = getattr(os, name)

        def guarded(*args, **kwargs):
            for path in args[:n_paths]:
                if _under(path, kwargs.get(fd_key)):
                    _refuse(path)
            return real(*args, **kwargs)

        setattr(os, name, guarded)

    for _name in ("unlink", "remove", "rmdir", "chmod", "utime", "truncate"):
        _guard(_name, 1)
    for _name in ("replace", "rename"):
        _guard(_name, 2, "src_dir_fd")
    _real_link, _real_symlink = os.link, os.symlink
    os.link = lambda src, dst, *a, **k: _refuse(dst) if _under(dst) else _real_link(src, dst, *a, **k)
    os.symlink = lambda src, dst, *a, **k: _refuse(dst) if _under(dst) else _real_symlink(src, dst, *a, **k)

    _real_mkdir = os.mkdir

    def _mkdir(path, *args, **kwargs):
        if _under(path, kwargs.get("dir_fd")):
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
            _refuse(path)
        return _real_mkdir(path, *args, **kwargs)

    os.mkdir = _mkdir
    _real_os_open = os.open

    def _os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS and _under(path, kwargs.get("dir_fd")):
            _refuse(path)
        return _real_os_open(path, flags, *args, **kwargs)

    os.open = _os_open
    _real_open = builtins.open

    def _open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and set(mode) & set("wax+") and _under(file):
            _refuse(file)
        return _real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _open

if _FULL_AT:
    import safetensors.torch as _safetensors_torch
    from safetensors import SafetensorError

    _full = [False]
    _real_serialize, _real_replace = _safetensors_torch.serialize_file, os.replace

    def _serialize_file(tensors, filename, *args, **kwargs):
        if _full[0] or fnmatch.fnmatch(os.path.basename(filename), f".{_FULL_AT}.*"):
            _full[0] = True
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return _real_serialize(tensors, filename, *args, **kwargs)

    def _replace(src, dst, *args, **kwargs):
        if _full[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))
        return _real_replace(src, dst, *args, **kwargs)

    _safetensors_torch.serialize_file = _serialize_file
    os.replace = _replace
"""


@pytest.fixture(scope="module")
def io_hook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("io_hook")
    (folder / "sitecustomize.py").write_text(IO_HOOK)
    return folder


def run_hooked(hook: Path, args: Iterable[str], **faults: str) -> subprocess.CompletedProcess[str]:
    """``python -m bids_app *args`` with ``faults`` (``BIDS_APP_TEST_READ_ONLY=...``...) armed in ``IO_HOOK``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BIDS_APP_TEST_")}
    env.update(faults)
    env["PYTHONPATH"] = os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "bids_app", *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """8 participants, one session, image tensors: an OUTPUT_DIR with outputs (read-only to the tests)."""
    root = tmp_path_factory.mktemp("io_cohort")
    return make_cohort(root, 8, 1, "--modes", "image", "--skip-bids-validation", seed=2, effect_size=0.5)


def participant_args(dataset: Any, out: Path) -> list[str]:
    return [str(dataset.bids_dir), str(out), "participant", "-d", str(dataset.derivative_dir),
            "--template", str(dataset.template_path), "--crop-shape", *TINY_CROP, "--modes", "image",
            "--skip-bids-validation"]  # fmt: skip


# -- tensor checksums --------------------------------------------------------------------------------------------


def test_participant_level_records_each_tensors_sha256(cohort: tuple[Any, Path]) -> None:
    _, out = cohort
    tensors = sorted(out.rglob("*.npy"))
    assert len(tensors) == 8
    for tensor in tensors:
        assert read_sidecar(tensor)["TensorSHA256"] == file_sha256(tensor), tensor


def image_table(out: Path, n: int = 6) -> pd.DataFrame:
    write_tensors(out, ExtractionMode.IMAGE, [(f"{i:02d}", "M000") for i in range(n)])
    return index_tensors(out, ExtractionMode.IMAGE)


def test_verify_tensors_names_a_zeroed_and_two_swapped_tensors(tmp_path: Path) -> None:
    table = image_table(tmp_path / "out")
    paths = [Path(p) for p in table["tensor_path"]]
    sidecars = [sidecar_path(p).read_bytes() for p in paths]
    tables.verify_tensors(table)  # untouched

    np.save(paths[1], np.zeros_like(np.load(paths[1])))  # same shape and dtype: load_tensor still accepts it
    first, second = paths[3].read_bytes(), paths[4].read_bytes()
    paths[3].write_bytes(second)
    paths[4].write_bytes(first)
    assert [sidecar_path(p).read_bytes() for p in paths] == sidecars, "the sidecars are left as they were"
    with pytest.raises(DataError) as info:
        tables.verify_tensors(table)
    message = str(info.value)
    assert info.value.exit_code == 65 and "\n" not in message
    for bad in (paths[1], paths[3], paths[4]):
        assert f"{bad} changed since it was extracted (sha256 {file_sha256(bad)[:12]}" in message
    for good in (paths[0], paths[2], paths[5]):
        assert str(good) not in message
    assert message.startswith("3 tensor(s) differ")
    assert "--overwrite --participant-label 01 03 04" in message


def test_verify_tensors_names_at_most_five_files(tmp_path: Path) -> None:
    table = image_table(tmp_path / "out", 7)
    for path in table["tensor_path"]:
        np.save(path, np.zeros_like(np.load(path)))
    with pytest.raises(DataError, match=r"^7 tensor\(s\) differ.*; and 2 more\. Re-run") as info:
        tables.verify_tensors(table)
    assert str(info.value).count("changed since it was extracted") == 5


def test_tensors_without_a_recorded_sha256_pass_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = image_table(tmp_path / "out", 4)
    for path in table["tensor_path"][:3]:  # as an older bids_app wrote them
        sidecar = read_sidecar(Path(path))
        del sidecar["TensorSHA256"]
        sidecar_path(Path(path)).write_text(json.dumps(sidecar))
    with caplog.at_level(logging.WARNING, logger="bids_app"):
        tables.verify_tensors(table)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("3 tensor(s) have no TensorSHA256"), warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bids_app"):
        tables.verify_tensors(table.iloc[3:])
    assert not caplog.records


# -- NaN tensors in training and validation ----------------------------------------------------------------------


def nan_training_data(root: Path, participant: str) -> tuple[Any, pd.DataFrame, Any]:
    """12 images (7 in training, 5 in validation: ``make_data``); ``participant``'s tensor is rewritten full of
    NaN with ``write_tensor``, so its checksum is consistent and only the values are bad."""
    from tests.training.test_train import make_config, make_data

    table, splits = make_data(root, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    path = Path(table.loc[table["participant_id"] == participant, "tensor_path"].iloc[0])
    sidecar = read_sidecar(path)
    write_tensor(path, np.full(sidecar["Shape"], np.nan, dtype=np.float32), sidecar)
    return make_config(root, epochs=2), table, splits


@pytest.mark.parametrize(("participant", "where"), [("sub-03", "training"), ("sub-09", "validation")])
def test_a_nan_tensor_stops_training_naming_the_image(tmp_path: Path, participant: str, where: str) -> None:
    from bids_app.training.stage import run_train_stage

    cfg, table, splits = nan_training_data(tmp_path, participant)
    side = splits.folds[0].train if where == "training" else splits.folds[0].validation
    assert participant in set(side["participant_id"])
    layout = MapsLayout(cfg.output_dir / "models" / cfg.train.model_name)
    with pytest.raises(DataError) as info:
        run_train_stage(cfg, layout, splits, table)
    message = str(info.value)
    path = table.loc[table["participant_id"] == participant, "tensor_path"].iloc[0]
    assert info.value.exit_code == 65 and "\n" not in message
    assert message.startswith(f"Non-finite {where} loss (NaN) at epoch 0 "), message
    assert f"{participant} ({path}): NaN" in message
    named = set(re.findall(r"(sub-\d+) \(", message))
    assert named == {participant}, "only the image holding NaN, not its batch mates that batch norm made NaN"
    assert f"--overwrite --participant-label {participant.removeprefix('sub-')}" in message
    assert not layout.summary_json(0).exists(), "the split does not claim to be trained"


def _nan_ddp_worker(rank: int, port: int, root: str) -> None:
    import torch
    from torch import nn

    from bids_app.data.dataset import TensorDataset
    from bids_app.data.sampling import make_loader
    from bids_app.training import distributed
    from bids_app.training.loop import train_epoch, validate
    from tests.training.test_distributed import _loop, torchrun_env

    torch.set_num_threads(1)
    table = pd.read_pickle(Path(root) / "table.pkl")
    results = {}
    with distributed.process_group("cpu", environ=torchrun_env(rank, port)):
        dataset = TensorDataset(table, ExtractionMode.IMAGE, Task.CLASSIFICATION, label_encoding={"AD": 0, "CN": 1})
        torch.manual_seed(0)
        loop = _loop(distributed.wrap_model(nn.Sequential(nn.Flatten(), nn.Linear(216, 2)), torch.device("cpu")))
        loader = make_loader(dataset, batch_size=2, seed=1, rank=rank, world_size=2)  # in order: sample 1 on rank 1
        for name, run in (("train", lambda: train_epoch(loop, loader)),
                          ("validate", lambda: validate(loop, loader, Task.CLASSIFICATION))):  # fmt: skip
            try:
                run()
                results[name] = "finished"
            except DataError as exc:
                results[name] = f"DataError: {exc}"
            distributed.barrier()
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(results))


def test_a_nan_tensor_on_one_rank_stops_every_rank_with_the_same_message(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from tests.training.test_distributed import free_port

    out = tmp_path / "out"
    write_tensors(out, ExtractionMode.IMAGE, [(f"{i:02d}", None) for i in range(8)])
    table = index_tensors(out, ExtractionMode.IMAGE)
    table["label"] = ["AD" if i % 2 else "CN" for i in range(len(table))]
    nan_path = Path(table["tensor_path"].iloc[1])
    sidecar = read_sidecar(nan_path)
    write_tensor(nan_path, np.full(sidecar["Shape"], np.nan, dtype=np.float32), sidecar)
    table.to_pickle(tmp_path / "table.pkl")
    context = mp.start_processes(_nan_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("a rank hangs after another rank met a NaN loss")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == results[1], "every rank raises the same error"
    for name in ("train", "validate"):
        message = results[0][name]
        assert message.startswith("DataError: Non-finite "), message
        assert f"sub-01 ({nan_path}): NaN" in message


# -- a read-only OUTPUT_DIR ---------------------------------------------------------------------------------------


def copy_output(out: Path, dest: Path) -> Path:
    shutil.copytree(out, dest)
    return dest


@pytest.mark.parametrize(
    ("level", "read_only"),
    [("participant", "."), ("group", "."), ("group", "logs")],
    ids=["participant", "group", "group-logs-only"],
)
def test_read_only_output_exits_73_naming_the_path_and_changes_nothing(
    cohort: tuple[Any, Path], io_hook: Path, tmp_path: Path, level: str, read_only: str
) -> None:
    dataset, participant_out = cohort
    out = copy_output(participant_out, tmp_path / "out")
    before = tree_hashes(out)
    args = participant_args(dataset, out) if level == "participant" else group_args(dataset, out)
    frozen = (out / read_only).resolve()
    result = run_hooked(io_hook, args, BIDS_APP_TEST_READ_ONLY=str(frozen))
    assert result.returncode == 73, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr[-3000:]
    assert f"{frozen}/" in errors[0] and "Read-only file system (EROFS)" in errors[0]
    assert "mount it read-write or choose another OUTPUT_DIR" in errors[0]
    assert tree_hashes(out) == before, "every file is unchanged and none was added"


# -- a full disk while writing the weights ------------------------------------------------------------------------


def test_full_disk_at_the_weights_exits_74_naming_the_file(
    cohort: tuple[Any, Path], io_hook: Path, tmp_path: Path
) -> None:
    dataset, participant_out = cohort
    out = copy_output(participant_out, tmp_path / "out")
    before = tree_hashes(out)
    args = group_args(dataset, out, "--stages", "split", "train")
    result = run_hooked(io_hook, args, BIDS_APP_TEST_FULL_AT="model.safetensors")
    assert result.returncode == 74, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr[-3000:]
    weights = out / "models" / "model" / "split-0" / "best-loss" / "model.safetensors"
    assert f"Cannot write {weights}: No space left on device (ENOSPC)" in errors[0]
    assert "Check free space on the output disk" in errors[0]
    assert not weights.exists() and not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not list(out.glob("models/model/split-*/training_logs/summary.json")), "no split claims to be trained"
    assert_nothing_looks_complete_but_is_not(out / "models")
    after = tree_hashes(out)
    assert {name: after.get(name) for name in before} == before, "earlier outputs are unchanged"


# -- each writer, in process ----------------------------------------------------------------------------------------


def test_a_tensor_whose_old_sidecar_cannot_be_removed_is_an_output_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sub-01_desc-image_T1w.npy"
    write_tensor(path, np.zeros((1, 2, 2, 2), np.float32), {"Mode": "image"})
    real_unlink = os.unlink

    def read_only(target: Any, *args: Any, **kwargs: Any) -> None:
        if Path(target).suffix == ".json":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))
        real_unlink(target, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", read_only)
    with pytest.raises(OutputError, match=r"Cannot write .*sub-01_desc-image_T1w\.json: Read-only file system"):
        write_tensor(path, np.ones((1, 2, 2, 2), np.float32), {"Mode": "image"})


def fill_disk_behind_temporaries(monkeypatch: pytest.MonkeyPatch, pattern: str) -> None:
    """Temporaries of files named ``.<pattern>.*`` are links to ``/dev/full``: writes get the kernel's ENOSPC."""
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = real_mkstemp(*args, **kwargs)
        if Path(name).name.startswith(f".{pattern}."):
            os.close(fd)
            os.unlink(name)
            os.symlink("/dev/full", name)
            fd = os.open(name, os.O_WRONLY)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_checkpoint_on_a_full_disk_is_an_io_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from bids_app.training.checkpoint import TrainingState, save_checkpoint

    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fill_disk_behind_temporaries(monkeypatch, "checkpoint.pt")
    path = tmp_path / "tmp" / "checkpoint.pt"
    with pytest.raises(IOFailure, match=r"Cannot write .*checkpoint\.pt: No space left on device \(ENOSPC\)"):
        save_checkpoint(path, model=model, optimizer=optimizer, scheduler=None,
                        scaler=torch.amp.GradScaler("cpu", enabled=False), loader_generator=torch.Generator(),
                        state=TrainingState(), config_hash="x")  # fmt: skip
    assert not path.exists() and not list(path.parent.iterdir())


CHECKPOINT_WITH_A_SIZE_LIMIT = """
import resource, signal, sys
from pathlib import Path
import torch
from bids_app.errors import BidsAppError
from bids_app.training.checkpoint import TrainingState, save_checkpoint

model = torch.nn.Linear(64, 64)  # 17 KB of weights
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # no file grows past 4 KiB: the kernel fails a write midway
try:
    save_checkpoint(Path(sys.argv[1]), model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    scheduler=None, scaler=torch.amp.GradScaler("cpu", enabled=False),
                    loader_generator=torch.Generator(), state=TrainingState(), config_hash="x")
except BidsAppError as exc:
    print(f"{type(exc).__name__}|{exc.exit_code}|{exc}")
"""


def test_a_checkpoint_write_failing_midway_is_an_io_failure(tmp_path: Path) -> None:
    """Unlike /dev/full, a nearly full disk takes the first writes; torch's zip writer then swallows the OSError."""
    path = tmp_path / "tmp" / "checkpoint.pt"
    result = subprocess.run([sys.executable, "-c", CHECKPOINT_WITH_A_SIZE_LIMIT, str(path)], capture_output=True,
                            text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    kind, code, message = result.stdout.strip().split("|", 2)
    assert (kind, code) == ("IOFailure", "74"), result.stdout
    assert f"{path}: File too large (EFBIG)" in message
    assert not list(path.parent.iterdir()), "no temporary is left"


def test_tensorboard_events_on_a_full_disk_are_an_io_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from bids_app.tracking.mlflow import Tracker
    from bids_app.training.history import EpochLog

    layout = MapsLayout(tmp_path / "maps")
    epoch_log = EpochLog(layout, 0, 0, Tracker(), main=True)

    def full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    assert epoch_log.writer is not None
    real_close = epoch_log.writer.close
    monkeypatch.setattr(epoch_log.writer, "flush", full)
    row = {"epoch": 0, "learning_rate": 0.1, "train_loss": 1.0, "validation_loss": 1.0}
    with pytest.raises(IOFailure, match=r"Cannot write TensorBoard events in .*tensorboard: No space left"):
        epoch_log.add([row])
    monkeypatch.setattr(epoch_log.writer, "close", full)
    with caplog.at_level(logging.WARNING), pytest.raises(DataError):  # the error that stopped training wins
        try:
            raise DataError("NaN")
        finally:
            epoch_log.close()
    assert "No space left on device" in caplog.text
    real_close()
    epoch_log = EpochLog(layout, 0, 0, Tracker(), main=True)
    assert epoch_log.writer is not None
    real_close = epoch_log.writer.close
    monkeypatch.setattr(epoch_log.writer, "close", full)
    with pytest.raises(IOFailure):  # alone, a close that fails is the error
        epoch_log.close()
    real_close()


def test_a_run_log_file_that_cannot_be_opened_is_an_output_error(tmp_path: Path) -> None:
    from bids_app.log_setup import attach_log_file

    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log folder should be")
    with pytest.raises(OutputError, match=r"Cannot write .*logs/run/bids_app\.log: Not a directory \(ENOTDIR\)"):
        attach_log_file(blocker / "run" / "bids_app.log")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_under_the_run_log_says_so_once_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bids_app.log_setup import attach_log_file

    log_path = tmp_path / "bids_app.log"
    handler = attach_log_file(log_path)
    logger = logging.getLogger("bids_app.test_output_io")
    try:
        previous = handler.setStream(open("/dev/full", "w", encoding="utf-8"))  # noqa: SIM115 (the handler closes it)
        if previous is not None:
            previous.close()
        for i in range(3):
            logger.warning("record %d", i)
    finally:
        logging.getLogger("bids_app").removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err, err
    lines = [line for line in err.splitlines() if str(log_path) in line]
    assert len(lines) == 1 and "No space left on device (ENOSPC)" in lines[0], err


def test_an_os_error_of_the_machine_that_escapes_a_writer_is_one_line(
    cohort: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bids_app import levels
    from bids_app.cli.main import main

    dataset, _ = cohort
    lock = tmp_path / "out" / "status" / ".lock"

    def full(*_: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(lock))

    monkeypatch.setattr(levels, "run", full)
    assert main(participant_args(dataset, tmp_path / "out")) == 74
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if " ERROR " in line] == [
        line for line in err.splitlines() if f"Cannot write {lock}: No space left on device (ENOSPC)" in line
    ]

    def bug(*_: Any) -> int:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    monkeypatch.setattr(levels, "run", bug)
    with pytest.raises(FileNotFoundError):  # anything else is a bug and keeps its traceback
        main(participant_args(dataset, tmp_path / "out"))


def test_write_tensor_hashes_the_bytes_it_writes_as_np_save_would(tmp_path: Path) -> None:
    import io

    for array in (np.random.default_rng(0).random((2, 1, 3, 4, 5), dtype=np.float32),
                  np.arange(24, dtype=np.float16).reshape(2, 3, 4).T,  # not C-contiguous
                  np.zeros((0, 1, 2, 2), np.float32)):  # fmt: skip
        path = tmp_path / "x.npy"
        write_tensor(path, array, {"Mode": "patch", "TensorSHA256": "stale"})
        expected = io.BytesIO()
        np.save(expected, np.ascontiguousarray(array))
        assert path.read_bytes() == expected.getvalue()
        sidecar = read_sidecar(path)
        assert sidecar["TensorSHA256"] == hashlib.sha256(expected.getvalue()).hexdigest()
        assert list(sidecar)[-4:] == ["TensorSHA256", "Shape", "Dtype", "Complete"]
