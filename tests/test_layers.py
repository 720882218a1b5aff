"""The layer rules of the README's architecture section, checked on the source: ``monitors/``
never imports ``pipeline/``, and only ``monitors/formats/sinks.py`` imports wandb."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports (anywhere in it, including inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _monitor_modules() -> list[Path]:
    files = sorted((ROOT / "monitors").rglob("*.py"))
    assert len(files) > 20  # the package is there
    return files


def test_monitors_never_import_pipeline():
    bad = [str(p.relative_to(ROOT)) for p in _monitor_modules() if "pipeline" in _imports(p)]
    assert not bad, f"monitors/ must not import pipeline/: {bad}"


def test_only_the_wandb_sink_imports_wandb():
    users = {str(p.relative_to(ROOT)) for p in _monitor_modules() if "wandb" in _imports(p)}
    assert users == {"monitors/formats/sinks.py"}, users
