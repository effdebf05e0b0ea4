"""toolcli.command: every tool's absl flags of its own, its --help, its one-line errors, and its console script."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
import tomllib

import pytest
from absl import flags

from toolcli.command import Command, asks_for_help

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# absl's own flags, which a tool's help must not list (app.run and absl.logging define them on flags.FLAGS).
ABSL_GLOBAL = ("--verbosity", "--logtostderr", "--alsologtostderr", "--log_dir", "--flagfile", "--undefok",
               "--only_check_args", "--pdb_post_mortem", "--run_with_profiling")


def _scripts() -> dict[str, str]:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def _tool_modules() -> list[str]:
    """Every module of the product that runs as `python -m` (it has a `__main__` block)."""
    found = []
    for package in ("pipelines", "alexnet_tf"):
        for name in sorted(os.listdir(os.path.join(REPO, package))):
            if name.endswith(".py") and 'if __name__ == "__main__":' in open(os.path.join(REPO, package, name)).read():
                found.append(f"{package}.{name[:-3]}")
    return found


TOOLS = _tool_modules()


def test_every_tool_has_one_console_script_named_after_it_that_runs_what_python_m_runs():
    assert len(TOOLS) == 8, TOOLS
    scripts = _scripts()
    by_module = {}
    for script, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
        by_module.setdefault(module, []).append((script, function))
    assert sorted(by_module) == sorted(TOOLS)
    for module in TOOLS:
        [(script, function)] = by_module[module]
        assert script == "alexnet-" + module.split(".")[1].replace("_", "-")
        with open(os.path.join(REPO, *module.split(".")) + ".py") as f:
            tree = ast.parse(f.read())
        block = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
        called = {ast.unparse(n.func).split(".")[-1] for n in ast.walk(block) if isinstance(n, ast.Call)}
        assert function in called, (module, ast.unparse(block))


def _own_flags(module: str) -> set[str]:
    return set(importlib.import_module(module).define_flags())


def test_the_tools_import_together_and_define_nothing_on_absls_global_flags():
    own = {m: _own_flags(m) for m in TOOLS}  # One process: no DuplicateFlagError.
    assert "data_dir" in own["alexnet_tf.train"] and "data_dir" in own["alexnet_tf.evaluate"]
    every = set().union(*own.values())
    assert not every & set(flags.FLAGS), sorted(every & set(flags.FLAGS))


@pytest.mark.parametrize("module", TOOLS)
def test_help_of_the_console_script_exits_0_and_lists_the_tools_own_flags_only(module):
    function = _scripts()[next(s for s, t in _scripts().items() if t.startswith(module + ":"))].split(":")[1]
    code = f"import sys; from {module} import {function}; sys.argv[0] = 'x'; {function}()"
    r = subprocess.run([sys.executable, "-c", code, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"usage: python -m {module}")
    listed = set(re.findall(r"^  --(?:\[no\])?(\w+):", r.stdout, re.M))
    assert listed == _own_flags(module)
    assert not [f for f in ABSL_GLOBAL if f + ":" in r.stdout or f"--[no]{f[2:]}:" in r.stdout]


@pytest.mark.parametrize("module", TOOLS)
def test_an_unknown_flag_or_a_bad_number_is_one_line_naming_it_and_a_non_zero_exit(module, capsys):
    tool = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        tool.main(["--no_such_flag=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code not in (0, None) and len(err) == 1 and "no_such_flag" in err[0], err
    fv = tool.define_flags()
    numbers = [name for name in fv if fv[name].flag_type() == "int"]
    if not numbers:
        return
    with pytest.raises(SystemExit) as e:
        tool.main([f"--{numbers[0]}=many"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code not in (0, None) and len(err) == 1 and f"--{numbers[0]}=many" in err[0], err


def _fv():
    fv = flags.FlagValues()
    flags.DEFINE_integer("count", 3, "How many.", flag_values=fv)
    flags.DEFINE_string("out", None, "Where.", flag_values=fv)
    return fv


def test_a_parse_starts_from_the_defaults_and_returns_the_other_arguments():
    command, fv = Command("tool", "tool [flags]", "Does a thing."), _fv()
    args, rest = command.parse(fv, ["--count=5", "a.jpg"], arguments=True)
    assert (args.count, args.out, rest) == (5, None, ["a.jpg"])
    args, rest = command.parse(fv, ["--out=x"])  # The same flags again: --count is back to its default.
    assert (args.count, args.out, rest) == (3, "x", [])
    args, rest = command.parse(fv, ["--runner", "DaskRunner", "--count=1"], known_only=True)
    assert (args.count, rest) == (1, ["--runner", "DaskRunner"])


def test_help_is_asked_only_before_a_double_dash_and_lists_the_flags_given(capsys):
    assert asks_for_help(["--helpfull"]) and asks_for_help(["-h"]) and not asks_for_help(["--", "-h"])
    with pytest.raises(SystemExit) as e:
        Command("tool", "tool [flags]", "Does a thing.", epilog="After the flags.").parse(_fv(), ["--helpshort"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert re.findall(r"^  --(\w+):", out, re.M) == ["count", "out"] and out.rstrip().endswith("After the flags.")


def test_an_argument_where_none_is_taken_exits_with_the_tools_usage_status(capsys):
    with pytest.raises(SystemExit) as e:
        Command("tool", "tool [flags]", "Does a thing.", usage_status=1).parse(_fv(), ["stray"])
    assert e.value.code == 1
    assert capsys.readouterr().err == "tool: error: unexpected arguments: stray (every setting is a --flag; see --help)\n"
