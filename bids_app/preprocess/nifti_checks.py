"""Input checks for NIfTI images before any processing: one clear error per defect.

:func:`load_checked_nifti` reads the whole file once and rejects what would make preprocessing silently wrong
or exhaust the memory:

- a corrupt ``.nii.gz``: the whole gzip stream is decompressed with :mod:`zlib`, which checks its CRC-32 and
  length (nibabel does not: it stops reading once it has the voxels), and the image is built from those bytes;
  a truncated stream fails here, not in the middle of a registration;
- a header that cannot describe one brain image: a voxel size (``pixdim[1..3]``) that is zero, negative or
  not finite (nibabel would silently read 0 as 1 mm), more than ``MAX_VOXELS_PER_AXIS`` voxels along a spatial
  axis or more than ``MAX_DATA_BYTES`` of header and voxel data; both refused from the header, before the
  voxels are read, decompressed or allocated;
- a file or gzip stream longer than its header implies (a gzip bomb: a small file that would fill the memory),
  refused as soon as the bytes read pass the header's size plus ``MAX_TRAILING_BYTES``;
- images that are not 3D, NaN or infinite voxels, a constant image, voxel sizes outside 0.1–10 mm, and a missing
  or singular orientation (both ``qform_code`` and ``sform_code`` 0, which makes nibabel guess the orientation).
"""

from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from bids_app.errors import DataError, InputMissingError

logger = logging.getLogger(__name__)

MIN_VOXEL_MM = 0.1
MAX_VOXEL_MM = 10.0
MIN_EXTENT_VOXELS = 4  # an axis shorter than this is a slice stack, not a volume
MIN_ABS_DETERMINANT = 1e-6  # mm³ per voxel; below it the affine cannot be inverted reliably
# Limits of one image, checked on its header before any voxel is read: 1024 voxels span 10 cm at 0.1 mm, and a
# 1 mm 256³ head in float64 is 128 MiB.
MAX_VOXELS_PER_AXIS = 1024
MAX_DATA_BYTES = 2 * 1024**3
MAX_TRAILING_BYTES = 1024**2  # bytes tolerated after the voxel data the header describes
GZIP_MAGIC = b"\x1f\x8b"
HEAD_BYTES = 64 * 1024  # compressed bytes read first: enough to decompress any NIfTI header
READ_FIX = "Re-export or re-download the image (e.g. with dcm2niix) and check that the copy is complete."


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis in mm: the column norms of the affine's 3x3 part."""
    sizes = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


def describe_grid(shape: tuple[int, ...], affine: np.ndarray) -> str:
    """``shape (X, Y, Z), voxel size (a, b, c) mm`` for error messages."""
    sizes = tuple(round(v, 3) for v in voxel_sizes(affine))
    return f"shape {tuple(int(n) for n in shape)}, voxel size {sizes} mm"


def _raw_header(head: bytes) -> nib.Nifti1Header | nib.Nifti2Header | None:
    """The single-file NIfTI-1 or NIfTI-2 header at the start of ``head`` as written (nothing fixed), else None."""
    for klass, magic in ((nib.Nifti1Header, b"n+1"), (nib.Nifti2Header, b"n+2")):
        size = klass.template_dtype.itemsize
        if len(head) < size:
            continue
        header = klass(head[:size], check=False)
        if int(header["sizeof_hdr"]) == size and bytes(header["magic"]).startswith(magic):
            return header
    return None


def _format_bytes(n_bytes: int) -> str:
    return f"{n_bytes / 1024**3:.1f} GiB" if n_bytes >= 1024**3 else f"{n_bytes / 1024**2:.1f} MiB"


def _check_header(path: Path, kind: str, header: nib.Nifti1Header | nib.Nifti2Header) -> int:
    """Refuse a header that cannot describe one brain image; return the file size it implies in bytes."""
    try:
        shape = header.get_data_shape()
        dtype = header.get_data_dtype()
    except HeaderDataError as exc:
        raise DataError(f"{kind} image {path} has an invalid header ({exc}). {READ_FIX}") from None
    pixdim = [float(v) for v in header["pixdim"][1 : 1 + min(len(shape), 3)]]
    bad = [(axis, v) for axis, v in enumerate(pixdim, start=1) if not (math.isfinite(v) and v > 0)]
    if bad:
        named = ", ".join(f"pixdim[{axis}] = {value}" for axis, value in bad)
        raise DataError(
            f"{kind} image {path} has an invalid voxel size in its header ({named}; pixdim[1..3] = "
            f"{tuple(pixdim)}): a voxel size must be a positive, finite number of mm. "
            "Check the conversion from DICOM (re-convert with dcm2niix) or set the voxel size (e.g. nibabel's "
            "header.set_zooms)."
        )
    n_bytes = math.prod(shape) * dtype.itemsize
    offset = int(header["vox_offset"])
    if max(shape[:3], default=0) > MAX_VOXELS_PER_AXIS or offset < 0 or offset + n_bytes > MAX_DATA_BYTES:
        raise DataError(
            f"{kind} image {path} claims shape {tuple(shape)} of {dtype.name} ({_format_bytes(n_bytes)} of voxel "
            f"data at byte {offset}): above the limit of {MAX_VOXELS_PER_AXIS} voxels per axis and "
            f"{_format_bytes(MAX_DATA_BYTES)} for one image, so it is not read. Its header is wrong or the file is "
            "not one brain image (a gzip bomb?): check the conversion, or re-export the image."
        )
    return offset + n_bytes


