"""The commands quoted in README.md and docs/*.md work as written, on a tiny generated dataset.

Every line of a ``bash``/``sh`` (or unlabelled) code block that calls ``bids_app``, ``bids_app-generate`` or
``bids_app-search``, directly or through a launcher, becomes one test: it runs here, or it is skipped with the
reason given by :func:`reason_to_skip` (a container engine, SLURM, a GPU, several processes, a synopsis).

How a command runs here:

- the program is the entry point installed next to this Python (``.venv/bin/bids_app`` too);
- ``BIDS_DIR``, ``/data/bids`` and ``/data`` name a tiny generated cohort (:func:`tests.conftest.make_cohort`,
  image and roi tensors); ``OUTPUT_DIR``, ``/out``, ``/data/out`` and the ``derivatives/bids_app`` folders name a
  private copy of its participant-level output;
- a group level gets :data:`TINY_GROUP` appended (one epoch of ``small_cnn``, 2 folds for 8 participants): later
  flags override earlier ones;
- ``container-check.sh ARGS -- APP_ARGS`` runs ``bids_app APP_ARGS`` on the host (the image's entry point is
  ``bids_app``), ``/project/`` being the block's working folder, where its earlier commands ran, and ``/tmp/out``
  a fresh folder;
- a command fails its test when it exits with a non-zero status.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import make_cohort

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENTRY_POINTS = ("bids_app", "bids_app-generate", "bids_app-search")
CONTAINER_CHECK = "container-check.sh"
LAUNCHERS = {
    "docker": "needs Docker and the bids_app image",
    "podman": "needs Podman and the bids_app image",
    "apptainer": "needs Apptainer and the bids_app SIF image",
    "singularity": "needs Singularity and the bids_app SIF image",
    "srun": "needs a SLURM allocation",
    "sbatch": "needs a SLURM cluster",
    "torchrun": "starts several training processes (DDP is tested in tests/training/test_distributed.py)",
}
TINY_GROUP = ("--architecture", "small_cnn", "--epochs", "1", "--batch-size", "4", "--n-splits", "2", "--device", "cpu")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PLACEHOLDER = re.compile(
    r"(?<![\w/.-])(BIDS_DIR|OUTPUT_DIR|/data/bids/derivatives/bids_app|/data/derivatives/bids_app|/data/bids|"
    r"/data/out|/data|/out)(?![\w.-])"
)


@dataclass(frozen=True)
class DocCommand:
    """One quoted command: where it is (``docs/x.md:12``, the line its block starts on), its block and its text."""

    where: str
    block: str
    text: str

    @property
    def words(self) -> list[str]:
        return split_words(self.text)

    @property
    def program(self) -> str:
        return Path(self.words[0]).name


def split_words(line: str) -> list[str]:
    """The words of a shell line, comments dropped; whitespace-separated when its quotes do not close here
    (a quote spanning lines, which no command to run has)."""
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        return line.split()


def quoted_commands() -> list[DocCommand]:
    """The command lines of the docs' shell blocks that call the app (continuation lines joined)."""
    commands = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            language, body = block.groups()
            if language not in ("", "bash", "sh", "shell"):
                continue
            where = f"{path.relative_to(REPO)}:{text.count(chr(10), 0, block.start()) + 2}"
            for line in re.sub(r"\\\n\s*", " ", body).splitlines():
                words = split_words(line)
                if not words or words[0].endswith("/"):  # a folder tree, not a command
                    continue
                program = Path(words[0]).name
                calls_app = any(re.search(r"\bbids_app", word) for word in words)
                if program in ENTRY_POINTS or (program in LAUNCHERS and calls_app) or CONTAINER_CHECK in line:
                    commands.append(DocCommand(where, where, line.strip()))
    return commands


def reason_to_skip(command: DocCommand) -> str | None:
    """Why ``command`` cannot run here, or None."""
    text, program = command.text, command.program
    if program in LAUNCHERS:
        return LAUNCHERS[program]
    if "..." in text or re.search(r"\[-|<[^>]+>", text):
        return "a synopsis (optional parts in [...], elided options, <placeholders>), not a complete command"
    if re.search(r"--device cuda", text):
        return "needs a CUDA GPU"
    if program == "bids_app-search":
        return "a search trains one model per trial: minutes (tests/cli/test_search.py runs a tiny one)"
    return None


COMMANDS = quoted_commands()


def test_the_docs_quote_commands_that_run_here() -> None:
    """Guards the collection itself: a change of fences or wording must not turn every test into a skip."""
    runnable = [c.text for c in COMMANDS if reason_to_skip(c) is None]
    assert any(" participant " in c for c in runnable) and any(" group " in c for c in runnable), runnable
    assert any(c.startswith("bids_app-generate") for c in runnable), runnable


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny cohort (8 participants, 1 session) with image and roi tensors: ``(bids_dir, output_dir)``."""
    root = tmp_path_factory.mktemp("docs_cohort")
    mask = root / "bids" / "code" / "template" / "roi-hippocampus_mask.nii.gz"
    dataset, out = make_cohort(root, 8, 1, "--modes", "image", "roi", "--roi-mask", f"hippocampus={mask}")
    return dataset.bids_dir, out


_block_dirs: dict[str, Path] = {}
_done: set[DocCommand] = set()


def to_argv(command: DocCommand, workdir: Path, paths: dict[str, Path]) -> list[str]:
    """The command as this machine runs it (see the module docstring)."""
    words = command.words
    if CONTAINER_CHECK in command.text:
        words = ["bids_app", *words[words.index("--") + 1 :]]
    argv = [str(Path(sys.executable).parent / Path(words[0]).name)]
    for word in words[1:]:
        word = word.replace("/project/", f"{workdir}/").replace("/tmp/out", str(workdir / "tmp_out"))
        argv.append(PLACEHOLDER.sub(lambda m: str(paths["out" if _is_output(m.group(1)) else "bids"]), word))
    if "group" in argv[1:]:
        argv += TINY_GROUP
    return argv


def _is_output(placeholder: str) -> bool:
    return placeholder in ("OUTPUT_DIR", "/out", "/data/out") or placeholder.endswith("derivatives/bids_app")


def run_quoted(command: DocCommand, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Run ``command`` after the earlier runnable commands of its block, in the block's working folder."""
    workdir = _block_dirs.setdefault(command.block, tmp_path)
    paths: dict[str, Path] = {}
    if PLACEHOLDER.search(command.text) and CONTAINER_CHECK not in command.text:
        bids_dir, out = request.getfixturevalue("cohort")
        paths = {"bids": bids_dir, "out": tmp_path / "out"}
        shutil.copytree(out, paths["out"])
    for earlier in COMMANDS:
        if earlier.block == command.block and earlier not in _done and reason_to_skip(earlier) is None:
            if earlier == command:
                break
            run_quoted(earlier, request, tmp_path)
    argv = to_argv(command, workdir, paths)
    done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=300, check=False)
    _done.add(command)
    assert done.returncode == 0, (
        f"{command.where}: `{command.text}` exits {done.returncode} here as\n{shlex.join(argv)}\n{done.stderr[-3000:]}"
    )


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where}:{c.text[:60]}" for c in COMMANDS])
def test_quoted_command_works(command: DocCommand, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    reason = reason_to_skip(command)
    if reason is not None:
        pytest.skip(f"{command.where} `{command.text[:80]}`: {reason}")
    if command not in _done:
        run_quoted(command, request, tmp_path)
