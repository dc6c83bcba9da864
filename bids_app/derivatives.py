"""Every output path of the derivative dataset, its shared metadata files, and atomic writes.

Layout of OUTPUT_DIR (a BIDS derivative dataset)::

    dataset_description.json  README  .bidsignore
    sub-<p>/[ses-<s>/]anat/sub-<p>[_ses-<s>]_space-<tpl>_desc-preproc_T1w.nii.gz (+ .json sidecar)
    sub-<p>/[ses-<s>/]anat/sub-<p>[_ses-<s>]_from-T1w_to-<tpl>_mode-image_xfm.mat
    sub-<p>/[ses-<s>/]pet/sub-<p>[_ses-<s>]_trc-<t>_space-<tpl>_desc-preproc_pet.nii.gz (+ .json)
    sub-<p>/[ses-<s>/]deeplearning/<prefix>_desc-<mode>_<suffix>.npy (+ .json)  one file per image per mode
    sub-<p>/[ses-<s>/]qc/<prefix>_desc-qc_<suffix>.json
    sub-<p>/figures/                         per-participant QC overlays and HTML report
    status/sub-<p>_status.tsv                one status table per participant (no shared writer)
    logs/<run-id>/                           per-run log, resolved config, environment record
    models/<name>/                           the MAPS (group level)

Every file is written to a temporary name in its destination folder and renamed into place, so a killed
process never leaves a file that looks complete; shared files (dataset_description.json, README,
.bidsignore) are rewritten with identical content by concurrent participant jobs, which is race-free.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bids_app.errors import IOFailure, OutputError
from bids_app.kinds import ANATOMICAL_SUFFIXES, PET_SUFFIX

log = logging.getLogger(__name__)

APP_NAME = "bids_app"
CODE_URL = "https://github.com/bids-apps/bids_app"
BIDS_VERSION = "1.10.0"
CONTAINER_ENV = "BIDS_APP_CONTAINER"  # set in the image: "<type>:<tag>", e.g. "docker:bids_app:0.1.0"
SHARED_TEMPORARY_AGE_S = 600.0  # a temporary in OUTPUT_DIR's shared folders older than this is a dead writer's
NIFTI_CHUNK_BYTES = 1 << 20  # uncompressed bytes handed to zlib at a time

# Folders and files that are not BIDS (the validator would report NOT_INCLUDED). No trailing slashes.
BIDSIGNORE_ENTRIES = (
    "status",
    "models",
    "mlruns",
    "work",
    "sub-*/deeplearning",
    "sub-*/ses-*/deeplearning",
    "sub-*/qc",
    "sub-*/ses-*/qc",
    "sub-*/maps",  # --custom-map images: no BIDS datatype holds them
    "sub-*/ses-*/maps",
    "sub-*/figures",
    "sub-*/*.html",
    "*_xfm.mat",
    "participant_status.tsv",
    "qc_summary.tsv",
)


def _file_mode() -> int:
    """Mode of a normal new file under the current umask (mkstemp would make it owner-only 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# errno values that mean "this output cannot be created here" (exit 73) rather than "the disk failed" (exit 74).
_CANNOT_CREATE = {
    errno.EROFS: "OUTPUT_DIR is on a read-only file system: mount it read-write or choose another OUTPUT_DIR.",
    errno.EACCES: "Check the permissions of {folder} (the user running bids_app must be able to write there), "
    "or choose another OUTPUT_DIR.",
    errno.EPERM: "Check the permissions of {folder} (the user running bids_app must be able to write there), "
    "or choose another OUTPUT_DIR.",
    errno.ENOTDIR: "A file stands where a folder of the output should be: move it away or choose another OUTPUT_DIR.",
    errno.EEXIST: "Something else stands at that path: move it away or choose another OUTPUT_DIR.",
    errno.EISDIR: "A folder stands where a file of the output should be: move it away or choose another OUTPUT_DIR.",
    errno.ENAMETOOLONG: "The path is too long for the file system: choose a shorter OUTPUT_DIR.",
}
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def explain_write_error(exc: OSError, path: Path, action: str = "write") -> OutputError | IOFailure:
    """The expected failure that an ``OSError`` raised while writing ``path`` (into OUTPUT_DIR) stands for.

    Args:
        exc: what the write raised; an ``OutputError`` or ``IOFailure`` is returned unchanged.
        path: the file or folder that was being written (the final name, not a temporary's).
        action: what failed, in the message: ``write`` (a file) or ``create folder``.

    Returns:
        ``OutputError`` (exit 73) for a permission denied, a read-only file system or something in the way;
        ``IOFailure`` (exit 74) for a full disk or quota (``ENOSPC``, ``EDQUOT``), a device error (``EIO``) and
        any other error. One line naming ``path``, the error and the fix.
    """
    if isinstance(exc, OutputError | IOFailure):
        return exc
    reason = exc.strerror or str(exc)
    name = errno.errorcode.get(exc.errno) if exc.errno else None
    what = f"{reason} ({name})" if name else reason
    fix = _CANNOT_CREATE.get(exc.errno) if exc.errno else None
    if fix is None and isinstance(exc, PermissionError):
        fix = _CANNOT_CREATE[errno.EACCES]
    if fix is not None:
        return OutputError(f"Cannot {action} {path}: {what}. {fix.format(folder=Path(path).parent)}")
    if exc.errno in _NO_SPACE:
        return IOFailure(
            f"Cannot {action} {path}: {what}. Check free space on the output disk (and the quota), free some, then "
            "re-run (completed outputs are kept)."
        )
    return IOFailure(
        f"Cannot {action} {path}: {what}. Check the output disk (free space, file size limits, device errors in the "
        "system log), then re-run (completed outputs are kept)."
    )


@contextlib.contextmanager
def naming_write_errors(path: Path, action: str = "write") -> Iterator[None]:
    """Turn an ``OSError`` of the block into ``explain_write_error(exc, path, action)`` (ours pass unchanged)."""
    try:
        yield
    except (OutputError, IOFailure):
        raise
    except OSError as exc:
        raise explain_write_error(exc, path, action) from exc


def make_dirs(folder: Path) -> None:
    """``folder.mkdir(parents=True, exist_ok=True)``; OutputError or IOFailure naming ``folder`` if it fails."""
    with naming_write_errors(folder, "create folder"):
        Path(folder).mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffixes (``.nii.gz``, ``.npy``) so writers that infer the format
    from the name behave. On any exception the temporary file is removed and ``path`` is untouched.

    Raises:
        OutputError: the folder or the file cannot be created (permissions, read-only file system).
        IOFailure: the disk is full or failed (an ``OSError`` raised by the block included).
    """
    path = Path(path)
    make_dirs(path.parent)
    suffix = "".join(path.suffixes)
    with naming_write_errors(path):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with naming_write_errors(path):
            yield tmp
            os.chmod(tmp, _file_mode())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: Path, min_age_s: float = 0.0, recursive: bool = True) -> list[Path]:
    """Delete temporary files that a killed writer left under ``folder`` (hidden ``.<name>.*.tmp*``).

    With ``min_age_s == 0`` call it only where no other live process writes (a participant's own folder at
    the start of its job); in shared folders pass an age no live writer's temporary can reach.
    """
    if not folder.is_dir():
        return []
    candidates = folder.rglob(".*.tmp*") if recursive else folder.glob(".*.tmp*")
    now = time.time()
    stale = []
    for path in candidates:
        try:
            if path.is_file() and now - path.stat().st_mtime >= min_age_s:
                path.unlink(missing_ok=True)
                stale.append(path)
        except FileNotFoundError:  # its writer renamed it meanwhile
            continue
        except OSError as exc:
            raise explain_write_error(exc, path, "remove the stale temporary") from exc
    return stale


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsync'd before the rename)."""
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_nifti(path: Path, image: Any) -> str:
    """Write a NIfTI image to ``path`` (``.nii.gz``) atomically; return the sha256 of the file's bytes.

    The gzip stream is zlib's level 1 with the run-length strategy (``Z_RLE``): on a 1 mm float32 image (169 x 208
    x 179, 25 MB) it takes half the time of nibabel's own level-1 writer (0.11 s against 0.21 s) for a file a
    few percent smaller, and any gzip reader reads it. The header carries no time stamp (mtime 0), so the same
    image gives the same bytes. The checksum is computed from the bytes as they are written (the file is not read
    back) and the file is fsync'd before the rename.

    Args:
        path: the destination, ending in ``.nii.gz``.
        image: a ``nibabel.Nifti1Image`` (or any image with ``to_bytes()`` giving a single-file NIfTI).

    Raises:
        OutputError, IOFailure: the file cannot be written.
    """
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31, 9, zlib.Z_RLE)  # wbits 31: a gzip header and trailer
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        for payload in _nifti_parts(image):
            for start in range(0, len(payload), NIFTI_CHUNK_BYTES):
                block = compressor.compress(payload[start : start + NIFTI_CHUNK_BYTES])
                digest.update(block)
                handle.write(block)
        block = compressor.flush()
        digest.update(block)
        handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    return digest.hexdigest()


