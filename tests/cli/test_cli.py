"""The BIDS-App command-line contract: arguments, config resolution and BEP027 exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bids_app import read_version
from bids_app.cli.arguments import parse_config, parse_labels
from bids_app.config import ExtractionMode, RunConfig, RuntimeConfig
from bids_app.config_file import dump_config, load_config_file, resolve_config
from bids_app.errors import AnalysisLevelError, ConfigError, UsageError
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[2]


def test_version_matches_version_file() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"bids_app {(REPO / 'version').read_text().strip()}"
    assert read_version() == (REPO / "version").read_text().strip()


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_heavy_modules(flag: str) -> None:
    code = (
        "import sys\n"
        "from bids_app.cli.main import main\n"
        f"try:\n    main(['{flag}'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'ants', 'bids', 'nibabel', 'pandas') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="


def test_unknown_analysis_level_exits_17(tmp_path: Path) -> None:
    result = run_cli(str(tmp_path), str(tmp_path / "out"), "subject")
    assert result.returncode == 17
    assert "Unknown analysis level 'subject'" in result.stderr


def test_usage_error_exits_64(tmp_path: Path) -> None:
    result = run_cli(str(tmp_path), str(tmp_path / "out"), "participant", "--nprocs", "two")
    assert result.returncode == 64
    assert "invalid int value" in result.stderr
    assert run_cli().returncode == 64


@pytest.mark.parametrize("inside", ["", "sub-01/out", "code"])
def test_output_inside_bids_dir_is_refused(tmp_path: Path, inside: str) -> None:
    out = tmp_path / inside if inside else tmp_path
    result = run_cli(str(tmp_path), str(out), "participant")
    assert result.returncode == 64
    assert str(tmp_path / "derivatives" / "bids_app") in result.stderr


def test_output_under_derivatives_is_accepted(tmp_path: Path) -> None:
    cfg = parse_config([str(tmp_path), str(tmp_path / "derivatives" / "x"), "participant"])
    assert cfg.output_dir == tmp_path / "derivatives" / "x"


def test_labels_are_bare_deduplicated_and_read_from_file(tmp_path: Path) -> None:
    listing = tmp_path / "labels.txt"
    listing.write_text("sub-03\n04\n\n# comment\n03\n")
    assert parse_labels(["sub-01", "01", "02", str(listing)], "sub-", "participant") == (
        "01",
        "02",
        "03",
        "04",
    )


@pytest.mark.parametrize("bad", ["../x", "a/b", "sub-0_1", "01.2"])
def test_labels_with_path_or_non_alphanumeric_characters_are_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UsageError, match="alphanumeric"):
        parse_labels([bad], "sub-", "participant")
    result = run_cli(str(tmp_path / "bids"), str(tmp_path / "o"), "participant", "--participant-label", bad)
    assert result.returncode == 64


def test_underscore_aliases_equal_kebab_flags(tmp_path: Path) -> None:
    a = parse_config(
        [
            str(tmp_path / "bids"),
            str(tmp_path / "o"),
            "participant",
            "--participant_label",
            "01",
            "--patch_size",
            "32",
        ]
    )
    b = parse_config(
        [
            str(tmp_path / "bids"),
            str(tmp_path / "o"),
            "participant",
            "--participant-label",
            "sub-01",
            "--patch-size",
            "32",
        ]
    )
    assert a == b
    assert a.participant_labels == ("01",)
    assert a.extraction.patch_size == 32


def test_config_file_then_flags_override(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(
        '[run]\nseed = 7\nnprocs = 3\n[extraction]\nmodes = ["slice"]\npatch_size = 20\n[train]\nepochs = 3\n'
    )
    cfg = parse_config([str(tmp_path / "bids"), str(tmp_path / "o"), "group", "--config", str(toml), "--seed", "9"])
    assert cfg.seed == 9  # flag wins
    assert cfg.nprocs == 3  # from the file
    assert cfg.extraction.modes == (ExtractionMode.SLICE,)
    assert cfg.train.epochs == 3
    assert cfg.extraction.stride == 50  # default


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[train]\nepoch = 3\n", "'epoch'"),
        ("[train]\nepochs = 'three'\n", "train.epochs"),
        ("[extraction]\nmodes = ['voxel']\n", "extraction.modes[0]"),
        ("[trainning]\nepochs = 3\n", "'trainning'"),
        ("[run]\nseed = true\n", "run.seed"),
    ],
)
def test_config_unknown_keys_and_wrong_types_are_named(tmp_path: Path, text: str, needle: str) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_config([str(tmp_path / "bids"), str(tmp_path / "o"), "group", "--config", str(toml)])
    result = run_cli(str(tmp_path / "bids"), str(tmp_path / "o"), "group", "--config", str(toml))
    assert result.returncode == 64
    assert needle in result.stderr


def test_runtime_section_flags_and_old_spellings(tmp_path: Path) -> None:
    """[runtime] holds how the machine is used; bids_app 0.1.0's [train] and [predict] keys still read, not both."""
    old = tmp_path / "old.toml"
    old.write_text('[train]\nepochs = 2\ndevice = "cpu"\nnum_workers = 2\namp = true\n[predict]\nbatch_size = 16\n')
    args = [str(tmp_path / "bids"), str(tmp_path / "o"), "group", "--config", str(old)]
    cfg = parse_config(args)
    assert cfg.runtime == RuntimeConfig(device="cpu", amp=True, num_workers=2, inference_batch_size=16)
    assert cfg.train.epochs == 2
    bare = [str(tmp_path / "bids"), str(tmp_path / "o"), "group"]
    flags = parse_config(
        [*bare, "--device", "cuda:1", "--channels-last", "--num-workers", "3", "--cache-samples", "--deterministic",
         "--inference-batch-size", "4"]
    )  # fmt: skip
    assert flags.runtime == RuntimeConfig("cuda:1", False, True, 3, True, True, 4)
    old = tmp_path / "old.toml"
    old.write_text('[train]\ndevice = "cpu"\nnum_workers = 2\n[predict]\nbatch_size = 16\n')
    flagged = parse_config([str(tmp_path / "bids"), str(tmp_path / "o"), "group", "--config", str(old),
                            "--device", "cuda:1", "--inference-batch-size", "3"])  # fmt: skip
    assert (flagged.runtime.device, flagged.runtime.num_workers, flagged.runtime.inference_batch_size) == (
        "cuda:1",
        2,
        3,
    )  # a flag overrides the file's old spelling
    both = tmp_path / "both.toml"
    both.write_text("[predict]\nbatch_size = 16\n[runtime]\ninference_batch_size = 4\n")
    with pytest.raises(ConfigError, match=r"'predict\.batch_size' and 'runtime\.inference_batch_size' are both set"):
        parse_config([str(tmp_path / "bids"), str(tmp_path / "o"), "group", "--config", str(both)])


