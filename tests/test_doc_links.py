"""The README stays short, every relative link of the README and docs/ reaches a file, and every test they name exists,
said to be slow exactly when only `make test-all` runs it."""

from __future__ import annotations

import ast
import functools
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 260
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _pages() -> list[str]:
    return [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def broken_links(path: str) -> list[str]:
    """Relative link targets in the Markdown file `path` that name no file or folder."""
    with open(path) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # Code blocks hold no links.
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # A URL or an anchor on the same page.
        file_part = target.split("#")[0]
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
        if not os.path.exists(resolved):
            broken.append(target)
    return broken


def test_the_readme_is_read_in_five_minutes():
    with open(os.path.join(REPO, "README.md")) as f:
        lines = sum(1 for _ in f)
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_every_relative_link_points_at_a_file():
    broken = {os.path.relpath(p, REPO): b for p in _pages() if (b := broken_links(p))}
    assert not broken, f"links to files that do not exist: {broken}"


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[a](there.md) [b](there.md#part) [c](missing.md) [d](https://example.org/x.md) [e](#top)\n"
                    "```\n[f](in-code.md)\n```\n")
    assert broken_links(str(page)) == ["missing.md"]


def test_the_readme_links_every_docs_page():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    pages = {f"docs/{os.path.basename(p)}" for p in glob.glob(os.path.join(REPO, "docs", "*.md"))}
    missing = sorted(p for p in pages if f"]({p}" not in readme)
    assert not missing, f"docs pages the README does not link: {missing}"


TEST_NAMED = re.compile(r"`(tests/\w+\.py)::(\w+)(?:\[[^`]*\])?`( \(slow\))?")


def _is_slow_mark(node: ast.expr) -> bool:
    return ast.unparse(node) in ("pytest.mark.slow", "slow")


@functools.lru_cache(maxsize=None)
def slow_tests(path: str) -> dict[str, bool]:
    """Each test function of the test file `path` -> whether only `-m slow` runs it (marked slow as a whole)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    module_slow = any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
                      and "slow" in ast.unparse(node.value) for node in tree.body)
    return {node.name: module_slow or any(_is_slow_mark(d) for d in node.decorator_list)
            for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def misnamed_tests(path: str) -> list[str]:
    """Tests the Markdown file `path` names that do not exist, or whose " (slow)" says otherwise than their mark."""
    with open(path) as f:
        text = f.read()
    wrong = []
    for file, name, said_slow in TEST_NAMED.findall(text):
        tests = slow_tests(os.path.join(REPO, file)) if os.path.exists(os.path.join(REPO, file)) else {}
        if name not in tests:
            wrong.append(f"{file}::{name} does not exist")
        elif tests[name] != bool(said_slow):
            wrong.append(f"{file}::{name} is {'' if tests[name] else 'not '}marked slow, the page says otherwise")
    return wrong


def test_every_test_a_page_names_exists_and_is_slow_as_it_says():
    wrong = {os.path.relpath(page, REPO): misnamed_tests(page) for page in _pages()}
    assert {page: tests for page, tests in wrong.items() if tests} == {}


def test_a_wrongly_said_slow_test_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("`tests/test_train.py::test_two_workers_train_to_identical_weights`, "
                    "`tests/test_docs.py::test_modules_are_short` (slow), `tests/test_docs.py::test_no_such_test`\n")
    assert slow_tests(os.path.join(REPO, "tests/test_train.py"))["test_two_workers_train_to_identical_weights"]
    assert len(misnamed_tests(str(page))) == 3
