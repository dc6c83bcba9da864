"""Model weights on disk: safetensors only, because unpickling a file runs arbitrary code.

A pickle (``.pt``, ``.pth``, ``.pth.tar``, or a pickle renamed ``model.safetensors``) is refused before any byte
of it is deserialised; ``maps`` decides where the files live.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bids_app.derivatives import atomic_path
from bids_app.errors import DataError, InputMissingError

if TYPE_CHECKING:
    import torch
    from torch import nn

PICKLE_SUFFIXES = (".pt", ".pth", ".tar", ".pkl", ".pickle", ".ckpt", ".bin")
MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; the format's own limit
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error prints an errno


def save_model(path: Path, model: nn.Module) -> None:
    """Write ``model``'s state dict to ``path`` with safetensors, atomically (tied tensors saved once).

    Raises:
        OutputError, IOFailure: the file cannot be written (permissions; a full disk), naming ``path``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_model as save_safetensors

    # One metadata key only: safetensors writes the metadata from a hash map, so with two keys their order,
    # hence the file's bytes, changed from one process to the next. The version is in the model folder's record.
    with atomic_path(path) as tmp:
        try:
            save_safetensors(model, str(tmp), metadata={"format": "pt"}, force_contiguous=True)  # channels_last
        except SafetensorError as exc:
            code = _os_error_code(exc)
            if code is None:  # not an I/O failure: a programming error keeps its traceback
                raise
            raise OSError(code, os.strerror(code), str(tmp)) from exc  # atomic_path names ``path``


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write named numpy arrays (a linear model's coefficients) to ``path`` with safetensors, atomically.

    Raises:
        OutputError, IOFailure: the file cannot be written (permissions; a full disk), naming ``path``.
    """
    from safetensors.numpy import save_file

    contiguous = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata={"format": "np"})  # one key: see save_model


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read the arrays ``save_arrays`` wrote (refusing pickles, like ``load_state``)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    check_safetensors(Path(path))
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError) as exc:
        raise DataError(f"Model file {path} is corrupt ({exc}). Run the baseline stage again.") from exc


def _os_error_code(exc: Exception) -> int | None:
    """The errno of an I/O failure reported by safetensors' Rust writer (``... (os error 28)``), else None."""
    match = _OS_ERROR.search(str(exc))
    return int(match.group(1)) if match else None


def check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file (pickles and zip archives above all)."""
    refuse = (
        "Pickle model files are refused because loading them runs arbitrary code. Re-train with this bids_app "
        "version, or convert the weights to safetensors yourself if you trust their origin."
    )
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise DataError(f"Model file {path} is a pickle/torch checkpoint. {refuse}")
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
    except FileNotFoundError:
        raise InputMissingError(f"Model file {path} does not exist. Train this split first.") from None
    # A safetensors file opens with its JSON header's length (u64, little endian) then "{"; the length's first
    # byte may be 0x80 (a header of 1920 bytes), so the header is checked before any pickle/zip magic.
    if len(head) == 9 and 2 <= struct.unpack("<Q", head[:8])[0] <= MAX_SAFETENSORS_HEADER and head[8:9] == b"{":
        return
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise DataError(f"Model file {path} is a pickle/zip archive, not safetensors. {refuse}")
    raise DataError(f"Model file {path} is not a safetensors file. {refuse}")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict on CPU (refusing pickles, see ``find_model_path``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(Path(path))
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise DataError(f"Model file {path} is corrupt ({exc}). Re-train this split.") from exc
