"""Export a model folder to one portable file, import it back, and open an imported model for prediction.

The archive's members mirror the imported folder: the model record (narrowed to the exported models),
``environment.json``, ``excluded_sessions.tsv`` (several channels only), the split files under ``groups/`` (ids,
labels, age and sex: no image data), for each exported split its ``training_logs/summary.json`` and
``training.tsv`` and, for each chosen selection metric, ``best-<metric>/model.safetensors``, ``selection.json``
and the voting weights of multi-part modes, and the linear baseline selected like it
(``baseline/best-<metric>/``: coefficients and standardisation, safetensors); the leak guard under
``leak_guard/``; ``MODEL_CARD.md`` and ``model_card.json``; ``manifest.json``. An imported folder is therefore a
model folder the group level opens like any other (``Maps.open``), plus its guard and card.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bids_app.derivatives import explain_write_error
from bids_app.errors import DataError, InputMissingError, OutputError, UsageError
from bids_app.maps import Maps
from bids_app.portable.archive import (
    CARD_JSON,
    CARD_MD,
    FORMAT_VERSION,
    GUARD_DIR,
    MANIFEST,
    Archive,
    check_format,
    check_member_name,
    check_required,
    read_archive,
    sha256_bytes,
    write_archive,
)
from bids_app.portable.card import format_card, make_card
from bids_app.portable.guard import TravellingGuard

log = logging.getLogger(__name__)

VOTING_WEIGHTS = "voting_weights.tsv"  # written beside a multi-part model by the prediction stage's validation


@dataclasses.dataclass(frozen=True, eq=False)
class ImportedModel:
    """A model folder made by ``import_archive``, verified against its manifest, with its guard and card.

    Attributes:
        maps: the model folder, opened (``Maps.open``).
        guard: the training pool's checksums and (maybe) fingerprints.
        card: ``model_card.json``.
        manifest: ``manifest.json``.
    """

    maps: Maps
    guard: TravellingGuard
    card: dict[str, Any]
    manifest: dict[str, Any]


def check_selection(maps: Maps, splits: Sequence[int], metrics: Sequence[str]) -> tuple[list[int], list[str]]:
    """The exported splits and metrics (every trained split and selection metric by default), checked.

    Raises:
        UsageError: a split is not trained, or a metric is not one the model selected on.
        InputMissingError: the model has no trained split.
    """
    trained = maps.trained_splits()
    chosen_splits = sorted(set(splits)) if splits else trained
    untrained = [k for k in chosen_splits if k not in trained]
    if untrained:
        raise UsageError(f"--splits {untrained}: not trained in {maps.root} (trained: {trained}). Choose among them.")
    available = list(maps.record.config.train.selection_metrics)
    chosen_metrics = list(dict.fromkeys(metrics)) if metrics else available
    unknown = [m for m in chosen_metrics if m not in available]
    if unknown:
        raise UsageError(
            f"--metrics {unknown}: model {maps.name} kept best models for {available} only. Choose among them."
        )
    return chosen_splits, chosen_metrics


def model_members(maps: Maps, splits: Sequence[int], metrics: Sequence[str]) -> dict[str, bytes]:
    """The model folder's files that travel, by archive member path (module docstring)."""
    layout, root = maps.layout, maps.root
    record_file, *others = layout.record_files()
    members = {record_file.relative_to(root).as_posix(): maps.exported_record(splits, metrics)}
    # the sessions a model of several channels left out: its report lists them after an import too
    paths = [*others, layout.excluded_sessions_tsv, *sorted(layout.groups_dir.rglob("*.tsv")), layout.splits_json]
    for split in splits:
        paths += [layout.summary_json(split), layout.training_tsv(split)]
        for metric in metrics:
            paths += [layout.model_path(split, metric), layout.selection_json(split, metric)]
            paths.append(layout.best_dir(split, metric) / VOTING_WEIGHTS)
            paths += [layout.baseline_model_path(split, metric), layout.baseline_selection_json(split, metric)]
    for path in paths:
        if path.is_file():
            members[path.relative_to(root).as_posix()] = path.read_bytes()
    return members


