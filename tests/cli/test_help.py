"""``--help`` shows every default and the allowed names; --template needs a space; the descriptor carries both."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bids_app.cli.arguments import build_parser, config_default, parse_config
from bids_app.cli.options import (
    ALLOWED_NAMES,
    ARCHITECTURE_NAMES,
    AUGMENTATION_NAMES,
    CONFIG_KEYS,
    DEFAULT_TEXT,
    INTERPRET_METHOD_NAMES,
    OPTIONS,
    SELECTION_METRIC_NAMES,
)
from bids_app.config import RunConfig, Task, check_config_values
from bids_app.config_file import config_to_nested, merge_nested, resolve_config
from bids_app.errors import ConfigError
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[2]


def help_text() -> str:
    """``bids_app --help`` in a fresh interpreter, wide enough that argparse wraps nothing inside a word."""
    env = {**os.environ, "COLUMNS": "400"}
    result = subprocess.run([sys.executable, "-m", "bids_app", "--help"], capture_output=True, text=True, env=env,
                            check=False, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())


def expected_default(value: object) -> str | None:
    """The spelling of a config default the help must show; None when DEFAULT_TEXT explains it instead."""
    if value is None or value == ():
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(expected_default(v) or "" for v in value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def test_help_shows_the_default_of_every_option() -> None:
    text = help_text()
    actions = {a.dest: " ".join((a.help or "").split()) for a in build_parser()._actions}
    for _, dest, key, _, _ in OPTIONS:
        section, _, name = key.partition(".")
        owner = RunConfig if section == "run" else type(getattr(RunConfig(Path("/"), Path("/"), "group"), section))  # type: ignore[arg-type]
        (field,) = [f for f in dataclasses.fields(owner) if f.name == name]
        value = field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]
        shown = expected_default(value)
        if shown is None:
            shown = "split train baseline predict" if dest == "stages" else DEFAULT_TEXT.get(dest, "none")
        assert f"(default: {shown})" in actions[dest].replace("%%", "%"), (dest, actions[dest])
        assert f"(default: {shown})" in text, dest
        assert actions[dest].split("(default:")[0].strip(), f"--{dest} has no help text"


def test_help_lists_the_allowed_names() -> None:
    text = help_text()
    for names in (ARCHITECTURE_NAMES, AUGMENTATION_NAMES, INTERPRET_METHOD_NAMES):
        assert ", ".join(names) in text
    for task, names in SELECTION_METRIC_NAMES.items():
        assert f"{task.value}: {', '.join(names)}" in text
    assert "{image,patch,slice,roi}" in text and "(default: image patch slice)" in text
    assert set(ALLOWED_NAMES) <= set(CONFIG_KEYS)


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\nfrom bids_app.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'ants', 'bids', 'pandas', 'nibabel') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


def test_the_light_name_lists_equal_the_registries() -> None:
    from bids_app.data.augment import AUGMENTATIONS
    from bids_app.interpret.saliency import SaliencyMethod
    from bids_app.metrics import metric_names
    from bids_app.models import list_architectures

    assert tuple(info.name for info in list_architectures()) == ARCHITECTURE_NAMES
    assert AUGMENTATION_NAMES == AUGMENTATIONS
    assert tuple(m.value for m in SaliencyMethod) == INTERPRET_METHOD_NAMES
    assert {task: metric_names(task) for task in Task} == SELECTION_METRIC_NAMES


# --- --template and its space -------------------------------------------------------------------------------


def test_a_template_without_a_space_label_is_a_usage_error_before_anything_is_written(tmp_path: Path) -> None:
    bids, out = tmp_path / "bids", tmp_path / "out"
    bids.mkdir()
    template = tmp_path / "my_template.nii.gz"
    template.write_bytes(b"")
    result = run_cli(str(bids), str(out), "participant", "--template", str(template))
    assert result.returncode == 64, result.stderr
    assert "--template-space" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "extra", "space"),
    [
        ("tpl-foo_T1w.nii.gz", [], "foo"),
        ("tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz", [], "MNI152NLin2009cAsym"),
        ("my_template.nii.gz", ["--template-space", "MNI152NLin6Asym"], "MNI152NLin6Asym"),
        ("tpl-foo_T1w.nii.gz", ["--template-space", "bar"], "bar"),
        # the generator's 4 mm template is MNI152NLin2009aSym resampled (bids_app.synthetic)
        ("tpl-MNI152NLin2009aSym_res-4mm_T1w.nii.gz", [], "MNI152NLin2009aSym"),
    ],
)
def test_the_template_space_comes_from_the_flag_or_the_tpl_label(
    tmp_path: Path, name: str, extra: list[str], space: str
) -> None:
    cfg = parse_config([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--template",
                        str(tmp_path / name), *extra])  # fmt: skip
    assert cfg.preprocess.template_space == space


def test_a_config_file_setting_the_space_counts_as_given(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[preprocess]\ntemplate_space = "MNI152NLin6Asym"\n')
    cfg = parse_config([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--config", str(config),
                        "--template", str(tmp_path / "mine.nii.gz")])  # fmt: skip
    assert cfg.preprocess.template_space == "MNI152NLin6Asym"


def test_the_generator_template_names_its_own_space() -> None:
    """The generator's 4 mm template is nilearn's MNI152 2009a symmetric resampled: its file name says so."""
    from bids_app.cli.arguments import TEMPLATE_LABEL_RE
    from bids_app.synthetic.dataset import TINY_TEMPLATE_NAME
    from bids_app.template import DEFAULT_SPACE

    match = TEMPLATE_LABEL_RE.match(TINY_TEMPLATE_NAME)
    assert match is not None and match.group(1) == DEFAULT_SPACE


# --- Boutiques descriptor ----------------------------------------------------------------------------------


def descriptor() -> dict:
    return json.loads((REPO / "boutiques" / "bids_app.json").read_text())


def test_descriptor_inputs_carry_their_defaults_and_choices() -> None:
    inputs = {i["id"]: i for i in descriptor()["inputs"]}
    assert inputs["epochs"]["default-value"] == 20
    assert inputs["learning_rate"]["default-value"] == pytest.approx(1e-3)
    assert inputs["architecture"]["default-value"] == "conv5_fc3"
    assert inputs["modes"]["default-value"] == ["image", "patch", "slice"]
    assert inputs["mode"]["value-choices"] == ["image", "patch", "slice", "roi"]
    for dest in CONFIG_KEYS:
        if dest not in inputs or inputs[dest]["type"] == "Flag":
            continue
        value = config_default(dest)
        if value is not None and value != ():
            assert "default-value" in inputs[dest], dest


def test_descriptor_ranges_are_the_ones_the_config_enforces() -> None:
    base = config_to_nested(resolve_config({"run": {"bids_dir": "/", "output_dir": "/", "analysis_level": "group"}}))
    checked = 0
    for entry in descriptor()["inputs"]:
        if entry.get("type") != "Number" or "minimum" not in entry:
            continue
        section, _, name = CONFIG_KEYS[entry["id"]].partition(".")
        step = 1 if entry.get("integer") else 1e-9
        cases = [(entry["minimum"], not entry.get("exclusive-minimum")),
                 (entry["minimum"] - step, False)]  # fmt: skip
        if "maximum" in entry:
            cases += [(entry["maximum"], not entry.get("exclusive-maximum")), (entry["maximum"] + step, False)]
        for value, accepted in cases:
            if entry["id"] == "crop_shape":
                value = [value] * 3
            nested = merge_nested(base, {section: {name: value}})
            try:
                check_config_values(resolve_config(nested))
                ok = True
            except ConfigError:
                ok = False
            assert ok == accepted, (entry["id"], value)
            checked += 1
    assert checked > 40


def test_descriptor_names_the_real_output_files() -> None:
    templates = {o["id"]: o["path-template"] for o in descriptor()["output-files"]}
    assert templates["dataset_description"] == "[OUTPUT_DIR]/dataset_description.json"
    assert templates["participant_reports"] == "[OUTPUT_DIR]/sub-*/sub-*_report.html"
    assert templates["participant_status"] == "[OUTPUT_DIR]/participant_status.tsv"
    assert templates["maps_json"] == "[OUTPUT_DIR]/models/[MODEL_NAME]/maps.json"
    assert templates["model_report"] == "[OUTPUT_DIR]/models/[MODEL_NAME]/report.html"
    assert templates["metrics_tables"].endswith("_image_level_metrics.tsv")
