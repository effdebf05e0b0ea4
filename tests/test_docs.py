"""The docs name tests that exist."""

from __future__ import annotations

import ast
import importlib.util
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tests_in(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}


def test_every_test_the_guarantees_page_names_exists():
    with open(os.path.join(REPO, "docs", "guarantees.md")) as f:
        page = f.read()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]`]*\])?`", page)
    assert len(named) >= 10
    missing = [f"{path}::{name}" for path, name in named
               if not os.path.exists(os.path.join(REPO, path)) or name not in _tests_in(os.path.join(REPO, path))]
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"


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
