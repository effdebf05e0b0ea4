"""toolcli.reference: docs/flags.md is what the tools' flags give, lists every flag, and `--check` finds it stale."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
import types

import pytest
from absl import flags

from conftest import cli
from toolcli import reference
from toolcli.command import Command, FlagGroup

ROW = re.compile(r"^\| `--(?:\[no\])?(\w+)` \| (.*?) \| (.*?) \| (.*) \|$", re.M)


@pytest.fixture(scope="module")
def committed() -> str:
    with open(os.path.join(reference.REPO, reference.PAGE), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def generated() -> str:
    return reference.page()


def _sections(page: str) -> dict[str, str]:
    """Each tool's part of the page, by its console script."""
    parts = re.split(r"^## ", page, flags=re.M)
    return {part.split(" ", 1)[0]: part for part in parts[1:] if " (python -m " in part.splitlines()[0]}


def test_the_committed_page_is_what_the_tools_flags_give(committed, generated):
    assert committed == generated, f"{reference.PAGE} is stale: run {reference.REGENERATE}"


def test_every_flag_of_every_tool_has_its_row_in_its_tools_section(committed):
    sections = _sections(committed)
    scripts = [script for script, _ in reference.tools()]
    assert list(sections) == scripts, "one section a tool, in pyproject.toml's order"
    for script, module in reference.tools():
        _, fv = reference.tool_flags(module)
        rows = {m.group(1): m for m in ROW.finditer(sections[script])}
        assert set(rows) == set(fv), (script, sorted(set(fv) ^ set(rows)))
        for name in fv:
            kind = rows[name].group(2)
            assert (kind == "bool") == fv[name].boolean, (script, name, kind)
            if fv[name].default is None:
                assert rows[name].group(3) == "none", (script, name)
        assert f"](#{reference.anchor(script + ' (python -m ' + module + ')')})" in committed, script


def test_the_trainers_hyperparameters_are_its_trainconfig_fields_in_a_table_of_their_own(committed):
    from alexnet_tf import config

    train = _sections(committed)["alexnet-train"]
    run_part, hyper_part = train.split("\n### ", 1)
    assert hyper_part.startswith("Hyperparameters (TrainConfig")
    fields = [f.name for f in dataclasses.fields(config.TrainConfig)]
    assert [m.group(1) for m in ROW.finditer(hyper_part)] == fields
    assert not set(m.group(1) for m in ROW.finditer(run_part)) & set(fields)
    # The note names what the sample preset changes, so a reader knows the defaults shown are the paper's.
    note = hyper_part.split("\n| flag |")[0]
    assert all(f"`--{name}`" in note for name in config.PRESETS["sample"]), note


def test_the_page_holds_no_fact_of_the_machine_that_wrote_it(generated):
    host = socket.gethostname()
    assert not re.search(rf"(?<![\w.-]){re.escape(host)}(?![\w-])", generated), host
    assert reference.REPO not in generated and "/home/" not in generated and "/tmp/" not in generated


def _fake_tool(monkeypatch) -> str:
    """A tool module with every kind of flag and a group, under a name of its own."""
    def define_flags():
        fv = flags.FlagValues()
        flags.DEFINE_string("out", None, "Where <dir>/x goes | or `a<b` stays.", flag_values=fv)
        flags.DEFINE_bool("fast", True, "Go fast.", flag_values=fv)
        flags.DEFINE_enum("mode", "b", ["a", "b"], "The mode.", flag_values=fv)
        flags.DEFINE_list("steps", ["1", "2"], "The steps.", flag_values=fv)
        flags.DEFINE_float("rate", 0.5, "The\n   rate.", flag_values=fv)
        flags.DEFINE_string("sep", "", "Empty by default.", flag_values=fv)
        return fv

    about = "Does a thing.\nStill the first paragraph.\n\nNot this one."
    command = Command("fake", "python -m fake_tool [flags]", about,
                      groups=(FlagGroup("Tuning", ("rate", "steps"), "From   a config."),))
    monkeypatch.setitem(sys.modules, "fake_tool", types.SimpleNamespace(define_flags=define_flags, COMMAND=command))
    return "fake_tool"


def test_a_section_shows_usage_first_paragraph_and_each_kind_of_flag_as_absl_does(monkeypatch):
    section = "\n".join(reference.tool_section("fake", _fake_tool(monkeypatch)))
    assert section.startswith("## fake (python -m fake_tool)\n")
    assert "usage: python -m fake_tool [flags]" in section
    assert "Does a thing. Still the first paragraph." in section and "Not this one" not in section
    main_table, group = section.split("### Tuning\n")
    assert "| `--out` | string | none | Where \\<dir>/x goes \\| or `a<b` stays. |" in main_table
    assert "| `--[no]fast` | bool | `true` | Go fast. |" in main_table
    assert "| `--mode` | one of `a`, `b` | `b` | The mode. |" in main_table  # absl's "<a|b>: " dropped.
    assert "| `--sep` | string | empty | Empty by default. |" in main_table
    assert "--rate" not in main_table and "--steps" not in main_table
    assert group.startswith("\nFrom a config.\n")
    assert [m.group(1) for m in ROW.finditer(group)] == ["rate", "steps"]
    assert "| `--steps` | comma-separated list | `1,2` | The steps. |" in group
    assert "| `--rate` | float | `0.5` | The rate. |" in group


def test_a_group_naming_a_flag_the_tool_lacks_is_refused(monkeypatch):
    module = _fake_tool(monkeypatch)
    tool = sys.modules[module]
    tool.COMMAND = dataclasses.replace(tool.COMMAND, groups=(FlagGroup("Tuning", ("rate", "nope")),))
    with pytest.raises(ValueError, match="fake_tool: COMMAND.groups names flags it does not define: nope"):
        reference.tool_section("fake", module)


def test_check_exits_1_naming_a_page_with_one_flag_missing_and_0_on_the_right_one(committed, tmp_path, capsys):
    right = tmp_path / "right.md"
    right.write_text(committed, encoding="utf-8")
    row = next(line for line in committed.splitlines() if line.startswith("| `--learning_rate` |"))
    stale = tmp_path / "stale.md"
    stale.write_text(committed.replace(row + "\n", ""), encoding="utf-8")
    r = cli("toolcli.reference", "--check", f"--page={stale}")
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and str(stale) in err[0] and reference.REGENERATE in err[0], err
    reference.main(["--check", f"--page={right}"])  # Returns: no SystemExit.
    written = tmp_path / "written.md"
    reference.main([f"--page={written}"])
    assert written.read_text(encoding="utf-8") == committed
    assert capsys.readouterr().out.strip() == f"wrote {written}"
