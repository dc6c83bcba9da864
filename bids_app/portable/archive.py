"""The portable model file: a deterministic zip whose every member is checked before a byte is written.

Format (``FORMAT_VERSION`` 1): a zip of regular, non-executable files with fixed dates and modes, members in
sorted order, and ``manifest.json`` (the format version, the bids_app version that wrote it, and the SHA-256 and
size of every other member). The same members always give the same bytes, so an archive's own SHA-256 names a
model. Reading (``read_archive``) refuses, before anything is written:

- a member path that is absolute, climbs out (``..``), is not normalised, or is a folder entry;
- a symlink, device, FIFO, or a member with an executable, setuid or setgid mode bit;
- an encrypted member, or one compressed otherwise than stored or deflated (what ``write_archive`` writes);
- an archive without a member every model needs (``check_required``: the card, the model folder's record and
  split, the leak guard, at least one ``WEIGHTS_PATTERN`` file);
- a member the format does not know (``MEMBER_PATTERNS``), or one the manifest does not list, or the reverse;
- a member whose SHA-256 or size differs from the manifest's;
- pickled content: a pickle file name, pickle or zip (torch checkpoint) magic bytes, a text member that is not
  UTF-8, a JSON member that does not parse, a weights member that is not safetensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import stat
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from bids_app import read_version
from bids_app.derivatives import atomic_path
from bids_app.errors import DataError, InputMissingError

FORMAT_VERSION = 1
# Format version -> the bids_app version that introduced it (and reads it); an archive of another format is
# refused naming the bids_app version its manifest says wrote it.
READABLE_FORMATS = {1: "0.1.0"}
MANIFEST = "manifest.json"
CARD_MD = "MODEL_CARD.md"
CARD_JSON = "model_card.json"
GUARD_DIR = "leak_guard"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date zip stores: no clock in the bytes
FILE_MODE = 0o644
MAX_MEMBER_BYTES = 2**31  # 2 GiB: a larger declared size is refused before it is read (zip bombs)
MAX_TOTAL_BYTES = 2**33
MAX_SAFETENSORS_HEADER = 100_000_000
PICKLE_SUFFIXES = (".pt", ".pth", ".tar", ".pkl", ".pickle", ".ckpt", ".bin", ".npy", ".npz", ".joblib")

# Every member the format knows, as full-match patterns over the member path.
MEMBER_PATTERNS = tuple(
    re.compile(pattern)
    for pattern in (
        re.escape(MANIFEST),
        re.escape(CARD_MD),
        re.escape(CARD_JSON),
        r"maps\.json",
        r"environment\.json",
        r"excluded_sessions\.tsv",
        r"groups/splits\.json",
        r"groups/([A-Za-z0-9_+-]+/)*[A-Za-z0-9_+-]+\.tsv",
        r"split-\d+/training_logs/(summary\.json|training\.tsv)",
        r"split-\d+/best-[A-Za-z0-9_]+/(model\.safetensors|selection\.json|voting_weights\.tsv)",
        r"split-\d+/baseline/best-[A-Za-z0-9_]+/(model\.safetensors|selection\.json)",
        rf"{GUARD_DIR}/(images\.tsv|fingerprints\.json|fingerprints\.safetensors)",
    )
)
TEXT_SUFFIXES = (".json", ".tsv", ".md")
# What every model holds beside the model folder's record and split (``check_required``): without them it
# cannot be described or guarded (a missing one is named).
REQUIRED_MEMBERS = (CARD_MD, CARD_JSON, f"{GUARD_DIR}/images.tsv", f"{GUARD_DIR}/fingerprints.json")
WEIGHTS_PATTERN = re.compile(r"split-\d+/best-[A-Za-z0-9_]+/model\.safetensors")
COMPRESSIONS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}


@dataclasses.dataclass(frozen=True)
class Archive:
    """A verified archive held in memory.

    Attributes:
        path: the file read.
        sha256: the archive file's own SHA-256 (what a publisher quotes).
        manifest: the parsed ``manifest.json``.
        manifest_bytes: ``manifest.json`` as stored.
        members: member path -> bytes, every one checked against the manifest.
    """

    path: Path
    sha256: str
    manifest: dict[str, Any]
    manifest_bytes: bytes
    members: dict[str, bytes]

    def json(self, name: str) -> Any:
        return json.loads(self.members[name].decode("utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_archive(path: Path, members: Mapping[str, bytes], *, model_name: str) -> str:
    """Write ``members`` plus their manifest to ``path`` (atomically, deterministic bytes); return its SHA-256.

    Args:
        path: the archive to write.
        members: member path -> content; each path must be one the format knows (``MEMBER_PATTERNS``).
        model_name: the model folder's name, recorded in the manifest (the default name on import).
    """
    for name in members:
        check_member_name(name, Path(path))
    manifest = {
        "format": "bids_app portable model",
        "format_version": FORMAT_VERSION,
        "bids_app_version": read_version(),
        "model_name": model_name,
        "members": {name: {"sha256": sha256_bytes(data), "size": len(data)} for name, data in sorted(members.items())},
    }
    content = {**members, MANIFEST: (json.dumps(manifest, indent=2) + "\n").encode("utf-8")}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(content):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, so the mode bits below are read as such
            info.external_attr = (stat.S_IFREG | FILE_MODE) << 16
            archive.writestr(info, content[name], compresslevel=9)
    data = buffer.getvalue()
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)
    return sha256_bytes(data)


def check_member_name(name: str, where: Path) -> None:
    """DataError unless ``name`` is a relative, normalised path the format knows (pickle names called out)."""
    pure = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or name.startswith("/")
        or re.match(r"^[A-Za-z]:", name)
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise DataError(
            f"Archive {where} has member path {name!r}, which is absolute, climbs out with '..' or is not a "
            "plain relative path: it could write outside the destination. Refusing the whole archive; ask its "
            "author for a file made by bids_app-model export."
        )
    if pure.name.lower().endswith(PICKLE_SUFFIXES):
        raise DataError(
            f"Archive {where} holds {name!r}, a pickle/torch/numpy-object file: loading it could run code. "
            "Refusing the whole archive; model weights travel as safetensors only."
        )
    if not any(pattern.fullmatch(name) for pattern in MEMBER_PATTERNS):
        raise DataError(
            f"Archive {where} holds {name!r}, which a bids_app portable model does not contain. Refusing the "
            "whole archive (unknown members are not extracted); ask its author for a file made by "
            "bids_app-model export."
        )


def _check_info(info: zipfile.ZipInfo, where: Path) -> None:
    """Refuse a zip entry that is not a plain, non-executable file of a reasonable declared size."""
    if info.is_dir():
        raise DataError(f"Archive {where} holds a folder entry {info.filename!r}; the format has files only.")
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind not in (0, stat.S_IFREG):
        what = "a symlink" if kind == stat.S_IFLNK else "a device, FIFO or other special file"
        raise DataError(
            f"Archive {where}: member {info.filename!r} is {what} (mode {oct(mode)}). Refusing the whole archive; "
            "a portable model holds regular files only."
        )
    if mode & 0o7111:
        raise DataError(
            f"Archive {where}: member {info.filename!r} is executable or setuid/setgid (mode {oct(mode & 0o7777)})."
            " Refusing the whole archive; a portable model holds no program."
        )
    if info.flag_bits & 0x1:
        raise DataError(
            f"Archive {where}: member {info.filename!r} is encrypted. Refusing the whole archive; a portable model "
            "is never encrypted (ask its author for a file made by bids_app-model export)."
        )
    if info.compress_type not in COMPRESSIONS:
        raise DataError(
            f"Archive {where}: member {info.filename!r} uses zip compression method {info.compress_type}; a portable "
            f"model uses {' or '.join(COMPRESSIONS.values())} only. Refusing the whole archive; export it again "
            "with bids_app-model export."
        )
    if info.file_size > MAX_MEMBER_BYTES:
        raise DataError(
            f"Archive {where}: member {info.filename!r} declares {info.file_size} bytes, over the "
            f"{MAX_MEMBER_BYTES} a portable model member may hold. Refusing the archive."
        )


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: Path) -> bytes:
    """The member's bytes, never more than it declares (a lying size is refused, not trusted)."""
    try:
        with archive.open(info) as handle:
            data = handle.read(info.file_size + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # CRC error, truncated stream
        raise DataError(
            f"Archive {where}: member {info.filename!r} cannot be read ({exc}). Download it again."
        ) from exc
    if len(data) != info.file_size:
        raise DataError(f"Archive {where}: member {info.filename!r} does not hold the size it declares. Refusing.")
    return data


def _check_content(name: str, data: bytes, where: Path) -> None:
    """Refuse pickled or malformed content whatever the member is called."""
    if (len(data) >= 2 and data[0] == 0x80 and 1 <= data[1] <= 5) or data[:4] == b"PK\x03\x04":
        raise DataError(
            f"Archive {where}: member {name!r} starts with pickle or zip (torch checkpoint) magic bytes: loading "
            "it could run code. Refusing the whole archive; weights travel as safetensors only."
        )
    if name.endswith(TEXT_SUFFIXES):
        try:
            text = data.decode("utf-8")
            if name.endswith(".json"):
                json.loads(text)
        except ValueError as exc:
            raise DataError(
                f"Archive {where}: member {name!r} is not valid UTF-8 text/JSON ({exc}). Refusing."
            ) from exc
    elif name.endswith(".safetensors"):
        header = struct.unpack("<Q", data[:8])[0] if len(data) >= 9 else 0
        if not (2 <= header <= min(MAX_SAFETENSORS_HEADER, len(data) - 8) and data[8:9] == b"{"):
            raise DataError(
                f"Archive {where}: member {name!r} is not a safetensors file. Refusing the whole archive; weights "
                "travel as safetensors only."
            )


def check_required(names: set[str], where: Path) -> None:
    """DataError naming the members every model needs that are absent (``REQUIRED_MEMBERS``, the model folder's
    record and split, a weights file)."""
    from bids_app.maps.folder import RECORD_JSON  # imported here: pandas, needed only once an archive is read

    required = (*REQUIRED_MEMBERS[:2], RECORD_JSON, "groups/splits.json", *REQUIRED_MEMBERS[2:])
    missing = [name for name in required if name not in names]
    if not any(WEIGHTS_PATTERN.fullmatch(name) for name in names):
        missing.append("split-<k>/best-<metric>/model.safetensors")
    if missing:
        raise DataError(
            f"{where} lacks {', '.join(missing)}, which every bids_app portable model holds. Refusing it; ask its "
            "author for a file made by bids_app-model export."
        )


def check_format(manifest: Any, where: Path) -> None:
    """DataError unless the manifest states a format this bids_app reads (naming the version that reads it)."""
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version in READABLE_FORMATS:
        return
    writer = manifest.get("bids_app_version", "unknown") if isinstance(manifest, dict) else "unknown"
    readable = ", ".join(f"{v} (bids_app {since}+)" for v, since in READABLE_FORMATS.items())
    raise DataError(
        f"Archive {where} is portable-model format {version!r}, written by bids_app {writer}; this bids_app "
        f"{read_version()} reads format(s) {readable}. Open it with bids_app {writer}, or ask its author to export "
        "it again with this version. Nothing was loaded."
    )


def read_archive(path: Path) -> Archive:
    """Read and verify a whole archive in memory (module docstring); nothing is written.

    Raises:
        InputMissingError: ``path`` does not exist.
        DataError: any refusal listed in the module docstring, or a file that is not a zip.
    """
    path = Path(path)
    if not path.is_file():
        raise InputMissingError(f"Model archive {path} does not exist. Check the path.")
    raw = path.read_bytes()
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(
            f"{path} is not a bids_app portable model (not a zip archive: {exc}). Export one with bids_app-model "
            "export MAPS FILE."
        ) from exc
    with archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise DataError(f"Archive {path} holds {', '.join(repeated)} more than once. Refusing the archive.")
        total = 0
        for info in infos:
            _check_info(info, path)
            total += info.file_size
        if total > MAX_TOTAL_BYTES:
            raise DataError(f"Archive {path} declares {total} bytes in all, over {MAX_TOTAL_BYTES}. Refusing it.")
        if MANIFEST not in names:
            raise DataError(f"Archive {path} has no {MANIFEST}: it is not a bids_app portable model. Nothing loaded.")
        manifest_info = infos[names.index(MANIFEST)]
        manifest_bytes = _read_member(archive, manifest_info, path)
        try:
            manifest = json.loads(manifest_bytes.decode("utf-8"))
        except ValueError as exc:
            raise DataError(f"Archive {path}: {MANIFEST} is not valid JSON ({exc}). Nothing loaded.") from exc
        check_format(manifest, path)
        for name in names:
            check_member_name(name, path)
        listed = manifest.get("members")
        if not isinstance(listed, dict):
            raise DataError(f"Archive {path}: {MANIFEST} lists no members. Nothing loaded.")
        present = set(names) - {MANIFEST}
        check_required(present, path)
        if present != set(listed):
            extra, absent = sorted(present - set(listed)), sorted(set(listed) - present)
            raise DataError(
                f"Archive {path} does not match its manifest: unlisted {extra or 'none'}, missing {absent or 'none'}."
                " Refusing the archive; download it again."
            )
        members: dict[str, bytes] = {}
        for info in infos:
            if info.filename == MANIFEST:
                continue
            data = _read_member(archive, info, path)
            expected = listed[info.filename]
            digest = sha256_bytes(data)
            if not isinstance(expected, dict) or digest != expected.get("sha256") or len(data) != expected.get("size"):
                recorded = str(expected.get("sha256", "?") if isinstance(expected, dict) else "?")[:12]
                raise DataError(
                    f"Archive {path}: member {info.filename!r} has sha256 {digest[:12]}..., the manifest says "
                    f"{recorded}...: it was changed or damaged. Refusing the whole archive; download it again."
                )
            _check_content(info.filename, data, path)
            members[info.filename] = data
    return Archive(path, sha256_bytes(raw), manifest, manifest_bytes, members)


def read_card(path: Path) -> tuple[dict[str, Any], str, str]:
    """The manifest, ``MODEL_CARD.md`` and the archive's SHA-256, verified, without writing anything."""
    archive = read_archive(path)
    return archive.manifest, archive.members[CARD_MD].decode("utf-8"), archive.sha256
