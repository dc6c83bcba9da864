"""The participant status table: one row per participant, session and stage.

Each participant job writes only its own ``status/sub-<label>_status.tsv`` (no two jobs share a file); the
combined ``participant_status.tsv`` at the output root is rebuilt from those files under an exclusive lock, so
the last job to finish always leaves a complete table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
from collections.abc import Iterable, Iterator
from pathlib import Path

from bids_app.derivatives import atomic_write_text, status_path

COLUMNS = ("participant_id", "session_id", "image", "stage", "status", "message", "seconds")


class Outcome:
    OK = "ok"
    SKIPPED = "skipped"  # outputs already present with the same configuration hash
    FAILED = "failed"
    MISSING = "missing"  # a requested input (--contrasts) the session lacks; its other images are processed


@dataclasses.dataclass(frozen=True)
class StatusRow:
    participant_label: str
    session_label: str | None
    image: str  # input file name
    stage: str  # preprocess, preprocess-<kind> (a missing contrast), extract-<mode>, report, participant
    status: str
    message: str = ""
    seconds: float = 0.0

    def to_tsv(self) -> str:
        message = " ".join(self.message.split()).replace("\t", " ")
        session = f"ses-{self.session_label}" if self.session_label else "n/a"
        return "\t".join(
            (
                f"sub-{self.participant_label}",
                session,
                self.image or "n/a",
                self.stage,
                self.status,
                message or "n/a",
                f"{self.seconds:.2f}",
            )
        )


def write_participant_status(output_dir: Path, participant_label: str, rows: Iterable[StatusRow]) -> Path:
    path = status_path(output_dir, participant_label)
    lines = ["\t".join(COLUMNS), *(row.to_tsv() for row in rows)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def rebuild_status_table(output_dir: Path) -> Path:
    """Concatenate every participant's status file into ``participant_status.tsv`` (locked, atomic)."""
    table = output_dir / "participant_status.tsv"
    with _locked(output_dir / "status" / ".lock"):
        lines = ["\t".join(COLUMNS)]
        for path in sorted((output_dir / "status").glob("sub-*_status.tsv")):
            lines.extend(path.read_text(encoding="utf-8").splitlines()[1:])
        atomic_write_text(table, "\n".join(lines) + "\n")
    return table


def failed_images(output_dir: Path) -> dict[tuple[str, str], str]:
    """``(participant_id, session_id) → message`` of the images whose latest participant-level run failed.

    Read from the per-participant status files (``status/sub-*_status.tsv``); an image without a session is
    keyed with session ``n/a``. Empty when no status file exists.
    """
    failed: dict[tuple[str, str], str] = {}
    for path in sorted((output_dir / "status").glob("sub-*_status.tsv")):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines[1:]:
            fields = dict(zip(COLUMNS, line.split("\t"), strict=False))
            if fields.get("status") == Outcome.FAILED:
                key = (fields.get("participant_id", ""), fields.get("session_id") or "n/a")
                failed.setdefault(key, fields.get("message", ""))
    return failed
