"""The package's shape, as docs/design.md ("The tree") states it: layers that import only the
layers they may, no module reaching into another's private names, modules of a readable size,
the old flat import paths as aliases of the new modules, and the design page's sections that the
code cites."""
import ast
import importlib
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import pbp_fast

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "pbp_fast").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))
MAX_LINES = 420  # "about 400"

# layer of a module -> the layers it may import (docs/design.md, "The tree")
LAYERS = {
    "ops": {"ops", "kernels", "_C"},
    "kernels": {"ops", "kernels"},
    "core": {"ops", "core", "distributed.group"},
    "distributed": {"distributed", "core"},
    "recipe": {"ops", "core", "distributed", "recipe", "deploy"},
    "deploy": {"ops", "core", "distributed", "recipe", "deploy"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["pbp_fast"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(imported module, names or None, line) for every pbp_fast import of the file."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pbp_fast"):
            yield node.module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pbp_fast"):
                    yield a.name, None, node.lineno


def _layer(dotted: str) -> str | None:
    parts = dotted.split(".")
    if len(parts) < 2:
        return None
    return parts[1]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size_and_imports(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path} has grown past the budget"
    me = _module_name(path)
    layer = _layer(me)
    for module, names, line in _imports(path):
        # no private names of another module (dunders and the compiled extension _C are fine)
        for n in names or []:
            assert not n.startswith("_") or n.startswith("__") or n == "_C", \
                f"{path}:{line} imports the private name {n} from {module}"
        if layer not in LAYERS:  # the package root and the command line may import anything
            continue
        # ``from pbp_fast import x`` imports the module pbp_fast.x
        targets = [f"{module}.{n}" for n in names] if module == "pbp_fast" else [module]
        for target in targets:
            sub = target.split(".")[1:]
            assert sub[0] in LAYERS[layer] or ".".join(sub[:2]) in LAYERS[layer], \
                f"{path}:{line}: the {layer} layer imports {target}"


def test_no_module_reads_private_attributes_of_another():
    """``mod._name`` where ``mod`` is a pbp_fast module imported by name."""
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pbp_fast"):
                aliases |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name.split(".")[0] for a in node.names
                            if a.name.startswith("pbp_fast")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and node.attr != "_C":
                pytest.fail(f"{path}:{node.lineno} reads {node.value.id}.{node.attr}")


@pytest.mark.parametrize("old, new", sorted(pbp_fast.MOVED.items()))
def test_old_import_paths_are_the_new_modules(old, new):
    assert importlib.import_module(f"pbp_fast.{old}") is importlib.import_module(new)
    assert getattr(pbp_fast, old) is importlib.import_module(new)
    assert importlib.import_module(new).__spec__.name == new


def test_old_public_names_still_import():
    from pbp_fast.nn import DendriticConv2d, DendriticLinear, DendriticUnit  # noqa: F401
    from pbp_fast.train import TrainConfig, build_optimizer, evaluate, train  # noqa: F401
    from pbp_fast.data import BatchLoader, cifar10, digits, epoch_seed  # noqa: F401
    from pbp_fast.functional import candidate_pass, dendritic_conv2d  # noqa: F401
    from pbp_fast.controller import PBConfig, PerforatedBackprop  # noqa: F401
    assert pbp_fast.functional.dendritic_conv2d is dendritic_conv2d
    assert pbp_fast.PBConfig is PBConfig and pbp_fast.nn.DendriticConv2d is DendriticConv2d


@pytest.mark.parametrize("entry", ["pbp_fast.core.unit", "pbp_fast.distributed.wrap",
                                   "pbp_fast.recipe.trainer", "pbp_fast.deploy.report",
                                   "pbp_fast.cli.export", "pbp_fast.nn"])
def test_each_entry_point_imports_first_in_a_fresh_interpreter(entry):
    """Import cycles show only in the order a user happens to import: each of these first."""
    run = subprocess.run([sys.executable, "-c", f"import {entry}"], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_design_sections_the_code_cites_exist():
    headings = set(re.findall(r"^## (.+)$", (ROOT / "docs" / "design.md").read_text(), re.M))
    cited = set()
    for path in SOURCES + sorted((ROOT / "csrc").rglob("*.[ch]*")) + sorted(
            (ROOT / "tests").glob("*.py")):
        cited |= set(re.findall(r'docs/design\.md,? "([^"]+)"', path.read_text()))
    assert cited and cited <= headings, cited - headings


def test_the_trainer_takes_its_pb_defaults_from_pbconfig():
    from pbp_fast.core import PBConfig
    from pbp_fast.recipe.config import PB_FIELDS, TrainConfig
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    pb = PBConfig()
    assert set(PB_FIELDS) <= {f.name for f in fields(PBConfig)}
    for name in PB_FIELDS:
        assert defaults["pb_" + name] == getattr(pb, name), name
