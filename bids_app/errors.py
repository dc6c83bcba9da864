"""The bids_app error family and its exit codes (BEP027 draft execution spec).

Every expected failure raises one of these; ``cli.main`` turns it into one log line and ``exit_code``.
Programming errors are left alone so they keep their traceback.

| exit | class                 | meaning                                            |
|------|-----------------------|----------------------------------------------------|
| 1    | BidsAppError          | unspecified failure                                |
| 1    | ToolFailure           | an external tool crashed (not a finding on data)   |
| 16   | BidsValidationError   | input failed BIDS validation                       |
| 17   | AnalysisLevelError    | unknown analysis level                             |
| 18   | FilterError           | entity filters selected no files                   |
| 64   | UsageError            | bad command line or configuration                  |
| 65   | DataError             | input data is invalid (corrupt image, leak, ...)   |
| 66   | InputMissingError     | a required input is missing                        |
| 73   | OutputError           | cannot create or write the output                  |
| 74   | IOFailure             | an I/O error while reading or writing              |
| 75   | TemporaryFailure      | temporary failure, a retry may succeed (e.g. OOM)  |
"""

from __future__ import annotations


class BidsAppError(Exception):
    """Base of every expected bids_app failure."""

    exit_code: int = 1


class ToolFailure(BidsAppError, RuntimeError):
    """An external tool bids_app runs (e.g. ``bids-validator-deno``) failed to run: no verdict on the data."""

    exit_code = 1


class BidsValidationError(BidsAppError):
    """The input dataset failed ``bids-validator-deno``."""

    exit_code = 16


class AnalysisLevelError(BidsAppError, ValueError):
    """The analysis level is neither ``participant`` nor ``group``."""

    exit_code = 17


class FilterError(BidsAppError, LookupError):
    """The active entity filters selected no file."""

    exit_code = 18


class UsageError(BidsAppError, ValueError):
    """Bad command-line arguments."""

    exit_code = 64


class ConfigError(UsageError):
    """A configuration value or key is invalid (TOML file or flags)."""


class DataError(BidsAppError, ValueError):
    """Input data exists but is unusable (corrupt, wrong shape, NaNs, inconsistent labels...)."""

    exit_code = 65


class LeakError(DataError):
    """Data leakage detected: a participant or an image would be on both sides of a split."""


class InputMissingError(BidsAppError, FileNotFoundError):
    """A required input (participant, image, table, model) is missing."""

    exit_code = 66


class OutputError(BidsAppError, PermissionError):
    """The output cannot be created or written."""

    exit_code = 73


class IOFailure(BidsAppError, OSError):
    """An I/O error (disk full, device error) while reading or writing."""

    exit_code = 74


class TemporaryFailure(BidsAppError, RuntimeError):
    """A failure a retry may fix (out of memory, busy resource)."""

    exit_code = 75