def _nifti_parts(image: Any) -> list[memoryview]:
    """The bytes of ``image.to_bytes()`` in parts: header, then voxels in Fortran order.

    An image whose voxels are an in-memory float array already in the header's dtype (no scaling), with no header
    extension, is the common case (every preprocessed image): its voxels are handed over as a view of the array
    (copied only to reorder a C-ordered one) instead of nibabel's chunked copy; the header says slope 1 and
    intercept 0, as nibabel writes it. Anything else goes through ``to_bytes``.
    """
    import numpy as np

    data = image.dataobj
    header = image.header
    if not (
        isinstance(data, np.ndarray)
        and data.dtype.kind == "f"
        and data.dtype == header.get_data_dtype()
        and not header.extensions
        and data.shape == image.shape
    ):
        return [memoryview(image.to_bytes())]
    image.update_header()
    header = image.header.copy()
    header.set_slope_inter(1.0, 0.0)
    buffer = io.BytesIO()
    header.write_to(buffer)
    head = buffer.getvalue()
    head += b"\0" * (int(header["vox_offset"]) - len(head))
    voxels = np.asfortranarray(data).reshape(-1, order="F")
    return [memoryview(head), voxels.view(np.uint8).data]


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def entity_prefix(participant_label: str, session_label: str | None) -> str:
    """``sub-01_ses-M000`` (or ``sub-01`` without sessions)."""
    prefix = f"sub-{participant_label}"
    return f"{prefix}_ses-{session_label}" if session_label else prefix


