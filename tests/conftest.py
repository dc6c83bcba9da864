"""Shared fixtures: datasets come from the one synthetic generator (bids_app.synthetic.dataset)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from bids_app.synthetic.dataset import GeneratedDataset


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory):
    """Four participants x 2 sessions at ~4 mm, with a derivative and a CAPS copy; read-only for tests."""
    from bids_app.synthetic.dataset import generate_dataset

    root = tmp_path_factory.mktemp("tiny") / "bids"
    return generate_dataset(root, n_subjects=4, n_sessions=2, preset="tiny", seed=3, preprocessed="derivative")


@pytest.fixture
def tiny_copy(tiny_dataset, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny BIDS dataset (for tests that damage it)."""
    dest = tmp_path / "bids"
    shutil.copytree(tiny_dataset.bids_dir, dest)
    return dest


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bids_app`` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "bids_app", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def validate(root: Path) -> subprocess.CompletedProcess[str]:
    validator = shutil.which("bids-validator-deno") or str(Path(sys.executable).parent / "bids-validator-deno")
    return subprocess.run([validator, str(root)], capture_output=True, text=True, check=False, timeout=300)


TINY_CROP = ("40", "48", "40")


def make_dataset(
    root: Path, n_subjects: int, n_sessions: int, *, seed: int = 11, effect_size: float = 0.6, **generate_options: Any
) -> GeneratedDataset:
    """A tiny generated BIDS dataset in ``root / "bids"`` with its template-space derivative; ``seed``,
    ``effect_size`` and ``generate_options`` go to :func:`bids_app.synthetic.dataset.generate_dataset`."""
    from bids_app.synthetic.dataset import generate_dataset

    return generate_dataset(root / "bids", n_subjects=n_subjects, n_sessions=n_sessions, preset="tiny", seed=seed,
                            effect_size=effect_size, preprocessed="derivative", **generate_options)  # fmt: skip


def make_cohort(
    root: Path,
    n_subjects: int,
    n_sessions: int,
    *participant_args: str,
    seed: int = 11,
    effect_size: float = 0.6,
    **generate_options: Any,
) -> tuple[GeneratedDataset, Path]:
    """A tiny generated cohort (:func:`make_dataset`, by default seed 11, atrophy 0.6) processed at participant
    level into ``root / "out"`` from its template-space derivative (no registration), cropped to ``TINY_CROP``;
    ``participant_args`` add modes and options."""
    dataset = make_dataset(root, n_subjects, n_sessions, seed=seed, effect_size=effect_size, **generate_options)
    out = root / "out"
    result = run_cli(str(dataset.bids_dir), str(out), "participant", "-d", str(dataset.derivative_dir),
                     "--template", str(dataset.template_path), "--crop-shape", *TINY_CROP, "--nprocs", "2",
                     *participant_args)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return dataset, out
