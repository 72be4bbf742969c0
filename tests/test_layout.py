"""The layout's rules (README "Layout", ARCHITECTURE.md), checked on the source so they stay true."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "flashportrait"
#: a module longer than this must say why at its top (its docstring contains "Length")
MAX_LINES = 520


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved), at any depth."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _modules(PACKAGE / "models"), ids=lambda p: p.name)
def test_models_know_nothing_about_files(path):
    assert not any(name.startswith("flashportrait.checkpoints") for name in _imports(path)), path


@pytest.mark.parametrize("name", ["sampling.py", "alp.py", "windows.py", "guidance.py"])
def test_samplers_import_no_model_code(name):
    path = PACKAGE / name
    if not path.exists():
        pytest.skip(f"{name} does not exist")
    bad = [n for n in _imports(path) if n.startswith(("flashportrait.models", "flashportrait.window_model",
                                                       "flashportrait.pipeline"))]
    assert not bad, f"{name} imports {bad}"


def test_pipeline_knows_nothing_about_flags():
    assert not any(n.startswith(("flashportrait.args", "argparse")) for n in _imports(PACKAGE / "pipeline.py"))


@pytest.mark.parametrize("path", _modules(PACKAGE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_long_modules_say_why(path):
    lines = len(path.read_text().splitlines())
    if lines > MAX_LINES:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "Length" in doc, f"{path.relative_to(REPO_ROOT)} has {lines} lines and no reason at its top"


def _readme_layout() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("## Layout")
    return text[start : text.index("\n## ", start + 1)]


@pytest.mark.parametrize(
    "path",
    [p for p in _modules(PACKAGE) if p.name != "__init__.py" and not p.name.startswith("_")]
    + sorted(REPO_ROOT.glob("*.py")),
    ids=lambda p: str(p.relative_to(REPO_ROOT)),
)
def test_readme_layout_names_every_file(path):
    """README "Layout" has a line for every module and script (several may share a line: ``a.py, b.py``)."""
    layout = _readme_layout()
    assert path.name in layout, f"README.md's Layout does not mention {path.relative_to(REPO_ROOT)}"