def subject_dir(output_dir: Path, participant_label: str, session_label: str | None) -> Path:
    """``OUTPUT/sub-01/ses-M000`` (or ``OUTPUT/sub-01``)."""
    base = output_dir / f"sub-{participant_label}"
    return base / f"ses-{session_label}" if session_label else base


def image_stem(participant_label: str, session_label: str | None, extra_entities: str = "") -> str:
    """Entity prefix plus extra entities (e.g. ``trc-FDG``), without space/desc/suffix."""
    prefix = entity_prefix(participant_label, session_label)
    return f"{prefix}_{extra_entities}" if extra_entities else prefix


def preproc_path(
    output_dir: Path,
    participant_label: str,
    session_label: str | None,
    space: str,
    suffix: str,
    extra: str = "",
) -> Path:
    """Preprocessed image: ``<sub>/[ses]/<anat|pet|maps>/<stem>_space-<tpl>_desc-preproc_<suffix>.nii.gz``.

    ``maps/`` (in ``.bidsignore``) holds the ``--custom-map`` images, whose suffix is the map's name.
    """
    datatype = "pet" if suffix == PET_SUFFIX else "anat" if suffix in ANATOMICAL_SUFFIXES else "maps"
    stem = image_stem(participant_label, session_label, extra)
    folder = subject_dir(output_dir, participant_label, session_label) / datatype
    return folder / f"{stem}_space-{space}_desc-preproc_{suffix}.nii.gz"