def _longer_than_header(path: Path, kind: str, what: str, expected: int) -> DataError:
    return DataError(
        f"{kind} image {path} {what}, while its header implies {_format_bytes(expected)}: the file holds more than "
        f"the image (a gzip bomb or a corrupt file), so it is not read. {READ_FIX}"
    )


def _gunzip(path: Path, kind: str, compressed: bytes, expected: int) -> bytes:
    """Every gzip member of ``compressed``, decompressed with its CRC-32 and length checked by zlib.

    Stops (DataError) once more than ``expected + MAX_TRAILING_BYTES`` bytes come out: the header said how
    much there is, so a larger stream is never held in memory.
    """
    limit = expected + MAX_TRAILING_BYTES
    parts: list[bytes] = []
    total, rest = 0, compressed
    while rest:
        stream = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)  # gzip wrapper: CRC-32 and length checked at its end
        try:
            part = stream.decompress(rest, limit + 1 - total)
        except zlib.error as exc:
            raise DataError(
                f"Cannot read {kind} image {path}: the file is corrupt (its gzip stream fails zlib's checks, gzip "
                f"CRC or data: {exc}). {READ_FIX}"
            ) from None
        parts.append(part)
        total += len(part)
        if total > limit:
            raise _longer_than_header(path, kind, f"decompresses to more than {_format_bytes(limit)}", expected)
        if not stream.eof:
            raise DataError(
                f"Cannot read the voxels of {kind} image {path} (truncated or corrupted?): its gzip stream ends "
                f"before its end marker and gzip CRC, so the file is an incomplete copy or corrupt. {READ_FIX}"
            )
        rest = stream.unused_data
        if rest and not rest.startswith(GZIP_MAGIC):
            if rest.strip(b"\0"):
                raise DataError(
                    f"Cannot read {kind} image {path}: the file is corrupt ({len(rest)} byte(s) that are not gzip "
                    f"follow the gzip stream). {READ_FIX}"
                )
            break  # zero padding after the stream, as gzip allows
    return b"".join(parts)


def _read_nifti_bytes(path: Path, kind: str) -> tuple[type[nib.Nifti1Image], bytes] | None:
    """The image class and the whole decompressed file, read once and checked; None when it is not NIfTI."""
    with path.open("rb") as file:
        start = file.read(HEAD_BYTES)
        compressed = start.startswith(GZIP_MAGIC)
        try:
            head = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16).decompress(start, 1024) if compressed else start
        except zlib.error as exc:
            raise DataError(f"Cannot read {kind} image {path}: the file is corrupt ({exc}). {READ_FIX}") from None
        header = _raw_header(head)
        if header is None:
            return None  # not a single-file NIfTI: nibabel says what it is
        expected = _check_header(path, kind, header)
        # gzip adds a few bytes per 16 KiB to incompressible data; a longer file holds more than the image
        max_file_bytes = expected + expected // 64 + MAX_TRAILING_BYTES
        file.seek(0)
        blob = file.read(max_file_bytes + 1)
    if len(blob) > max_file_bytes:
        raise _longer_than_header(path, kind, f"is {_format_bytes(path.stat().st_size)}", expected)
    if compressed:
        blob = _gunzip(path, kind, blob, expected)
    if len(blob) < expected:
        raise DataError(
            f"Cannot read the voxels of {kind} image {path} (truncated or corrupted?): it holds {len(blob)} bytes "
            f"where its header (shape {tuple(header.get_data_shape())} of {header.get_data_dtype().name}) needs "
            f"{expected}. {READ_FIX}"
        )
    return (nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image), blob