def export_model(
    maps: Maps,
    file: Path,
    guard: TravellingGuard,
    input_sidecar: dict[str, Any],
    *,
    splits: Sequence[int] = (),
    metrics: Sequence[str] = (),
) -> dict[str, Any]:
    """Write the portable archive of ``maps`` to ``file``; the same model always gives the same bytes.

    Args:
        maps: the model folder, opened.
        file: the archive to write (replaced atomically when it exists).
        guard: the training pool's leak guard (``prediction.guard.make_guard``).
        input_sidecar: the sidecar of one training tensor, for the card's input section.
        splits, metrics: the models to ship (default: every trained split, every selection metric).

    Returns:
        The card (``model_card.json``'s content).

    Raises:
        UsageError: a split or metric that the model does not have.
    """
    chosen_splits, chosen_metrics = check_selection(maps, splits, metrics)
    for split in chosen_splits:
        for metric in chosen_metrics:
            maps.model_path(split, metric)  # refuses a missing or pickled weights file
    card = make_card(maps, chosen_splits, chosen_metrics, guard, input_sidecar)
    members = model_members(maps, chosen_splits, chosen_metrics)
    members.update(guard.to_members(GUARD_DIR))
    members[CARD_JSON] = (json.dumps(card, indent=2) + "\n").encode("utf-8")
    members[CARD_MD] = format_card(card, format_version=FORMAT_VERSION).encode("utf-8")
    digest = write_archive(file, members, model_name=maps.name)
    log.info("Exported model %s (splits %s, best-%s) to %s: %d members, sha256 %s.", maps.name, chosen_splits,
             "/".join(chosen_metrics), file, len(members) + 1, digest)  # fmt: skip
    return card


def _open_folder(folder: Path, members: dict[str, bytes], manifest: dict[str, Any]) -> ImportedModel:
    guard = TravellingGuard.from_members(members, GUARD_DIR, str(folder))
    card = json.loads(members[CARD_JSON].decode("utf-8"))
    return ImportedModel(Maps.open(folder), guard, card, manifest)


def import_archive(file: Path, dest: Path) -> ImportedModel:
    """Verify ``file`` whole, then write it as the model folder ``dest`` (all or nothing).

    Every member is read and checked in memory first (``read_archive``); nothing is written on refusal. The
    folder is then written beside ``dest`` under a hidden name, opened as a model folder to prove it loads, and
    renamed to ``dest``.

    Raises:
        UsageError: ``dest`` already exists.
        DataError, InputMissingError: the archive is refused (``archive.read_archive``).
        OutputError, IOFailure: ``dest`` cannot be written (the partial folder is removed).
    """
    dest = Path(os.path.abspath(dest))
    if dest.exists():
        raise UsageError(f"Import destination {dest} already exists. Choose a new folder or remove it first.")
    archive = read_archive(Path(file))
    return _write_folder(archive, dest)


def _write_folder(archive: Archive, dest: Path) -> ImportedModel:
    """Write ``archive`` as the folder ``dest``: under a hidden sibling name first, renamed once it opens.

    Raises:
        OutputError, IOFailure: a write or the rename fails (``derivatives.explain_write_error``: permissions,
            full disk, ``dest`` made meanwhile); the hidden folder is removed and ``dest`` is not created.
    """
    tmp = dest.parent / f".{dest.name}.importing-{os.getpid()}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise explain_write_error(exc, dest, "create folder") from exc
    try:
        for name, data in sorted({**archive.members, MANIFEST: archive.manifest_bytes}.items()):
            path = tmp.joinpath(*name.split("/"))
            if not path.resolve().is_relative_to(tmp.resolve()):  # check_member_name already refused this
                raise DataError(f"Archive {archive.path}: member {name!r} would leave {dest}. Refusing.")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("xb") as handle:
                    handle.write(data)
                path.chmod(0o644)
            except OSError as exc:
                raise explain_write_error(exc, dest / name) from exc
        _open_folder(tmp, archive.members, archive.manifest)  # proves it loads before it is visible
        try:
            tmp.rename(dest)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise OutputError(
                    f"Cannot create {dest}: it appeared while the model was being imported (another run?). Nothing "
                    "was imported; remove it or choose another destination."
                ) from exc
            raise explain_write_error(exc, dest, "create folder") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Imported %s (sha256 %s) into %s.", archive.path, archive.sha256, dest)
    return open_imported(dest)


