"""Tensor files: one ``.npy`` per image per mode plus a JSON sidecar that vouches for it.

The ``.npy`` is written without pickle and read back with ``allow_pickle=False``, memory-mapped by default,
so a data loader reads only the pages of the part (patch, slice, region) it indexes.

Write order makes an interrupted write detectable: an existing sidecar is removed first, the tensor is
renamed into place, and only then is the sidecar (``"Complete": true`` as its last key, ``Shape`` and
``Dtype`` describing the tensor, ``TensorSHA256`` the file's bytes) renamed into place. A tensor whose sidecar
is missing, incomplete or disagrees with the file's shape or dtype is not trusted; its checksum is compared by
``data.tables.verify_tensors`` (once per group run: hashing every read would cost too much).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bids_app.derivatives import atomic_path, atomic_write_json, naming_write_errors, sidecar_path
from bids_app.errors import DataError, InputMissingError, IOFailure

STORED_DTYPES = ("float32", "float16")
SIDECAR_KEYS_SET_HERE = ("TensorSHA256", "Shape", "Dtype", "Complete")


def write_tensor(path: Path, array: np.ndarray, sidecar: Mapping[str, Any]) -> None:
    """Write ``array`` to ``path`` (``.npy``) and its sidecar, each atomically, sidecar last.

    The sidecar records ``TensorSHA256``, the sha256 of the ``.npy`` file's bytes, computed from the bytes as
    they are written (the file is not read back): ``data.tables.verify_tensors`` compares it with the file.

    Args:
        path: destination ``.npy`` (see ``derivatives.tensor_path``).
        array: float32 or float16 tensor, e.g. ``(n_parts, 1, ...)``.
        sidecar: metadata (mode, parameters, sources...); ``TensorSHA256``, ``Shape``, ``Dtype`` and ``Complete``
            are set here.

    Raises:
        ValueError: ``array`` is not float32/float16 (a programming error).
        OutputError, IOFailure: the files cannot be written.
    """
    path = Path(path)
    if array.dtype.name not in STORED_DTYPES:
        raise ValueError(f"tensors are stored as {' or '.join(STORED_DTYPES)}, got dtype {array.dtype}")
    json_path = sidecar_path(path)
    with naming_write_errors(json_path):
        # Otherwise a kill after the new tensor lands would pair it with the old, complete sidecar.
        json_path.unlink(missing_ok=True)
    contiguous = np.ascontiguousarray(array)
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        for block in _npy_blocks(contiguous):
            digest.update(block)
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    content = {key: value for key, value in sidecar.items() if key not in SIDECAR_KEYS_SET_HERE}
    content["TensorSHA256"] = digest.hexdigest()
    content["Shape"] = [int(v) for v in array.shape]
    content["Dtype"] = array.dtype.name
    content["Complete"] = True
    atomic_write_json(json_path, content)


def _npy_blocks(array: np.ndarray) -> tuple[bytes, memoryview]:
    """The bytes of ``np.save(file, array)``: the ``.npy`` header, then the C-ordered data (not copied)."""
    header = io.BytesIO()
    fields = np.lib.format.header_data_from_array_1_0(array)
    try:
        np.lib.format.write_array_header_1_0(header, fields)
    except ValueError:  # a header over 64 KiB (never for our shapes): format 2.0, as np.save would choose
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, fields)
    return header.getvalue(), array.reshape(-1).view(np.uint8).data


def read_sidecar(path: Path) -> dict[str, Any]:
    """Read the JSON sidecar of a tensor.

    Args:
        path: the tensor's ``.npy`` path or the sidecar's ``.json`` path.

    Raises:
        InputMissingError: the sidecar does not exist.
        DataError: the sidecar is not a JSON object.
    """
    json_path = sidecar_path(Path(path))
    try:
        content = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputMissingError(
            f"Tensor sidecar {json_path} does not exist. Re-run the participant level for this image."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"Tensor sidecar {json_path} is not valid JSON ({exc}). Re-run the participant level.") from exc
    except OSError as exc:
        raise IOFailure(f"Cannot read tensor sidecar {json_path}: {exc}.") from exc
    if not isinstance(content, dict):
        raise DataError(f"Tensor sidecar {json_path} is not a JSON object. Re-run the participant level.")
    return content


_REDO = "Re-run the participant level for this image (an interrupted run leaves the tensor untrusted)."


def _trusted_sidecar(path: Path) -> dict[str, Any]:
    """The sidecar of an existing tensor, provided it says ``Complete``."""
    if not path.is_file():
        raise InputMissingError(f"Tensor {path} does not exist. Run the participant level for this image.")
    try:
        sidecar = read_sidecar(path)
    except InputMissingError:
        raise DataError(f"Tensor {path} has no sidecar {sidecar_path(path)}. {_REDO}") from None
    if sidecar.get("Complete") is not True:
        raise DataError(f"Tensor {path} is not marked Complete in {sidecar_path(path)}. {_REDO}")
    return sidecar


def _check_matches(path: Path, sidecar: Mapping[str, Any], shape: tuple[int, ...], dtype: np.dtype) -> None:
    if list(shape) != sidecar.get("Shape") or dtype.name != sidecar.get("Dtype"):
        raise DataError(
            f"Tensor {path} has shape {list(shape)} and dtype {dtype.name} but its sidecar says "
            f"{sidecar.get('Shape')} and {sidecar.get('Dtype')}. {_REDO}"
        )


def load_tensor(path: Path, *, mmap: bool = True) -> np.ndarray:
    """Load a tensor written by :func:`write_tensor` after checking its sidecar.

    Args:
        path: the ``.npy`` file.
        mmap: memory-map read-only (only the indexed parts are read from disk, plus the kernel's read-ahead)
            instead of reading it all. To read one part with exactly its bytes, use :func:`load_part`.

    Returns:
        The stored array (an ``np.memmap`` when ``mmap``), shape and dtype as recorded in the sidecar.

    Raises:
        InputMissingError: the tensor file does not exist.
        DataError: the sidecar is missing or not ``Complete``, the file is not a plain numeric ``.npy``
            (object arrays are refused, pickle is never used), or its shape/dtype differ from the sidecar's.
    """
    path = Path(path)
    sidecar = _trusted_sidecar(path)
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise DataError(f"Tensor {path} is not a readable numeric .npy file ({exc}). {_REDO}") from exc
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise DataError(f"Tensor {path} is not a single .npy array. {_REDO}")
    _check_matches(path, sidecar, array.shape, array.dtype)
    return array


def load_part(path: Path, index: int) -> np.ndarray:
    """Read one part (patch, slice, region) of a tensor: one ``pread`` of exactly its bytes.

    Unlike indexing a memory map, no read-ahead pulls neighbouring parts from disk, and nothing stays mapped,
    which suits data-loader workers reading parts in random order.

    Args:
        path: the ``.npy`` file written by :func:`write_tensor`.
        index: the part, ``0 <= index < n_parts``.

    Returns:
        A new writeable array of shape ``Shape[1:]`` (e.g. ``(1, P, P, P)`` for a patch), stored dtype.

    Raises:
        IndexError: ``index`` is out of range.
        InputMissingError, DataError: as :func:`load_tensor` (also for a truncated file).
    """
    path = Path(path)
    sidecar = _trusted_sidecar(path)
    with path.open("rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as exc:
            raise DataError(f"Tensor {path} is not a readable numeric .npy file ({exc}). {_REDO}") from exc
        if fortran_order or dtype.name not in STORED_DTYPES or not shape:
            raise DataError(f"Tensor {path} is not a C-ordered float32/float16 .npy array. {_REDO}")
        _check_matches(path, sidecar, shape, dtype)
        if not 0 <= index < shape[0]:
            raise IndexError(f"part {index} out of range for tensor {path} with {shape[0]} parts")
        part = np.empty(shape[1:], dtype=dtype)
        offset = handle.tell() + index * part.nbytes
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead beyond the part
        n_read = os.preadv(handle.fileno(), [part.data], offset)
    if n_read != part.nbytes:
        raise DataError(f"Tensor {path} is truncated (part {index} is incomplete). {_REDO}")
    return part


def is_tensor_complete(path: Path, expected: Mapping[str, Any] | None = None) -> bool:
    """Whether ``path`` holds a trusted tensor whose sidecar matches ``expected`` (for resuming runs).

    Args:
        path: the ``.npy`` file.
        expected: sidecar keys that must hold these values (e.g. ``ConfigHash``, ``SourceSHA256``).

    Returns:
        True when :func:`load_tensor` would accept the file and every ``expected`` item matches.
    """
    try:
        load_tensor(path, mmap=True)
        sidecar = read_sidecar(path)
    except (DataError, InputMissingError):
        return False
    return all(sidecar.get(key) == value for key, value in (expected or {}).items())
