"""The layer rules of the README's architecture section, checked on the source: ``monitors/``
never imports ``pipeline/``; only ``monitors/formats/sinks.py`` imports wandb; each wing of
``monitors/`` imports only from its own wing and from the wings below it; and no two modules
import each other, directly or through others (no circle)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the wings of monitors/, bottom up: a module may import its own wing and the wings of lower
#: layers ("" is the package's top: __init__, __main__, the command line)
LAYERS: dict[str, int] = {"core": 0, "formats": 1, "plugins": 2, "health": 2, "tsne": 2, "dashboard": 2,
                          "attaching": 3, "audit": 3, "integrations": 4, "": 5}


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


def _dotted(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _monitors_imports(path: Path) -> set[str]:
    """The ``monitors.*`` modules a module imports (relative imports resolved; ``from X import
    name`` counts X.name when that is a module, else X)."""
    modules = {_dotted(p) for p in _monitor_modules()}
    package = _dotted(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("monitors"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("monitors"))
    return {m for m in out if m in modules}


def _wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""


def test_monitors_never_import_pipeline():
    """Neither an import statement nor ``importlib.import_module("pipeline...")`` / ``__import__``."""
    dynamic = re.compile(r"""(import_module|__import__)\(\s*["']pipeline\b""")
    bad = [str(p.relative_to(ROOT)) for p in _monitor_modules()
           if "pipeline" in _imports(p) or dynamic.search(p.read_text())]
    assert not bad, f"monitors/ must not import pipeline/: {bad}"


def test_only_the_wandb_sink_imports_wandb():
    users = {str(p.relative_to(ROOT)) for p in _monitor_modules() if "wandb" in _imports(p)}
    assert users == {"monitors/formats/sinks.py"}, users


def test_every_wing_is_a_documented_subpackage_with_a_layer():
    wings = {p.parent.name for p in (ROOT / "monitors").glob("*/__init__.py")}
    assert wings <= set(LAYERS), f"wings without a layer in this test and the README: {wings - set(LAYERS)}"
    for w in wings:
        doc = ast.get_docstring(ast.parse((ROOT / "monitors" / w / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 15, f"monitors/{w}/__init__.py needs a paragraph saying what it owns"
    top = {p.stem for p in (ROOT / "monitors").glob("*.py")}
    assert top <= {"__init__", "__main__"}, f"modules outside the wings: {sorted(top)}"


def test_no_import_from_a_lower_layer_up():
    bad = []
    for p in _monitor_modules():
        me = _dotted(p)
        for dep in _monitors_imports(p):
            a, b = _wing(me), _wing(dep)
            if a != b and LAYERS[b] >= LAYERS[a]:
                bad.append(f"{me} (layer {LAYERS[a]}) imports {dep} (layer {LAYERS[b]})")
    assert not bad, "imports that run up or across the layers:\n" + "\n".join(bad)


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports in ``graph`` (module -> modules it imports), as the path around it, or
    None. A module importing its own package (or the reverse) is not counted."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d == m or m.startswith(d + ".") or d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_circle():
    graph = {_dotted(p): _monitors_imports(p) for p in _monitor_modules()}
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_the_circle_check_sees_a_circle():
    """Not vacuous: the capture -> attached hub -> capture circle of an earlier layout is found."""
    graph = {"monitors.attaching.capture": {"monitors.attaching.attached_hub"},
             "monitors.attaching.attached_hub": {"monitors.attaching.capture", "monitors.core.hub"},
             "monitors.core.hub": set()}
    assert find_circle(graph) == ["monitors.attaching.attached_hub", "monitors.attaching.capture",
                                  "monitors.attaching.attached_hub"]
