"""README.md's tables held against the code, so that the two cannot drift apart.

What is checked, and the conventions the README follows for it:

- **Metric names** (the table ``| name | what it logs |`` under "## Monitors"): one row per name
  of ``monitors.core.registry.REGISTRY``; the backticked tokens of a row of the form ``namespace/...``
  are metric names, and after brace expansion (``proto/norm/{mean,min}`` is ``proto/norm/mean`` and
  ``proto/norm/min``) they are exactly that monitor's ``metrics`` tuple. A part that comes from
  the run is written in angle brackets, the same in the README and in the code:
  ``grad/<group>/norm`` (one per entry of ``ctx.param_groups``), ``health/<severity>/<CODE>``.
- **Hub keys** (the table ``| key written by the hub | in | what it is |``): its ``history`` rows
  are ``MonitorHub.metrics``, its ``summary`` rows ``MonitorHub.summary_keys`` (the keys of
  ``MonitorHub.health_summary()``).
- **Declared means used**: in the module of every registered monitor and in ``monitors/core/hub.py``,
  every string literal that is a metric name (``proto/...``, ``grad/...``, ``perf/...``,
  ``health/...``) is declared by a class of that module, and no metric name is built with an
  f-string (fill a placeholder of a declared literal instead).
- **Events** (the table ``| event | when | what the context holds |``): exactly
  ``monitors.core.events.EVENTS``, in order; the extra hooks (``on_log``, ``on_collective``) are named
  in the same section.
- **Finding codes** (the table ``| code | severity | fires when | fix |`` under "### Findings"):
  exactly the codes of ``monitors.core.codes.CODES``, once each; the first word of the severity cell is
  the code's default severity. Every code-like word anywhere in the README (``PROTO_*``,
  ``TEACHER_*``, ``*_FAILED``, and every upper-case backticked name in the findings gallery and
  the bug-reproduction table) is a code. Every code is raised somewhere: it is an argument of a
  call (``self.report(ctx, CODE, ...)``, ``Finding(CODE, ...)``) in ``monitors/`` or
  ``pipeline/`` outside ``monitors/core/codes.py``.

- **Where each thing lives** (the Architecture section): the monitor map ``| monitor | file |
  class |`` names each registered monitor's module and class; the findings map ``| codes | file
  |`` puts every code in one row whose first file holds it; every ``.py`` path the README names
  exists.

Keys written outside the monitors and the hub (``train/*``, ``eval/*``, ``perf/step_ms``,
``data/*`` and ``dist/*`` by the pipeline, ``proto/usage/sampled`` by ``attach()``'s automatic
capture, ``health/finding/<CODE>`` by the W&B sink) are named in the README's prose, not in these
tables, and are not checked here.
"""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from monitors.core.codes import CODES
from monitors.core.events import EVENTS, EXTRA_HOOKS
from monitors.core.hub import MonitorHub
from monitors.core.registry import REGISTRY, monitor_class

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
#: a metric name as a literal: a namespace the monitors and the hub write, then a path
METRIC_LITERAL = re.compile(r"(?:proto|grad|perf|health)/[A-Za-z0-9_/<>]+")
#: a metric name or brace pattern in the README: ``proto/norm/{mean,min}``, ``grad/<group>/norm``
METRIC_TOKEN = re.compile(r"[a-z]+/[A-Za-z0-9_/<>{},]+")
CODE_WORD = re.compile(r"\b(?:(?:PROTO|TEACHER)_[A-Z0-9_]*[A-Z0-9]|[A-Z][A-Z0-9_]*_FAILED)\b")
UPPER_NAME = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+")