def test_unknown_device_exits_64(tiny_dataset, tmp_path: Path) -> None:
    result = run_cli(str(tiny_dataset.bids_dir), str(tmp_path / "out"), "group", "--device", "tpu",
                     "--skip-bids-validation")  # fmt: skip
    assert result.returncode == 64
    assert "Unknown device 'tpu' (runtime.device). Use auto, cpu, cuda or cuda:<index>." in result.stderr
    assert not (tmp_path / "out" / "models").exists()


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    filters = tmp_path / "f.json"
    filters.write_text(json.dumps({"t1w": {"acquisition": "mprage", "run": None}}))
    cfg = parse_config(
        [
            str(tmp_path / "bids"),
            str(tmp_path / "o"),
            "participant",
            "--bids-filter-file",
            str(filters),
            "--crop-shape",
            "10",
            "11",
            "12",
            "--modes",
            "image",
            "roi",
            "--roi-mask",
            f"hippo={tmp_path / 'm.nii.gz'}",
            "--no-roi-crop",
            "--seed",
            "4",
        ]
    )
    text = dump_config(cfg)
    path = tmp_path / "resolved.toml"
    path.write_text(text)
    again = resolve_config(load_config_file(path))
    assert again == cfg
    assert isinstance(again, RunConfig)
    assert again.bids_filters == {"t1w": {"acquisition": "mprage", "run": None}}
    assert again.extraction.roi_crop is False


def test_bad_filter_file_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "f.json"
    bad.write_text("{not json")
    result = run_cli(str(tmp_path / "bids"), str(tmp_path / "o"), "participant", "--bids-filter-file", str(bad))
    assert result.returncode == 64
    assert "not valid JSON" in result.stderr
    missing = run_cli(
        str(tmp_path / "bids"), str(tmp_path / "o"), "participant", "--bids-filter-file", str(tmp_path / "x")
    )
    assert missing.returncode == 66


def test_parse_config_rejects_unknown_level(tmp_path: Path) -> None:
    with pytest.raises(AnalysisLevelError):
        parse_config([str(tmp_path / "bids"), str(tmp_path / "o"), "session"])


@pytest.mark.parametrize("flag", ["--work-dir", "--bids-database-dir"])
def test_scratch_folders_inside_bids_dir_are_refused(tmp_path: Path, flag: str) -> None:
    bids = tmp_path / "bids"
    result = run_cli(str(bids), str(tmp_path / "o"), "participant", flag, str(bids / "scratch"))
    assert result.returncode == 64
    assert flag in result.stderr and "never writes" in result.stderr


def test_console_logging_follows_stderr_after_it_was_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that swaps and closes sys.stderr (a test runner, a notebook) still gets the records."""
    import io
    import logging

    from bids_app.log_setup import configure_logging

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging(0)
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("bids_app.test").info("after the swap %d", 1)
    assert "INFO bids_app.test: after the swap 1" in second.getvalue()