def open_imported(folder: Path) -> ImportedModel:
    """Open a folder made by ``import_archive``, every file checked against its manifest again.

    Raises:
        InputMissingError: no manifest (not an imported model) or a listed file is gone.
        DataError: a file changed since the import, the manifest is malformed (a member name the format does not
            know or that climbs out, an entry without its SHA-256 and size), or its format is not readable here.
    """
    folder = Path(folder)
    archive = read_folder(folder)
    return _open_folder(folder, archive.members, archive.manifest)


def read_folder(folder: Path) -> Archive:
    """An imported model folder's files, each checked against its manifest (name, SHA-256, size), in memory.

    The returned ``Archive``'s ``sha256`` is the manifest's (a folder has no archive file of its own).

    Raises:
        As ``open_imported``.
    """
    path = folder / MANIFEST
    try:
        manifest_bytes = path.read_bytes()
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except FileNotFoundError:
        raise InputMissingError(
            f"{folder} has no {MANIFEST}: it is not a model imported by bids_app-model import. Pass the archive "
            "itself, or import it first."
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({exc}). Import the archive again.") from exc
    check_format(manifest, folder)
    listed = manifest.get("members")
    if not isinstance(listed, dict):
        raise DataError(f"{path} lists no members. Import the archive again.")
    check_required(set(listed), path)
    members: dict[str, bytes] = {}
    for name, expected in listed.items():
        check_member_name(str(name), path)
        if name == MANIFEST or not isinstance(expected, dict) or not isinstance(expected.get("size"), int):
            raise DataError(
                f"{path} lists {name!r} without its sha256 and size. Refusing the folder; import the archive again."
            )
        member = folder.joinpath(*name.split("/"))
        if member.is_symlink() or not member.resolve().is_relative_to(folder.resolve()):
            raise DataError(f"{member} is a link, not a file of the model folder. Refusing; import the archive again.")
        try:
            data = member.read_bytes()
        except FileNotFoundError:
            raise InputMissingError(f"{member}, listed in {path}, is missing. Import the archive again.") from None
        except OSError as exc:
            raise DataError(f"{member} is unreadable ({exc}). Import the archive again.") from exc
        if sha256_bytes(data) != expected.get("sha256") or len(data) != expected["size"]:
            raise DataError(
                f"{member} changed since it was imported (sha256 or size differs from {path}). Import it again."
            )
        members[name] = data
    return Archive(folder, sha256_bytes(manifest_bytes), manifest, manifest_bytes, members)


def open_model(source: Path, models_dir: Path) -> ImportedModel:
    """The model ``--model`` names, as a folder under OUTPUT_DIR (``models_dir``'s parent), where predictions go.

    An archive, or an imported folder outside OUTPUT_DIR, is verified and written to ``models_dir/<its model
    name>`` first (once): nothing is ever written outside OUTPUT_DIR. A folder inside OUTPUT_DIR is used in place
    after the same checks. A model already there from the same manifest is re-used, so a second prediction run adds
    its group beside the first; a different model under that name is refused.

    Raises:
        UsageError: ``models_dir/<name>`` holds another model.
        DataError, InputMissingError: the archive or folder is refused.
        OutputError, IOFailure: the copy cannot be written.
    """
    source = Path(source)
    output_dir = Path(os.path.abspath(models_dir)).parent
    if source.is_dir():
        if Path(os.path.abspath(source)).resolve().is_relative_to(output_dir.resolve()):
            return open_imported(source)
        archive = read_folder(source)
    else:
        archive = read_archive(source)
    name = str(archive.manifest.get("model_name") or source.stem)
    if not name.replace("-", "").replace("_", "").isalnum():
        raise DataError(f"Model {source} names itself {name!r}, not a usable folder name. Export it again.")
    dest = Path(os.path.abspath(models_dir / name))
    if dest.exists():
        try:
            existing = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            existing = None
        if existing != archive.manifest:
            raise UsageError(
                f"{dest} already holds another model than {source}. Remove it, or predict into another OUTPUT_DIR."
            )
        log.info("Model %s was already imported from %s into %s; re-using it.", name, source, dest)
        return open_imported(dest)
    return _write_folder(archive, dest)
