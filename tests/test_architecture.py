"""The package's shape is a contract (docs/architecture.md): imports only go down, the model folder has one reader.

Every module is parsed (``ast``), not imported, so a rule broken inside a function body is caught too.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bids_app"

# Layers, top to bottom. A package or top-level module may import its own layer's members only when the layer
# says so (``SHARED`` and ``BASE`` members import each other; stages never import one another).
ENTRY = {"cli", "__main__"}  # command lines: nothing imports them
ORCHESTRATORS = {"levels": "*", "participant": {"inputs", "preprocess"}}  # sequence stages
STAGES = {"inputs", "preprocess", "split", "training", "baseline", "prediction", "interpret", "reports",
          "synthetic"}  # fmt: skip
SHARED = {"data", "extraction", "maps", "models", "portable", "tracking"}  # nouns the stages share
BASE = {"", "config", "config_file", "derivatives", "errors", "kinds", "labels", "log_setup", "metrics", "provenance",
        "runtime", "template"}  # fmt: skip
HEAVY = ("torch", "ants", "bids", "nibabel", "pandas", "numpy", "scipy", "sklearn", "matplotlib", "nilearn", "torchio")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layer member a module belongs to: ``bids_app.prediction.stage`` → ``prediction``, top level → itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(tree: ast.Module, *, top_level_only: bool = False) -> set[str]:
    """Names this module imports, anywhere or at module level only.

    ``from a import b`` imports module ``a.b`` when there is one, else a name of module ``a``.
    """
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "bids_app uses absolute imports only"
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in SOURCES else node.module or "")
    return found


def module_is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()


SOURCES = {module_name(path): path.read_text(encoding="utf-8") for path in sorted(PACKAGE.rglob("*.py"))}
TREES = {module: ast.parse(source) for module, source in SOURCES.items()}


def internal(names: set[str]) -> set[str]:
    """The modules of bids_app among ``names`` (``from bids_app.x import name`` counts as importing ``x``)."""
    return {name for name in names if name in TREES}


def test_every_package_and_top_level_module_has_a_layer() -> None:
    units = {unit(m) for m in TREES}
    classified = ENTRY | set(ORCHESTRATORS) | STAGES | SHARED | BASE
    assert units - classified == set(), "add the new package to a layer here and in docs/architecture.md"
    top_level = sorted(m for m in TREES if m.count(".") == 1 and not module_is_package(m))
    assert len([m for m in top_level if not m.endswith("__main__")]) <= 12, top_level


def violations(module: str, targets: set[str]) -> list[str]:
    """Why each of ``targets`` (bids_app modules) may not be imported by ``module``."""
    me, found = unit(module), []
    for target in sorted(targets):
        other, where = unit(target), f"{module} imports {target}"
        if other == me:
            continue
        if other in ENTRY and me != "__main__":
            found.append(f"{where}: nothing imports the command line")
        elif me in ENTRY:
            continue
        elif me in ORCHESTRATORS:
            allowed = ORCHESTRATORS[me]
            if other in ORCHESTRATORS and allowed != "*":
                found.append(f"{where}: orchestrators do not import each other")
            elif other in STAGES and allowed != "*" and other not in allowed:
                found.append(f"{where}: not a stage it sequences")
        elif me in STAGES:
            if other in STAGES:
                found.append(f"{where}: a stage never imports another stage (move the shared need down)")
            elif other in ORCHESTRATORS:
                found.append(f"{where}: stages do not import the orchestrators")
        elif me in SHARED:
            if other not in SHARED | BASE:
                found.append(f"{where}: a shared package imports only shared packages and base modules")
        elif other not in BASE:
            found.append(f"{where}: a base module imports only base modules")
    return found


@pytest.mark.parametrize("module", sorted(TREES))
def test_imports_only_go_down(module: str) -> None:
    assert violations(module, internal(imports(TREES[module]))) == []


def test_no_import_cycle() -> None:
    graph = {m: {t for t in internal(imports(tree)) if t != m} for m, tree in TREES.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])


def test_the_command_line_imports_nothing_heavy_when_loaded() -> None:
    """Statically: the module-level imports reachable from the entry points never name a heavy package."""
    seen: set[str] = set()
    todo = ["bids_app.cli.main", "bids_app.cli.arguments", "bids_app.__main__"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        names = imports(TREES[module], top_level_only=True)
        heavy = sorted(n for n in names if n.split(".")[0] in HEAVY)
        assert not heavy, f"{module} imports {heavy} at import time: --help would load them"
        parents = {".".join(n.split(".")[:k]) for n in internal(names) for k in range(2, n.count(".") + 2)}
        todo += sorted((internal(names) | parents) & set(TREES))
    assert "bids_app.levels" not in seen


def test_help_answers_without_torch_in_a_fresh_interpreter() -> None:
    code = (
        "import sys\nfrom bids_app.cli.arguments import build_parser\nbuild_parser().format_help()\n"
        "loaded = sorted(m for m in ('torch', 'ants', 'bids', 'pandas', 'nibabel') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr


def test_only_the_model_folder_module_reads_maps_json() -> None:
    """As ``grep -rl "maps.json" bids_app/`` would (the dot matching any character)."""
    assert sorted(m for m, source in SOURCES.items() if re.search(r"maps.json", source)) == ["bids_app.maps.folder"]


def test_the_model_folder_is_built_only_by_maps_and_levels() -> None:
    """``Maps``/``MapsLayout`` objects are made once per run by ``levels`` (or ``Maps.open``), then passed down."""
    for module, tree in TREES.items():
        if unit(module) in {"maps"} or module == "bids_app.levels":
            continue
        calls = [
            node.func.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in {"Maps", "MapsLayout"}
        ]
        assert not calls, f"{module} builds {calls}: take the Maps object levels passes down"


@pytest.mark.parametrize(
    ("module", "source", "rule"),
    [
        ("bids_app.prediction.stage", "from bids_app.training.stage import run_train_stage", "another stage"),
        ("bids_app.maps.folder", "from bids_app.prediction import voting", "shared package"),
        ("bids_app.levels", "from bids_app.cli import main", "command line"),
        ("bids_app.config", "from bids_app.maps import Maps", "base module"),
        ("bids_app.participant.job", "from bids_app.training import stage", "not a stage it sequences"),
    ],
)
def test_the_rules_catch_a_wrong_import(module: str, source: str, rule: str) -> None:
    """The rules are live: each of these imports, added to a real module, would fail the test above."""
    found = violations(module, internal(imports(ast.parse(source))))
    assert found and all(rule in reason for reason in found), found
