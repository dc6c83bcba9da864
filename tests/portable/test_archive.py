"""The archive format: a kept archive of format 1 still loads, and every unsafe or damaged archive is refused
whole, with nothing written.

``fixtures/tiny_model_format1.zip`` was made by ``bids_app-model export`` (format 1, see fixtures/README.md);
the damaged archives are rebuilt from it member by member.
"""

from __future__ import annotations

import json
import pickle
import stat
import zipfile
from pathlib import Path

import pytest

from bids_app.cli.model import main as model_main
from bids_app.errors import DataError
from bids_app.portable import open_imported, read_archive
from bids_app.portable.archive import sha256_bytes

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_model_format1.zip"
MODEL = "split-0/best-loss/model.safetensors"


def members_of(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def rebuild(
    dest: Path,
    changes: dict[str, bytes | None],
    *,
    fix_manifest: bool = True,
    modes: dict[str, int] | None = None,
    manifest: dict | None = None,
) -> Path:
    """The fixture with members replaced, added (bytes) or removed (None); the manifest follows unless told not."""
    members = members_of(FIXTURE)
    record = json.loads(members.pop("manifest.json"))
    for name, data in changes.items():
        if data is None:
            members.pop(name)
            if fix_manifest:
                record["members"].pop(name)
        else:
            members[name] = data
            if fix_manifest:
                record["members"][name] = {"sha256": sha256_bytes(data), "size": len(data)}
    record.update(manifest or {})
    members["manifest.json"] = json.dumps(record, indent=2).encode()
    with zipfile.ZipFile(dest, "w") as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = (modes or {}).get(name, stat.S_IFREG | 0o644) << 16
            archive.writestr(info, data)
    return dest


def test_the_kept_format_1_archive_loads_and_predicts(tmp_path: Path) -> None:
    import torch

    archive = read_archive(FIXTURE)
    assert archive.manifest["format_version"] == 1
    dest = tmp_path / "models" / "tiny"
    assert model_main(["import", str(FIXTURE), str(dest)]) == 0
    imported = open_imported(dest)
    maps = imported.maps
    assert maps.class_names == ["AD", "CN"] and maps.record.input_shape[0] == 1
    for split in maps.trained_splits():
        model = maps.load_model(split, "loss")
        assert model(torch.zeros(1, *maps.record.input_shape)).shape == (1, 2)
    guard = imported.guard
    assert guard.fingerprints is not None
    assert guard.fingerprints.prints.shape == (len(guard.images), int(guard.fingerprints.mask.sum()))
    assert imported.card["card_version"] == 1 and imported.card["leak_guard"]["fingerprints"] is True
    # a second import into the same folder is refused; the folder is checked against its manifest when opened
    assert model_main(["import", str(FIXTURE), str(dest)]) == 64
    (dest / "split-0" / "best-loss" / "selection.json").write_text("{}")
    with pytest.raises(DataError, match="changed since it was imported"):
        open_imported(dest)


def pickled() -> bytes:
    return pickle.dumps({"weight": [1.0, 2.0]}, protocol=4)


CASES = {
    "tampered member": ({"split-0/best-loss/selection.json": b'{"epoch": 99}\n'}, {"fix_manifest": False},
                        "changed or damaged"),
    "member path with ..": ({"../evil.json": b"{}"}, {}, "climbs out"),
    "absolute member path": ({"/tmp/evil.json": b"{}"}, {}, "climbs out"),
    "pickle in place of the weights": ({MODEL: pickled()}, {}, "pickle"),
    "torch zip checkpoint in place of the weights": ({MODEL: b"PK\x03\x04" + bytes(64)}, {}, "pickle or zip"),
    "pickle file beside the weights": ({"split-0/best-loss/model.pt": pickled()}, {}, "pickle"),
    "pickle renamed as a table": ({"groups/extra.tsv": pickled()}, {}, "pickle"),
    "symlink member": ({"groups/link.tsv": b"/etc/passwd"}, {"modes": {"groups/link.tsv": stat.S_IFLNK | 0o777}},
                       "symlink"),
    "executable member": ({}, {"modes": {"maps.json": stat.S_IFREG | 0o755}}, "executable"),
    "device member": ({"groups/dev.tsv": b""}, {"modes": {"groups/dev.tsv": stat.S_IFCHR | 0o644}}, "device"),
    "unknown member": ({"run.sh": b"echo hi\n"}, {}, "does not contain"),
    "member the manifest does not list": ({"groups/extra.tsv": b"a\n"}, {"fix_manifest": False}, "manifest"),
    "member the manifest lists but is gone": ({"groups/demographics.tsv": None}, {"fix_manifest": False}, "manifest"),
    "newer format": ({}, {"manifest": {"format_version": 99, "bids_app_version": "9.0.0"}}, "bids_app 9.0.0"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_archive_is_refused_whole_and_nothing_is_written(case: str, tmp_path: Path, capsys) -> None:
    changes, options, words = CASES[case]
    bad = rebuild(tmp_path / "bad.zip", changes, **options)
    site = tmp_path / "site"
    assert model_main(["import", str(bad), str(site / "models" / "m")]) == 65
    error = capsys.readouterr().err
    assert words in error, error
    assert not site.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]
    assert model_main(["info", str(bad)]) == 65


def test_a_file_that_is_no_archive_is_refused(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "model.zip"
    bad.write_bytes(pickled())
    assert model_main(["import", str(bad), str(tmp_path / "m")]) == 65
    assert "not a zip archive" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert model_main(["info", str(tmp_path / "absent.zip")]) == 66


def test_the_newer_format_message_names_the_version_that_reads_it(tmp_path: Path) -> None:
    bad = rebuild(tmp_path / "new.zip", {}, manifest={"format_version": 2, "bids_app_version": "0.3.0"})
    with pytest.raises(DataError, match=r"format 2, written by bids_app 0\.3\.0.*Open it with bids_app 0\.3\.0"):
        read_archive(bad)
