"""The flag reference, `docs/flags.md`: every tool's flags, generated from the tools themselves.

    python -m toolcli.reference            # writes docs/flags.md
    python -m toolcli.reference --check    # exit status 1, and one line, when docs/flags.md is not what the code gives

The tools are `pyproject.toml`'s `[project.scripts]`, in its order; each one's
module is imported by name and read through what every tool has: its
`define_flags()` and its `COMMAND` (usage, what it does, and the flag groups
shown in tables of their own). Nothing of the project is imported by this
module itself, and the page holds nothing of the machine that wrote it.
"""

from __future__ import annotations

import importlib
import os
import re
import tomllib
from unittest import mock

from absl import flags

from toolcli import quiet
from toolcli.command import Command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = "docs/flags.md"  # Relative to the repository.
REGENERATE = "python -m toolcli.reference"
# What a help text that names this machine (data_service's --host) shows instead.
HOST = "HOST"


def tools(pyproject: str = os.path.join(REPO, "pyproject.toml")) -> list[tuple[str, str]]:
    """(console script, module) of every tool, in `[project.scripts]`'s order."""
    with open(pyproject, "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    return [(script, target.split(":")[0]) for script, target in scripts.items()]


def tool_flags(module: str) -> tuple[Command, flags.FlagValues]:
    """A tool's `COMMAND` and its flags, defined as on a machine named `HOST`."""
    tool = importlib.import_module(module)
    with mock.patch("socket.gethostname", return_value=HOST):
        return tool.COMMAND, tool.define_flags()


def _escape(text: str) -> str:
    """Text for a Markdown table cell: one line, `|` escaped, and `<` too outside code spans (else it is HTML)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "\\<") for i, p in enumerate(parts))


def _name(flag: flags.Flag) -> str:
    return f"`--[no]{flag.name}`" if flag.boolean else f"`--{flag.name}`"


def _type(flag: flags.Flag) -> str:
    choices = getattr(flag.parser, "enum_values", None)
    if choices:
        return "one of " + ", ".join(f"`{c}`" for c in choices)
    if isinstance(flag.parser, flags.ListParser):
        return "comma-separated list"
    return {"string": "string", "int": "int", "float": "float", "bool": "bool"}.get(flag.flag_type(), flag.flag_type())


def _default(flag: flags.Flag) -> str:
    """The default as `--help` shows it (lists joined by commas, on/off as true/false), without its quotes."""
    shown = flag.default_as_str
    if shown is None:
        return "none"
    shown = shown[1:-1] if len(shown) >= 2 and shown[0] == shown[-1] == "'" else shown
    return "`" + shown.replace("|", "\\|") + "`" if shown else "empty"


def _help(flag: flags.Flag) -> str:
    text = flag.help
    choices = getattr(flag.parser, "enum_values", None)
    prefix = "<" + "|".join(choices) + ">: " if choices else ""
    if prefix and text.startswith(prefix):  # absl's own list of an enum's choices; the type column has them.
        text = text[len(prefix):]
    return _escape(text)


def flag_table(fv: flags.FlagValues, names) -> list[str]:
    """A Markdown table of the flags `names` of `fv`: flag, type, default, what it does."""
    rows = ["| flag | type | default | what it does |", "|---|---|---|---|"]
    for name in names:
        flag = fv[name]
        rows.append(f"| {_name(flag)} | {_type(flag)} | {_default(flag)} | {_help(flag)} |")
    return rows


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _heading(script: str, module: str) -> str:
    return f"{script} (python -m {module})"


def _first_paragraph(text: str) -> str:
    return " ".join(text.strip().split("\n\n")[0].split())


def tool_section(script: str, module: str) -> list[str]:
    """One tool's part of the page: heading, usage, what it does, and its flags' tables."""
    command, fv = tool_flags(module)
    grouped = [name for group in command.groups for name in group.names]
    missing = sorted(set(grouped) - set(fv))
    if missing:
        raise ValueError(f"{module}: COMMAND.groups names flags it does not define: {', '.join(missing)}")
    lines = [f"## {_heading(script, module)}", "", f"Console script `{script}`, or `python -m {module}`.", "",
             "```", f"usage: {command.usage}", "```", "", _first_paragraph(command.about), ""]
    rest = [name for name in fv if name not in grouped]
    if rest:
        lines += flag_table(fv, rest) + [""]
    for group in command.groups:
        lines += [f"### {group.title}", ""] + ([" ".join(group.note.split()), ""] if group.note else [])
        lines += flag_table(fv, group.names) + [""]
    return lines


def page(pyproject: str = os.path.join(REPO, "pyproject.toml")) -> str:
    """The whole page, as `docs/flags.md` holds it."""
    found = tools(pyproject)
    lines = ["# Flags", "",
             "Every flag of every tool, with its type, default and help text. This page is generated from the "
             f"tools' own flag definitions by `{REGENERATE}`: edit a flag's definition, not this page, then run "
             f"that command (`tests/test_flag_reference.py` fails while the page is stale). How the tools are "
             "called, and their exit statuses: [commands.md](commands.md).", "",
             "Booleans are `--name` / `--noname`; a list is one comma-separated value; \"none\" is no default.", "",
             "## Contents", ""]
    lines += [f"- [{script}](#{anchor(_heading(script, module))})" for script, module in found] + [""]
    for script, module in found:
        lines += tool_section(script, module)
    return "\n".join(lines).rstrip("\n") + "\n"


def define_flags() -> flags.FlagValues:
    """The generator's own flags."""
    fv = flags.FlagValues()
    flags.DEFINE_bool("check", False, "Write nothing; exit status 1 when the page is not what the code gives.",
                      flag_values=fv)
    flags.DEFINE_string("page", None, f"The page to write or check (default: this repository's {PAGE}).",
                        flag_values=fv)
    return fv


COMMAND = Command("reference", "python -m toolcli.reference [--check] [--page=PATH]", __doc__, usage_status=2)


def main(argv: list[str] | None = None) -> None:
    """Writes the page, or with `--check` compares it: exit status 1 and one line naming it when they differ."""
    args, _ = COMMAND.parse(define_flags(), argv)
    path, shown = (args.page, args.page) if args.page else (os.path.join(REPO, PAGE), PAGE)
    with quiet.quiet_start(False):  # Importing the tools starts Beam and TensorFlow.
        text = page()
    if args.check:
        try:
            with open(path, encoding="utf-8") as f:
                current = f.read()
        except OSError as e:
            COMMAND.fail(f"cannot read {shown}: {e.strerror}", 1)
        if current != text:
            COMMAND.fail(f"{shown} is stale: it differs from what the tools' flags give; run {REGENERATE}", 1)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {shown}")


if __name__ == "__main__":
    main()