def transform_path(output_dir: Path, participant_label: str, session_label: str | None, space: str) -> Path:
    """Affine from native T1w to the template (ANTs ``.mat``)."""
    stem = entity_prefix(participant_label, session_label)
    folder = subject_dir(output_dir, participant_label, session_label) / "anat"
    return folder / f"{stem}_from-T1w_to-{space}_mode-image_xfm.mat"


def tensor_path(
    output_dir: Path,
    participant_label: str,
    session_label: str | None,
    space: str,
    mode: str,
    suffix: str,
    extra: str = "",
) -> Path:
    """One tensor file per image per mode: ``.../deeplearning/<stem>_space-<tpl>_desc-<mode>_<suffix>.npy``."""
    stem = image_stem(participant_label, session_label, extra)
    folder = subject_dir(output_dir, participant_label, session_label) / "deeplearning"
    return folder / f"{stem}_space-{space}_desc-{mode}_{suffix}.npy"


def qc_path(output_dir: Path, participant_label: str, session_label: str | None, suffix: str, extra: str = "") -> Path:
    stem = image_stem(participant_label, session_label, extra)
    folder = subject_dir(output_dir, participant_label, session_label) / "qc"
    return folder / f"{stem}_desc-qc_{suffix}.json"


def figures_dir(output_dir: Path, participant_label: str) -> Path:
    return output_dir / f"sub-{participant_label}" / "figures"


def report_path(output_dir: Path, participant_label: str) -> Path:
    return output_dir / f"sub-{participant_label}" / f"sub-{participant_label}_report.html"


def status_path(output_dir: Path, participant_label: str) -> Path:
    return output_dir / "status" / f"sub-{participant_label}_status.tsv"


def sidecar_path(path: Path) -> Path:
    """``x.nii.gz`` / ``x.npy`` → ``x.json``."""
    name = path.name
    for ext in (".nii.gz", ".nii", ".npy", ".mat"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_suffix(".json")


def dataset_description(bids_dir: Path, version: str, source_description: dict[str, Any] | None) -> dict[str, Any]:
    """The derivative's ``dataset_description.json`` content (deterministic for a given input)."""
    generated_by: dict[str, Any] = {"Name": APP_NAME, "Version": version, "CodeURL": CODE_URL}
    container = os.environ.get(CONTAINER_ENV)
    if container:
        kind, _, tag = container.partition(":")
        generated_by["Container"] = {"Type": kind, "Tag": tag}
    source: dict[str, Any] = {"URL": bids_dir.resolve().as_uri()}
    if source_description:
        for key in ("DatasetDOI", "Name"):
            if source_description.get(key):
                source["DOI" if key == "DatasetDOI" else "Name"] = source_description[key]
        if source_description.get("DatasetVersion"):
            source["Version"] = source_description["DatasetVersion"]
    source.pop("Name", None)  # not a SourceDatasets field
    return {
        "Name": f"{APP_NAME} derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": bids_dir.resolve().as_uri()},
    }


README_TEXT = """# bids_app derivatives

Generated by bids_app {version}. Participant level: images preprocessed to template space
(`anat/`, `pet/`), tensors per extraction mode (`deeplearning/`, one `.npy` per image per mode with a JSON
sidecar), QC records (`qc/`) and per-participant HTML reports. Group level: model folders (MAPS) under
`models/`. `logs/<run-id>/` holds each run's log, resolved configuration and environment record; pass its
`config.toml` to `--config` to re-run. Non-BIDS files are listed in `.bidsignore`.
"""


