"""What is needed to re-run a run: its id, log folder, resolved config, environment record and seeds."""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import logging
import os
import platform
import random
import shlex
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bids_app import read_version
from bids_app.config import AnalysisLevel, RunConfig
from bids_app.config_file import dump_config
from bids_app.derivatives import CONTAINER_ENV, atomic_write_json, atomic_write_text, make_dirs
from bids_app.log_setup import attach_log_file

log = logging.getLogger(__name__)

# Distributions whose versions matter to results; the full list is in environment.json too.
KEY_PACKAGES = (
    "torch",
    "numpy",
    "nibabel",
    "pybids",
    "pandas",
    "scipy",
    "scikit-learn",
    "antspyx",
    "nilearn",
    "safetensors",
    "bids-validator-deno",
)


@dataclasses.dataclass(frozen=True)
class RunContext:
    """One invocation: its id, its log folder ``OUTPUT_DIR/logs/<run_id>/`` and its command line (shell-quoted)."""

    run_id: str
    log_dir: Path
    log_file: Path
    command: str = ""


def make_run_id(level: str, labels: Sequence[str]) -> str:
    """``20261123T040512Z_participant_sub-01_3f2a`` — sortable, unique across concurrent jobs."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    who = f"_sub-{labels[0]}" if len(labels) == 1 else ""
    return f"{stamp}_{level}{who}_{uuid.uuid4().hex[:6]}"


def start_run(cfg: RunConfig, argv: Sequence[str]) -> RunContext:
    """Create the run's log folder, attach a file handler, write command line, config and environment.

    Raises:
        OutputError, IOFailure: the log folder or one of its files cannot be written (read-only OUTPUT_DIR,
            permissions, a full disk), naming the path.
    """
    run_id = make_run_id(cfg.analysis_level.value, cfg.participant_labels)
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID")
    if rank and os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) != "1":
        run_id += f"_rank-{rank}"  # each process of a distributed group run keeps its own log folder
    log_dir = cfg.output_dir / "logs" / run_id
    make_dirs(log_dir)
    log_file = log_dir / "bids_app.log"
    attach_log_file(log_file)
    command = shlex.join(["bids_app", *argv])
    atomic_write_text(log_dir / "command.txt", command + "\n")
    atomic_write_text(log_dir / "config.toml", dump_config(cfg))
    probe = cfg.analysis_level is AnalysisLevel.GROUP
    atomic_write_json(log_dir / "environment.json", environment_record(cfg.seed, probe_devices=probe))
    log.info("bids_app %s, run %s; log file %s", read_version(), run_id, log_file)
    return RunContext(run_id=run_id, log_dir=log_dir, log_file=log_file, command=command)


def end_run(ctx: RunContext, exit_code: int) -> None:
    atomic_write_json(ctx.log_dir / "exit.json", {"exit_code": exit_code, "finished": _now()})
    root = logging.getLogger("bids_app")
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == ctx.log_file:
            handler.close()
            root.removeHandler(handler)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _torch_record(probe_devices: bool) -> dict[str, Any]:
    """torch, CUDA/cuDNN and GPU names. Without ``probe_devices`` (participant level, where torch is not used)
    only the installed torch version is read: importing torch costs ~2 s per participant job."""
    if not probe_devices and "torch" not in sys.modules:
        try:
            return {"torch": importlib.metadata.version("torch"), "cuda_available": None}
        except importlib.metadata.PackageNotFoundError:
            return {"torch": None}
    try:
        import torch
    except ImportError:
        return {"torch": None}
    record: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "num_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        record["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return record


def _name_and_version(dist: importlib.metadata.Distribution) -> tuple[str | None, str | None]:
    """A distribution's ``Name`` and ``Version`` from the header of its metadata file.

    ``dist.metadata`` parses the whole file (the long description included) and ``dist.version`` parses it a
    second time: 0.5 s per run for ~130 packages, where reading the header alone takes a few milliseconds.
    """
    import email.parser

    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO")
    if not text:
        return None, None
    header = email.parser.HeaderParser().parsestr(text, headersonly=True)
    return header["Name"], header["Version"]


def environment_record(seed: int, probe_devices: bool = True) -> dict[str, Any]:
    """Everything about the software and machine that can change a result."""
    packages = {}
    for dist in importlib.metadata.distributions():
        name, version = _name_and_version(dist)
        if name:
            packages[name.lower()] = version
    return {
        "bids_app_version": read_version(),
        "created": _now(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "container": os.environ.get(CONTAINER_ENV),
        "git_commit": _git_commit(),
        "seed": seed,
        "key_packages": {name: packages.get(name) for name in KEY_PACKAGES},
        **_torch_record(probe_devices),
        "packages": dict(sorted(packages.items())),
    }


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch from the run's one seed."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
