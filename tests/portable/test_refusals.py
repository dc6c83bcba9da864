"""Portable models refused or kept inside OUTPUT_DIR: zip features the format never uses, missing members,
malformed manifests of imported folders, failed writes, ``--model`` options that would be dropped, and a model
folder outside OUTPUT_DIR (copied in, never written to). Hand-made archives from the kept fixture; no training.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import struct
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from bids_app.cli.model import main as model_main
from bids_app.config import AnalysisLevel, GroupStage, PredictConfig, RunConfig
from bids_app.errors import DataError, InputMissingError, UsageError
from bids_app.portable import import_archive, open_imported, open_model
from bids_app.portable.card import _demographics
from tests.portable.test_archive import FIXTURE, MODEL, members_of, rebuild

CARD = "MODEL_CARD.md"


def patch_central(path: Path, name: str, *, flag: int | None = None, method: int | None = None) -> Path:
    """Set ``name``'s general-purpose flag bits or compression method in the zip's central directory."""
    data = bytearray(path.read_bytes())
    start = 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        name_length = struct.unpack_from("<H", data, start + 28)[0]
        if data[start + 46 : start + 46 + name_length] == name.encode():
            if flag is not None:
                struct.pack_into("<H", data, start + 8, struct.unpack_from("<H", data, start + 8)[0] | flag)
            if method is not None:
                struct.pack_into("<H", data, start + 10, method)
            path.write_bytes(bytes(data))
            return path
        start += 4
    raise AssertionError(f"{name} not in {path}")


def copy_with(dest: Path, name: str, compress_type: int) -> Path:
    """The fixture, ``name`` written with ``compress_type``."""
    with zipfile.ZipFile(dest, "w") as archive:
        for member, data in members_of(FIXTURE).items():
            archive.writestr(member, data, compress_type=compress_type if member == name else zipfile.ZIP_DEFLATED)
    return dest


def refused(bad: Path, tmp_path: Path, capsys, words: str) -> None:
    """``info`` and ``import`` exit 65 with ``words`` in the one error line; nothing is written."""
    dest = tmp_path / "site" / "models" / "m"
    assert model_main(["info", str(bad)]) == 65
    assert model_main(["import", str(bad), str(dest)]) == 65
    error = capsys.readouterr().err
    assert error.count(words) == 2 and "Traceback" not in error, error
    assert not (tmp_path / "site").exists()


def test_an_encrypted_member_is_refused(tmp_path: Path, capsys) -> None:
    bad = patch_central(copy_with(tmp_path / "bad.zip", CARD, zipfile.ZIP_DEFLATED), CARD, flag=0x1)
    refused(bad, tmp_path, capsys, "is encrypted")


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA, 99])
def test_a_compression_other_than_stored_or_deflated_is_refused(method: int, tmp_path: Path, capsys) -> None:
    if method == 99:  # a method zipfile cannot read at all
        bad = patch_central(copy_with(tmp_path / "bad.zip", CARD, zipfile.ZIP_STORED), CARD, method=99)
    else:
        bad = copy_with(tmp_path / "bad.zip", CARD, method)
    refused(bad, tmp_path, capsys, f"compression method {method}")


def test_stored_members_are_accepted(tmp_path: Path) -> None:
    good = copy_with(tmp_path / "stored.zip", MODEL, zipfile.ZIP_STORED)
    assert model_main(["info", str(good)]) == 0


@pytest.mark.parametrize(
    "missing",
    [["MODEL_CARD.md"], ["model_card.json"], ["maps.json"], ["groups/splits.json"], ["leak_guard/images.tsv"],
     [MODEL, "split-1/best-loss/model.safetensors"]],
)  # fmt: skip
def test_an_archive_without_a_required_member_is_refused_naming_it(missing: list[str], tmp_path: Path, capsys) -> None:
    bad = rebuild(tmp_path / "bad.zip", dict.fromkeys(missing))
    words = missing[0] if len(missing) == 1 else "split-<k>/best-<metric>/model.safetensors"
    refused(bad, tmp_path, capsys, f"lacks {words}")


def imported_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "imported" / "tiny"
    import_archive(FIXTURE, folder)
    return folder


def edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest["members"])
    path.write_text(json.dumps(manifest))


def test_an_imported_folder_whose_manifest_lists_an_escaping_name_is_refused(tmp_path: Path) -> None:
    folder = imported_copy(tmp_path)
    outside = folder.parent / "outside.json"  # a real file, with the right checksum: still refused by its name
    outside.write_bytes((folder / "maps.json").read_bytes())
    edit_manifest(folder, lambda members: members.update({"../outside.json": members["maps.json"]}))
    with pytest.raises(DataError, match="climbs out") as caught:
        open_imported(folder)
    assert caught.value.exit_code == 65


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda members: members.update({"maps.json": "0" * 64}), "without its sha256 and size"),
        (lambda members: members["maps.json"].update({"size": "12"}), "without its sha256 and size"),
        (lambda members: members["maps.json"].update({"size": members["maps.json"]["size"] + 1}), "size differs"),
        (lambda members: members.update({"run.sh": members["maps.json"]}), "does not contain"),
        (lambda members: members.pop("maps.json"), "lacks maps.json"),
    ],
)
def test_an_imported_folder_with_a_malformed_manifest_is_refused(edit, words: str, tmp_path: Path) -> None:
    folder = imported_copy(tmp_path)
    edit_manifest(folder, edit)
    with pytest.raises(DataError, match=words):
        open_imported(folder)


@pytest.mark.parametrize(
    ("failure", "code", "words"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), 74, "free space"),
        (PermissionError(errno.EACCES, "Permission denied"), 73, "permissions"),
    ],
)
def test_a_failed_write_during_import_is_one_line_and_leaves_nothing(
    failure: OSError, code: int, words: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    real_open = Path.open

    def failing_open(self: Path, mode: str = "r", *args, **kwargs):
        if mode == "xb" and self.name == "model.safetensors":
            raise failure
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", failing_open)
    models = tmp_path / "out" / "models"
    assert model_main(["import", str(FIXTURE), str(models / "tiny")]) == code
    error = capsys.readouterr().err
    assert words in error and str(models / "tiny") in error and "Traceback" not in error, error
    assert list(models.iterdir()) == []  # the hidden temporary folder is gone too


def test_a_name_clash_at_the_rename_is_an_output_error(tmp_path: Path, monkeypatch, capsys) -> None:
    dest = tmp_path / "models" / "tiny"

    def clash(self: Path, target: Path) -> Path:
        raise OSError(errno.ENOTEMPTY, "Directory not empty")

    monkeypatch.setattr(Path, "rename", clash)
    assert model_main(["import", str(FIXTURE), str(dest)]) == 73
    assert "appeared while the model was being imported" in capsys.readouterr().err
    assert list(dest.parent.iterdir()) == []


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_model_folder_outside_output_dir_is_copied_in_and_left_untouched(tmp_path: Path) -> None:
    folder = imported_copy(tmp_path)
    before = snapshot(folder.parent)
    models = tmp_path / "out" / "models"
    imported = open_model(folder, models)
    assert imported.maps.root == models / "tiny"  # predictions and leak reports go under OUTPUT_DIR
    assert snapshot(models / "tiny") == snapshot(folder)
    again = open_model(folder, models)  # the same model again: the copy is re-used
    assert again.maps.root == models / "tiny" and snapshot(folder.parent) == before
    # a folder already inside OUTPUT_DIR is used in place
    assert open_model(models / "tiny", models).maps.root == models / "tiny"
    # another model under that name is refused (64), nothing copied
    other = tmp_path / "other" / "tiny"
    import_archive(rebuild(tmp_path / "other.zip", {"groups/demographics.tsv": None}), other)
    with pytest.raises(UsageError, match="already holds another model") as caught:
        open_model(other, models)
    assert caught.value.exit_code == 64
    assert snapshot(models / "tiny") == snapshot(folder) and snapshot(folder.parent) == before


def test_a_damaged_folder_outside_output_dir_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    folder = imported_copy(tmp_path)
    (folder / "split-0" / "best-loss" / "selection.json").write_text("{}")
    models = tmp_path / "out" / "models"
    with pytest.raises(DataError, match="changed since it was imported"):
        open_model(folder, models)
    (folder / "maps.json").unlink()
    with pytest.raises(InputMissingError, match=r"maps\.json"):
        open_model(folder, models)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"cohort_name": "site1"}, "--cohort-name"),
        ({"split.leave_cohort_out": "site1"}, "--leave-cohort-out"),
        ({"train.resume": True}, "--resume"),
        ({"overwrite": True}, "--overwrite"),
        ({"split.split_file": Path("split.tsv")}, "--split-file"),
    ],
)
def test_options_the_model_run_would_drop_are_refused(change: dict, option: str, tmp_path: Path) -> None:
    from bids_app.levels import check_model_run

    cfg = RunConfig(tmp_path, tmp_path / "out", AnalysisLevel.GROUP, predict=PredictConfig(model=FIXTURE,
                    group_name="site2"))  # fmt: skip
    check_model_run(cfg, (GroupStage.PREDICT,))  # the plain run passes
    for key, value in change.items():
        section, _, field = key.rpartition(".")
        if section:
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{field: value})})
        else:
            cfg = dataclasses.replace(cfg, **{field: value})
    with pytest.raises(UsageError, match=f"{option} cannot go with --model") as caught:
        check_model_run(cfg, (GroupStage.PREDICT,))
    assert caught.value.exit_code == 64 and not (tmp_path / "out").exists()


def test_the_card_counts_people_of_two_cohorts_with_the_same_label_apart() -> None:
    table = pd.DataFrame(
        {
            "cohort": ["a", "a", "b", "b"],
            "participant_id": ["sub-01", "sub-01", "sub-01", "sub-02"],
            "session_id": ["ses-M000", "ses-M006", "ses-M000", "ses-M000"],
            "label": ["AD", "AD", "AD", "AD"],
            "age": ["70", "70.5", "80", "60"],
            "sex": ["F", "F", "M", "M"],
        }
    )
    (row,) = _demographics(table, "train+validation")
    assert row["n_participants"] == 3 and row["n_images"] == 4
    assert row["age_mean"] == 70.0  # one baseline age per person: 70, 80, 60
