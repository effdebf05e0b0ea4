"""The docs name tests that exist."""

from __future__ import annotations

import ast
import importlib.util
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module_exists(name: str) -> bool:
    # Found without importing it: the top package's folder, then the path below it.
    top, *rest = name.split(".")
    if os.path.isdir(os.path.join(REPO, top)):
        roots = [os.path.join(REPO, top)]
    else:
        spec = importlib.util.find_spec(top)
        roots = list(spec.submodule_search_locations or []) if spec else []
    return any(os.path.isfile(os.path.join(root, *rest) + ".py") or
               os.path.isfile(os.path.join(root, *rest, "__main__.py")) for root in roots)


def test_every_command_the_data_page_names_exists():
    with open(os.path.join(REPO, "docs", "data.md")) as f:
        page = f.read()
    with open(os.path.join(REPO, "Makefile")) as f:
        targets = set(re.findall(r"^([\w-]+):", f.read(), re.M))
    named_targets = set(re.findall(r"\bmake ([\w-]+)", page))
    modules = set(re.findall(r"\bpython -m ([\w.]+)", page))
    assert named_targets and modules
    missing = sorted(f"make {t}" for t in named_targets - targets)
    missing += sorted(f"python -m {m}" for m in modules if not _module_exists(m))
    assert not missing, f"docs/data.md names commands that do not exist: {missing}"


PACKAGES = ("tfrecords", "pipelines", "alexnet_tf", "toolcli")
MAX_MODULE_LINES = 450  # A module a reader can keep in mind.


def _modules() -> list[str]:
    return sorted(f"{p}/{name}" for p in PACKAGES for name in os.listdir(os.path.join(REPO, p))
                  if name.endswith(".py"))


def _one_job(path: str) -> str | None:
    """The first line of a module's docstring, or None."""
    with open(os.path.join(REPO, path)) as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    return doc.strip().splitlines()[0] if doc else None


def test_every_module_says_its_one_job_and_the_modules_page_says_the_same():
    with open(os.path.join(REPO, "docs", "modules.md")) as f:
        page = f.read()
    modules = [m for m in _modules() if not m.endswith("/__init__.py") or _one_job(m)]
    assert len(modules) > 20
    silent = [m for m in modules if not _one_job(m) and not m.endswith("/__init__.py")]
    assert not silent, f"modules without a docstring saying their job: {silent}"
    rows = dict(re.findall(r"^\| `([\w/]+\.py)` \| (.*?) \|", page, re.M))
    stale = [f"| `{m}` | {_one_job(m)} |" for m in modules if rows.get(m) != _one_job(m)]
    gone = sorted(set(rows) - set(modules))
    assert not stale and not gone, ("docs/modules.md is stale; rows to write (each module's docstring, first line):\n"
                                    + "\n".join(stale) + f"\nrows of modules that are gone: {gone}")


def test_no_module_is_longer_than_a_reader_keeps_in_mind():
    lengths = {m: sum(1 for _ in open(os.path.join(REPO, m))) for m in _modules()}
    long = {m: n for m, n in lengths.items() if n > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by job): {long}"


def _imports(path: str) -> set[str]:
    with open(os.path.join(REPO, path)) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_the_build_and_the_contract_import_nothing_of_the_trainers_package():
    crossing = {m: sorted(i for i in _imports(m) if i.split(".")[0] == "alexnet_tf")
                for m in _modules() if m.split("/")[0] in ("pipelines", "tfrecords")}
    crossing = {m: i for m, i in crossing.items() if i}
    assert not crossing, f"the build and the data contract must not import alexnet_tf: {crossing}"
    contract = {m: sorted(i for i in _imports(m) if i.split(".")[0] == "pipelines")
                for m in _modules() if m.startswith("tfrecords/")}
    assert not any(contract.values()), f"the data contract must not import the build: {contract}"
    shared = {m: sorted(i for i in _imports(m) if i.split(".")[0] in ("tfrecords", "pipelines", "alexnet_tf"))
              for m in _modules() if m.startswith("toolcli/")}
    assert not any(shared.values()), f"the commands' shared plumbing must import none of the packages: {shared}"


def _top_level_imports(path: str) -> set[str]:
    """The first-party modules `path` imports when it is loaded (imports inside functions aside)."""
    with open(os.path.join(REPO, path)) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    known = {m[:-3].replace("/", ".") for m in _modules()}
    return {n for n in names if n in known and not n.endswith("__init__")}


def test_no_import_cycles():
    graph = {m[:-3].replace("/", "."): _top_level_imports(m) for m in _modules()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done.

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
