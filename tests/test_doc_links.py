"""The README stays short, and every relative link of the README and docs/ reaches a file."""

from __future__ import annotations

import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 260
# Written on another branch at the same time; the link is kept so that it works once both are in.
PENDING = {"docs/commands.md"}
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
        if os.path.relpath(resolved, REPO) in PENDING:
            continue
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
    pages = {f"docs/{os.path.basename(p)}" for p in glob.glob(os.path.join(REPO, "docs", "*.md"))} | PENDING
    missing = sorted(p for p in pages if f"]({p}" not in readme)
    assert not missing, f"docs pages the README does not link: {missing}"
