"""bids_app: reproducible, leak-proof deep learning on BIDS neuroimaging data."""

from __future__ import annotations

from pathlib import Path

__all__ = ["read_version"]


def read_version() -> str:
    """Return the version: the repository's ``version`` file, else the installed distribution's.

    The ``version`` file at the top of the repository is the single source; packaging copies it into the
    distribution metadata and the container copies it to ``/version``.
    """
    for candidate in (Path(__file__).resolve().parent.parent / "version", Path("/version")):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8").strip()
    from importlib.metadata import version

    return version("bids_app")