def _read(path: Path, kind: str) -> tuple[nib.Nifti1Image | nib.Nifti2Image, np.ndarray]:
    """Header and float32 data of ``path``; every reading failure becomes a DataError naming the file."""
    if not path.is_file():
        raise InputMissingError(f"{kind} image {path} does not exist. Check the path.")
    try:
        checked = _read_nifti_bytes(path, kind)
        image = nib.load(path) if checked is None else checked[0].from_bytes(checked[1])
    except (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"Cannot read {kind} image {path}: {exc}. {READ_FIX}") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise DataError(
            f"{kind} image {path} is a {type(image).__name__}, not a NIfTI image. Convert it to .nii.gz (e.g. with "
            "nibabel or mri_convert)."
        )
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except (HeaderDataError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(
            f"Cannot read the voxels of {kind} image {path} (truncated or corrupted?): {exc}. {READ_FIX}"
        ) from None
    return image, data


def _check_shape(path: Path, kind: str, data: np.ndarray) -> np.ndarray:
    """Return a 3D array: trailing singleton axes are dropped, anything else that is not 3D raises."""
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise DataError(
            f"{kind} image {path} is {len(shape)}D with shape {shape}; a 3D volume is expected. Pass a single "
            "volume (e.g. one run, or the average of the frames for a static PET)."
        )
    if data.ndim < 3 or min(data.shape) < MIN_EXTENT_VOXELS:
        raise DataError(
            f"{kind} image {path} has shape {shape}: it is 2D (or a stack of fewer than {MIN_EXTENT_VOXELS} slices), "
            "a 3D volume is expected. Check the conversion from DICOM (all slices must be in one file)."
        )
    if data.ndim != len(shape):
        logger.debug("%s: dropped trailing singleton axes of shape %s", path, shape)
    return data


def _check_values(path: Path, kind: str, data: np.ndarray) -> None:
    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(data.size - finite.sum()) - n_nan
        raise DataError(
            f"{kind} image {path} contains {n_nan} NaN and {n_inf} infinite voxel(s). Replace them (e.g. "
            "`fslmaths in -nan out`, or numpy.nan_to_num) or re-export the image."
        )
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise DataError(
            f"{kind} image {path} is constant (every voxel is {low}). Check the conversion from DICOM; "
            "the file holds no image."
        )


def _check_orientation(path: Path, kind: str, image: nib.Nifti1Image | nib.Nifti2Image) -> np.ndarray:
    """The image's affine, once its orientation codes and determinant are sound; raises otherwise."""
    header = image.header
    qform_code = int(header["qform_code"])
    sform_code = int(header["sform_code"])
    if qform_code == 0 and sform_code == 0:
        raise DataError(
            f"{kind} image {path} has no orientation (qform_code and sform_code are both 0), so left/right and "
            "voxel positions are unknown. Re-convert it from DICOM (dcm2niix writes both) or set a valid sform."
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    determinant = float(np.linalg.det(affine[:3, :3])) if np.isfinite(affine).all() else float("nan")
    if not np.isfinite(determinant) or abs(determinant) < MIN_ABS_DETERMINANT:
        raise DataError(
            f"{kind} image {path} has a singular or invalid affine (determinant {determinant:.3g}; "
            f"qform_code {qform_code}, sform_code {sform_code}):\n{np.array2string(affine[:3], precision=3)}\n"
            "Fix the header's sform/qform (e.g. re-convert from DICOM with dcm2niix)."
        )
    sizes = voxel_sizes(affine)
    if not all(MIN_VOXEL_MM <= s <= MAX_VOXEL_MM for s in sizes):
        raise DataError(
            f"{kind} image {path} has voxel size {tuple(round(s, 4) for s in sizes)} mm, outside "
            f"{MIN_VOXEL_MM}–{MAX_VOXEL_MM} mm. Check the header's units (xyzt_units must be mm) and pixdim, "
            "or re-convert the image."
        )
    return affine


def load_checked_nifti(path: Path, kind: str = "T1w") -> nib.Nifti1Image:
    """Load a 3D NIfTI image fully into memory after checking that it can be preprocessed.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        kind: what the image is (``"T1w"``, ``"pet"``, ``"template"``...), quoted in error messages.

    Returns:
        A NIfTI-1 image with float32 data of shape (X, Y, Z) in memory, the input's affine (mm) and header
        (qform and sform kept; a 4D image with one volume is squeezed to 3D).

    Raises:
        InputMissingError: ``path`` does not exist.
        DataError: unreadable, truncated or corrupt file (gzip CRC or length), not NIfTI, a header voxel size
            (pixdim) that is not positive and finite, more than MAX_VOXELS_PER_AXIS voxels along an axis or
            MAX_DATA_BYTES of voxels, a gzip stream longer than its header implies, not 3D, NaN/Inf voxels,
            constant image, voxel size outside [MIN_VOXEL_MM, MAX_VOXEL_MM], no orientation or a singular affine.
    """
    path = Path(path)
    image, data = _read(path, kind)
    data = _check_shape(path, kind, data)
    affine = _check_orientation(path, kind, image)
    _check_values(path, kind, data)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    checked = nib.Nifti1Image(data, affine, header)
    for getter, setter in ((image.get_sform, checked.set_sform), (image.get_qform, checked.set_qform)):
        matrix, code = getter(coded=True)
        if code:
            setter(matrix, code=int(code))
        else:
            setter(None, code=0)
    checked.set_data_dtype(np.float32)
    return checked