def check_output_dir(output_dir: Path, bids_dir: Path) -> None:
    """Refuse an OUTPUT_DIR that belongs to another pipeline or was made from another BIDS_DIR.

    bids_app writes ``dataset_description.json``, ``README.md`` and ``.bidsignore`` into OUTPUT_DIR and its
    tensors under ``sub-*``: another tool's derivative, or the outputs of another dataset (whose participants are
    probably also called ``sub-001``), would be overwritten.

    Raises:
        UsageError: the folder's description names another pipeline or another source dataset, or the folder
            holds a README/.bidsignore but no description.
    """
    import urllib.parse

    from bids_app.errors import UsageError

    description_path = output_dir / "dataset_description.json"
    fix = f"Choose another OUTPUT_DIR (e.g. {output_dir.parent / 'bids_app'}) or an empty folder."
    if not description_path.is_file():
        foreign = [name for name in ("README.md", ".bidsignore", "README") if (output_dir / name).exists()]
        if foreign:
            raise UsageError(
                f"OUTPUT_DIR {output_dir} holds {', '.join(foreign)} but no dataset_description.json: it is not a "
                f"bids_app output and its files would be overwritten. {fix}"
            )
        return
    try:
        description = json.loads(description_path.read_text(encoding="utf-8"))
        generated_by = [str(g.get("Name", "")) for g in description.get("GeneratedBy", [])]
        raw_link = str(description.get("DatasetLinks", {}).get("raw", ""))
    except (OSError, ValueError, AttributeError, TypeError):
        raise UsageError(f"OUTPUT_DIR {output_dir} has an unreadable dataset_description.json. {fix}") from None
    if generated_by[:1] != [APP_NAME]:
        raise UsageError(
            f"OUTPUT_DIR {output_dir} is the derivative of another pipeline (GeneratedBy: "
            f"{', '.join(generated_by) or 'none'}); bids_app would overwrite its files. {fix}"
        )
    if raw_link.startswith("file:"):
        recorded = Path(urllib.parse.unquote(urllib.parse.urlparse(raw_link).path))
        if recorded != bids_dir.resolve() and recorded.is_dir():
            raise UsageError(
                f"OUTPUT_DIR {output_dir} holds the outputs of BIDS_DIR {recorded}, not of {bids_dir.resolve()}: "
                f"their participants would be mixed (or replaced) and its models would read the wrong tensors. {fix}"
            )
        if recorded != bids_dir.resolve():
            log.warning("OUTPUT_DIR %s was made from %s, which no longer exists; taking %s as its BIDS_DIR (moved?).",
                        output_dir, recorded, bids_dir.resolve())  # fmt: skip


def init_derivative(output_dir: Path, bids_dir: Path, version: str) -> None:
    """Create OUTPUT_DIR's shared files (idempotent; concurrent callers write identical bytes)."""
    make_dirs(output_dir)
    source_description = None
    src = bids_dir / "dataset_description.json"
    if src.is_file():
        try:
            source_description = json.loads(src.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            source_description = None
    atomic_write_json(
        output_dir / "dataset_description.json", dataset_description(bids_dir, version, source_description)
    )
    atomic_write_text(output_dir / "README.md", README_TEXT.format(version=version))
    atomic_write_text(output_dir / ".bidsignore", "\n".join(BIDSIGNORE_ENTRIES) + "\n")
    # A job killed while writing a shared file leaves its temporary; other jobs' take milliseconds to rename.
    for folder in (output_dir, output_dir / "status"):
        remove_stale_temporaries(folder, min_age_s=SHARED_TEMPORARY_AGE_S, recursive=False)


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def config_hash(obj: Any) -> str:
    """Short stable hash of a JSON-able description of how an output was made."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_complete_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar of ``path`` if both exist and the sidecar says ``Complete``; else None."""
    sidecar = sidecar_path(path)
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    return data if isinstance(data, dict) and data.get("Complete") is True else None


def bids_uri(bids_dir: Path, path: Path) -> str | None:
    """``bids:raw:sub-01/anat/...`` for a file inside the raw dataset, else None."""
    try:
        relative = path.resolve().relative_to(bids_dir.resolve())
    except ValueError:
        return None
    return f"bids:raw:{relative.as_posix()}"


def explain_environment_error(exc: OSError) -> OutputError | IOFailure | None:
    """An ``OSError`` only the machine causes (read-only file system, full disk or quota, device error) that a
    writer let through, as the error it stands for; None for any other (a bug keeps its traceback)."""
    where = Path(exc.filename) if exc.filename else Path("(a file of the output)")
    if exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        return explain_write_error(exc, where)
    if exc.errno == errno.EIO:
        return IOFailure(
            f"I/O error on {where}: {exc.strerror} (EIO). Check the disk (device errors in the system log), then "
            "re-run (completed outputs are kept)."
        )
    return None
