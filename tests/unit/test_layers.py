"""The code's layers: `pipeline/` is the library and imports neither the stages nor the flows, and
its packages are layered (each imports only lower ones); a stage imports only the library; each
stage module declares its stage (pipeline.runtime.contract) under its own name. (That reading the declarations imports no torch takes a process:
tests/e2e/test_stage_launch.py.)"""

import ast
import pkgutil
from pathlib import Path

import pytest

import stages
from pipeline.runtime.contract import Stage

ROOT = Path(__file__).resolve().parents[2]
STAGE_MODULES = sorted(m.name for m in pkgutil.iter_modules(stages.__path__))


def imported(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function (a lazy import is an import too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def top_packages(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported(path)}


@pytest.mark.parametrize("file", sorted((ROOT / "pipeline").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_imports_no_stage_and_no_flow(file):
    assert not top_packages(file) & {"stages", "flows"}, f"{file} imports upward: {sorted(imported(file))}"


# The library's packages, lowest layer first: a package imports only itself and the packages of
# lower layers (docs/development.md says what each holds).
LAYERS = [{"results", "sandbox", "losses"}, {"config"}, {"runtime", "data", "tracking", "demo"}, {"sampling"},
          {"models", "evaluation"}, {"reporting"}, {"training"}, {"orchestration"}]
LAYER = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def test_the_library_is_its_layered_packages_only():
    found = {p.name for p in (ROOT / "pipeline").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    loose = {p.name for p in (ROOT / "pipeline").glob("*.py")} - {"__init__.py"}
    assert found == set(LAYER) and not loose


@pytest.mark.parametrize("file", sorted((ROOT / "pipeline").glob("*/**/*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_library_package_imports_only_itself_and_lower_layers(file):
    package = file.relative_to(ROOT / "pipeline").parts[0]
    used = {name.split(".")[1] for name in imported(file) if name.startswith("pipeline.")}
    upward = {other for other in used if other != package and LAYER[other] >= LAYER[package]}
    assert not upward, f"{file} ({package}, layer {LAYER[package]}) imports {sorted(upward)}"


@pytest.mark.parametrize("folder", ["flows", "bench"])
def test_no_flow_or_bench_script_is_named_like_a_package(folder):
    """A script's own folder comes first on the import path: Prefect loads a deployment's
    entrypoint as a module named after its file (a flows/pipeline.py shadowed the library: its
    `pipeline.results` became the repository's results/ folder), and `python bench/x.py` finds a
    bench/pipeline.py before the library."""
    names = {p.stem for p in (ROOT / folder).glob("*.py")}
    assert not names & {"pipeline", "stages", "flows"}
    if folder == "flows":  # Prefect's entrypoint module names, beside pipeline's own packages'
        assert not names & set(LAYER)


@pytest.mark.parametrize("file", sorted((ROOT / "stages").glob("*.py")), ids=lambda p: p.name)
def test_a_stage_imports_only_the_library(file):
    assert not top_packages(file) & {"stages", "flows", "tests"}, f"{file}: {sorted(imported(file))}"


@pytest.mark.parametrize("file", sorted(p for d in ("pipeline", "stages", "flows") for p in (ROOT / d).rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_are_absolute(file):
    """The walks here read absolute imports only: a relative one would pass them unseen."""
    relative = [n.lineno for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative, f"{file}: relative imports at lines {relative}"


def test_the_walk_sees_lazy_imports(tmp_path):
    """The check above would pass vacuously if it missed imports inside functions."""
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from flows.pipeline_flow import run_pipeline\n")
    assert top_packages(module) == {"os", "flows"}


def test_each_stage_module_declares_its_stage_under_its_own_name():
    import importlib

    for name in STAGE_MODULES:
        stage = importlib.import_module(f"stages.{name}").STAGE
        assert isinstance(stage, Stage) and stage.name == name and stage.module == f"stages.{name}"
        assert stage.run.__module__ == f"stages.{name}"
