"""The docs name tests that exist."""

from __future__ import annotations

import ast
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
