"""``bids-validator-deno`` on the input (restricted to the requested participants) and on our outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bids_app.errors import BidsValidationError, InputMissingError, ToolFailure

log = logging.getLogger(__name__)

VALIDATOR = "bids-validator-deno"
MAX_SHOWN = 20


@dataclasses.dataclass(frozen=True)
class ValidationIssue:
    code: str
    severity: str
    location: str
    message: str


@dataclasses.dataclass(frozen=True)
class ValidationResult:
    returncode: int
    issues: tuple[ValidationIssue, ...]

    @property
    def errors(self) -> tuple[ValidationIssue, ...]:
        return tuple(i for i in self.issues if i.severity == "error")


def validator_path() -> str:
    found = shutil.which(VALIDATOR)
    if found is None:
        raise InputMissingError(
            f"{VALIDATOR} is not installed (pip install bids-validator-deno), or pass --skip-bids-validation."
        )
    return found


def run_validator(root: Path, extra_args: Sequence[str] = ()) -> ValidationResult:
    """Validate ``root`` as a dataset of its own; parse the JSON report."""
    env = {
        **os.environ,
        "DENO_DIR": os.environ.get("DENO_DIR", str(Path(tempfile.gettempdir()) / "deno")),
        "DENO_NO_UPDATE_CHECK": "1",  # no network call, no telemetry
    }
    proc = subprocess.run(
        [validator_path(), str(root), "--format", "json", *extra_args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    issues: list[ValidationIssue] = []
    try:
        report = json.loads(proc.stdout)
        for issue in report.get("issues", {}).get("issues", []):
            issues.append(
                ValidationIssue(
                    code=str(issue.get("code", "")),
                    severity=str(issue.get("severity", "")),
                    location=str(issue.get("location", "")),
                    message=str(issue.get("issueMessage") or issue.get("subCode") or ""),
                )
            )
    except json.JSONDecodeError:
        # No report: the validator itself failed (crashed, killed, out of memory), which says nothing about the
        # dataset; calling it "failed validation" (16) would send the user to fix valid data.
        said = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1][:300]
        raise ToolFailure(
            f"bids-validator-deno did not run to the end on {root} (exit {proc.returncode}: {said}); this is not a "
            "verdict on the dataset. Re-run; if it keeps failing, pass --skip-bids-validation and validate the "
            "dataset separately."
        ) from None
    return ValidationResult(proc.returncode, tuple(issues))


def _participant_view(bids_dir: Path, participants: Sequence[str], view: Path) -> None:
    """Symlink the dataset's top level and only the requested participants into ``view``.

    ``participants.tsv`` is copied with only those rows, so the validator does not report the absent ones.
    """
    wanted = {f"sub-{p}" for p in participants}
    for entry in bids_dir.iterdir():
        if entry.name.startswith("sub-") and entry.name not in wanted:
            continue
        if entry.name == "participants.tsv":
            lines = entry.read_text(encoding="utf-8").splitlines()
            kept = [lines[0]] + [line for line in lines[1:] if line.split("\t", 1)[0] in wanted]
            (view / entry.name).write_text("\n".join(kept) + "\n", encoding="utf-8")
        elif entry.name != "derivatives":
            (view / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def validate_input(bids_dir: Path, participants: Sequence[str], all_participants: Sequence[str]) -> None:
    """Raise BidsValidationError (exit 16) listing the validator's error codes for the requested participants."""
    if list(participants) == list(all_participants):
        result = run_validator(bids_dir, ["--ignoreWarnings"])
    else:
        with tempfile.TemporaryDirectory(prefix="bids_app_view_") as tmp:
            view = Path(tmp) / bids_dir.name
            view.mkdir()
            _participant_view(bids_dir, participants, view)
            result = run_validator(view, ["--ignoreWarnings"])
    errors = result.errors
    if not errors and result.returncode == 0:
        log.info("bids-validator-deno: %s is valid for %d participant(s)", bids_dir, len(participants))
        return
    counts: dict[str, int] = {}
    for issue in errors:
        counts[issue.code] = counts.get(issue.code, 0) + 1
    for issue in errors[:MAX_SHOWN]:
        log.error("BIDS validation %s at %s: %s", issue.code, issue.location, issue.message)
    summary = ", ".join(f"{code} x{n}" for code, n in sorted(counts.items())) or f"exit {result.returncode}"
    raise BidsValidationError(
        f"{bids_dir} failed BIDS validation ({summary}). Fix the dataset or pass --skip-bids-validation."
    )