# -- reading the README ----------------------------------------------------------------------
def section(title: str) -> str:
    """The text under the heading ``title`` (its exact text, with the #s), up to the next heading
    of the same or a higher level."""
    lines = README.splitlines()
    level = len(title) - len(title.lstrip("#"))
    starts = [i for i, line in enumerate(lines) if line.strip() == title]
    assert starts, f"README.md has no heading {title!r}"
    out = []
    for line in lines[starts[0] + 1:]:
        m = re.match(r"(#+) ", line)
        if m and len(m.group(1)) <= level:
            break
        out.append(line)
    return "\n".join(out)


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row; a ``|`` inside backticks does not split."""
    cells, cur, in_code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
    cells.append(cur.strip())
    return cells


def table(text: str, header: list[str]) -> list[list[str]]:
    """The rows (lists of cells) of the one table in ``text`` whose header row is ``header``."""
    lines = text.splitlines()
    found = [i for i, line in enumerate(lines) if line.lstrip().startswith("|") and split_row(line) == header]
    assert len(found) == 1, f"expected one table with header {header} in that README section, found {len(found)}"
    rows = []
    for line in lines[found[0] + 2:]:  # skip the | --- | line
        if not line.lstrip().startswith("|"):
            break
        rows.append(split_row(line))
    return rows


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def expand(name: str) -> list[str]:
    """Brace expansion: ``a/{b,c}_{d,e}`` -> ``a/b_d``, ``a/b_e``, ``a/c_d``, ``a/c_e``."""
    m = re.search(r"\{([^{}]*)\}", name)
    if m is None:
        return [name]
    return [x for alt in m.group(1).split(",") for x in expand(name[:m.start()] + alt + name[m.end():])]


def metric_names(cell: str) -> list[str]:
    """The metric names of a table cell: its backticked ``namespace/...`` tokens (a file path such
    as ``monitors/x.py`` has a dot, so it is none), brace-expanded."""
    return [x for tok in backticked(cell) if METRIC_TOKEN.fullmatch(tok) for x in expand(tok)]


def diff_message(what: str, readme: set[str], code: set[str], code_where: str) -> str:
    parts = []
    if code - readme:
        parts.append(f"missing in README.md: {', '.join(sorted(code - readme))}")
    if readme - code:
        parts.append(f"in README.md but not in {code_where}: {', '.join(sorted(readme - code))}")
    return f"{what}: " + "; ".join(parts)


MONITORS_SECTION = section("## Monitors (`monitors/`)")
FINDINGS_SECTION = section("### Findings: what the health doctor reports")


# -- metric names ----------------------------------------------------------------------------
def test_brace_expansion():
    assert expand("proto/usage/{entropy,perplexity}_{student,teacher}") == [
        "proto/usage/entropy_student", "proto/usage/entropy_teacher",
        "proto/usage/perplexity_student", "proto/usage/perplexity_teacher"]
    assert expand("grad/<group>/norm") == ["grad/<group>/norm"]


def test_metric_table_lists_every_monitor_and_exactly_its_declared_names():
    rows = table(MONITORS_SECTION, ["name", "what it logs"])
    by_name: dict[str, list[str]] = {}
    for cells in rows:
        (name,) = backticked(cells[0])
        assert name not in by_name, f"monitor {name!r} has two rows in the README's metric table"
        by_name[name] = metric_names(cells[1])
    assert set(by_name) == set(REGISTRY), diff_message(
        "monitors of the README's metric table", set(by_name), set(REGISTRY), "monitors.core.registry.REGISTRY")
    for name, listed in by_name.items():
        cls = monitor_class(name)
        declared = set(cls.metrics)
        assert len(declared) == len(cls.metrics), f"{cls.__name__}.metrics names a metric twice"
        assert set(listed) == declared, diff_message(
            f"metrics of monitor {name!r}", set(listed), declared, f"{cls.__name__}.metrics")


def test_hub_table_lists_exactly_the_hub_keys():
    rows = table(MONITORS_SECTION, ["key written by the hub", "in", "what it is"])
    listed: dict[str, set[str]] = {"history": set(), "summary": set()}
    for cells in rows:
        assert cells[1] in listed, f"the 'in' cell of a hub key is 'history' or 'summary', got {cells[1]!r}"
        listed[cells[1]].update(metric_names(cells[0]))
    assert listed["history"] == set(MonitorHub.metrics), diff_message(
        "history keys of the hub", listed["history"], set(MonitorHub.metrics), "MonitorHub.metrics")
    assert listed["summary"] == set(MonitorHub.summary_keys), diff_message(
        "summary keys of the hub", listed["summary"], set(MonitorHub.summary_keys), "MonitorHub.summary_keys")
    assert set(MonitorHub(console=None).health_summary()) == set(MonitorHub.summary_keys)


def _declaring_modules() -> dict[str, set[str]]:
    """Module file -> the metric names its classes declare (``metrics``, ``summary_keys``)."""
    out: dict[str, set[str]] = {}
    for target in list(REGISTRY.values()) + ["monitors.core.hub:MonitorHub"]:
        module = importlib.import_module(target.split(":")[0])
        names = out.setdefault(module.__file__, set())
        for obj in vars(module).values():
            if isinstance(obj, type) and obj.__module__ == module.__name__:
                names.update(getattr(obj, "metrics", ()), getattr(obj, "summary_keys", ()))
    return out


def test_every_metric_literal_in_the_monitors_is_declared():
    problems = []
    for path, declared in _declaring_modules().items():
        rel = Path(path).relative_to(ROOT)
        for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if METRIC_LITERAL.fullmatch(node.value) and node.value not in declared:
                    problems.append(f"{rel}:{node.lineno}: {node.value!r} is not declared in its class's metrics")
            elif isinstance(node, ast.JoinedStr) and node.values:
                head = node.values[0]
                if isinstance(head, ast.Constant) and re.match(r"(?:proto|grad|perf|health)/", str(head.value)):
                    problems.append(f"{rel}:{node.lineno}: a metric name built with an f-string "
                                    f"(declare a literal with a <placeholder> and fill it)")
    assert not problems, "\n".join(problems)


# -- events ----------------------------------------------------------------------------------
def test_event_table_lists_exactly_the_events_in_order():
    rows = table(MONITORS_SECTION, ["event", "when", "what the context holds"])
    listed = [backticked(cells[0])[0] for cells in rows]
    assert set(listed) == set(EVENTS), diff_message(
        "events of the README's event table", set(listed), set(EVENTS), "monitors.core.events.EVENTS")
    assert listed == list(EVENTS), f"the README's event table is not in the order of EVENTS: {listed}"
    for hook in EXTRA_HOOKS:
        assert f"`{hook}" in MONITORS_SECTION, f"the extra hook {hook} is not named in the README's Monitors section"


# -- finding codes ---------------------------------------------------------------------------
def test_findings_table_lists_exactly_the_codes_with_their_severity():
    rows = table(FINDINGS_SECTION, ["code", "severity", "fires when", "fix"])
    listed = [backticked(cells[0])[0] for cells in rows]
    twice = sorted({c for c in listed if listed.count(c) > 1})
    assert not twice, f"codes with two rows in the README's findings table: {', '.join(twice)}"
    assert set(listed) == set(CODES), diff_message(
        "codes of the README's findings table", set(listed), set(CODES), "monitors/core/codes.py")
    for cells in rows:
        code = backticked(cells[0])[0]
        severity = re.match(r"[a-z]+", cells[1])
        assert severity is not None and severity.group() == CODES[code].severity, (
            f"{code}: the README's severity {cells[1]!r} does not begin with {CODES[code].severity!r} "
            "(monitors/core/codes.py)")


@pytest.mark.parametrize("where", ["### Findings gallery: bugs that real trainers ship",
                                   "### Bug reproductions (`experiments/bugs/`)"])
def test_sections_that_cite_codes_cite_existing_ones(where):
    cited = {tok for tok in backticked(section(where)) if UPPER_NAME.fullmatch(tok)}
    assert cited, f"no code cited in {where!r}: the test reads the wrong section"
    unknown = cited - set(CODES)
    assert not unknown, f"{where!r} cites codes that monitors/core/codes.py does not define: {', '.join(sorted(unknown))}"


def test_every_code_word_in_the_readme_is_a_code():
    unknown = set(CODE_WORD.findall(README)) - set(CODES)
    assert not unknown, f"README.md names codes that monitors/core/codes.py does not define: {', '.join(sorted(unknown))}"


def test_every_code_is_raised_outside_codes_py():
    raised: set[str] = set()
    files = sorted((ROOT / "monitors").rglob("*.py")) + sorted((ROOT / "pipeline").rglob("*.py"))
    for path in files:
        if path == ROOT / "monitors" / "codes.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                for arg in [*node.args, *(k.value for k in node.keywords)]:
                    if isinstance(arg, ast.Name):
                        raised.add(arg.id)
                    elif isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        raised.add(arg.value)
    never = set(CODES) - raised
    assert not never, f"codes no code raises (no call in monitors/ or pipeline/ takes them): {', '.join(sorted(never))}"


# -- where each thing lives (the README's Architecture section) ---------------------------------
WHERE_SECTION = section("### Where each thing lives")


def test_monitor_map_names_each_monitors_file_and_class():
    """Every registered monitor has a row ``| name | file | class |`` whose first file is the module
    the registry imports it from, and whose class is the registered class."""
    rows = {r[0].strip("`"): r for r in table(WHERE_SECTION, ["monitor", "file", "class"])}
    assert set(rows) == set(REGISTRY), diff_message("monitor map", set(rows), set(REGISTRY), "REGISTRY")
    for name, target in REGISTRY.items():
        module, cls = target.split(":")
        files = [t for t in backticked(rows[name][1]) if t.endswith(".py")]
        assert files and files[0] == module.replace(".", "/") + ".py", (name, files, module)
        assert rows[name][2].strip("`") == cls, (name, rows[name][2], cls)


def test_findings_map_names_a_file_that_raises_each_code():
    """Every code is in exactly one row ``| codes | file |``, and the first file of that row holds
    the code literally (the module that judges it)."""
    seen: dict[str, str] = {}
    for codes_cell, file_cell in table(WHERE_SECTION, ["codes", "file"]):
        files = [t for t in backticked(file_cell) if t.endswith(".py")]
        assert files, f"no file named for {codes_cell}"
        for code in backticked(codes_cell):
            assert code not in seen, f"{code} is in two rows of the findings map"
            seen[code] = files[0]
    assert set(seen) == set(CODES), diff_message("findings map", set(seen), set(CODES), "monitors/core/codes.py")
    for code, path in seen.items():
        assert re.search(rf"\b{code}\b", (ROOT / path).read_text()), f"{path} does not hold {code}"


def test_named_files_exist():
    """Every ``monitors/...py`` or ``pipeline/...py`` path the README names exists."""
    paths = set(re.findall(r"`((?:monitors|pipeline|benchmarks|scripts|tests)/[A-Za-z0-9_/]+\.py)`", README))
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, f"README.md names files that do not exist: {missing}"
