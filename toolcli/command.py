"""A tool's command line: its own absl flags, `--help` that lists only them, and one-line errors.

Each tool defines its flags on a `flags.FlagValues()` of its own (absl's
global `flags.FLAGS` is shared by every module of a process, so two tools
defining `--data_dir` on it could not be imported together) and parses its
arguments with `Command.parse`:

    def define_flags() -> flags.FlagValues:
        fv = flags.FlagValues()
        flags.DEFINE_string("model_dir", None, "Model folder written by alexnet_tf.train.", flag_values=fv)
        return fv

    COMMAND = Command("export", "python -m alexnet_tf.export --model_dir=DIR [flags]", __doc__)

    def main(argv=None):
        args, _ = COMMAND.parse(define_flags(), argv)  # args.model_dir

This package imports nothing of the project: the build (`pipelines`) and the
trainer's package (`alexnet_tf`) both use it without importing each other.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import types
from typing import NoReturn

from absl import flags

# Every way absl and argparse ask for help; each prints this tool's flags only (it has no other).
HELP_FLAGS = ("-h", "-?", "-help", "--help", "--helpshort", "--helpfull", "--helpxml")


def asks_for_help(argv: list[str]) -> bool:
    """Whether an argument before a `--` asks for help."""
    for arg in argv:
        if arg == "--":
            return False
        if arg.split("=")[0] in HELP_FLAGS:
            return True
    return False


@dataclasses.dataclass(frozen=True)
class FlagGroup:
    """Flags the flag reference (`toolcli.reference`) lists in a table of their own.

    Attributes:
      title: the table's heading.
      names: the flags' names, in the order they are defined.
      note: text under the heading: where the flags come from, what else sets their defaults.
    """

    title: str
    names: tuple[str, ...]
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Command:
    """One tool's command line.

    Attributes:
      name: the tool's short name, which starts each of its error lines (`export: error: ...`).
      usage: the line after "usage: " in the help.
      about: the text under the usage line (the module's docstring, usually).
      usage_status: the exit status of a command line that cannot be parsed (the tools that used
        argparse have exited 2, the trainer and the data service 1).
      epilog: text after the flags in the help.
      groups: flags the reference page shows apart from the rest (the help lists every flag in one list).
    """

    name: str
    usage: str
    about: str
    usage_status: int = 2
    epilog: str = ""
    groups: tuple[FlagGroup, ...] = ()

    def help(self, fv: flags.FlagValues) -> str:
        """The help: usage, what the tool does, then each of its flags with its default."""
        # absl heads each module's flags with the module's name; the tool's flags are one list.
        lines = [line for line in fv.get_help(include_special_flags=False).splitlines()
                 if line.startswith(" ")]
        about = "\n".join(textwrap.fill(line, 80) if len(line) > 100 else line
                          for line in self.about.strip("\n").splitlines())
        parts = [f"usage: {self.usage}", about, "flags:\n" + "\n".join(lines)]
        if self.epilog:
            parts.append(textwrap.fill(self.epilog, 80))
        return "\n\n".join(parts) + "\n"

    def parse(self, fv: flags.FlagValues, argv: list[str] | None = None, known_only: bool = False,
              arguments: bool = False) -> tuple[types.SimpleNamespace, list[str]]:
        """Parses `argv` (default: `sys.argv[1:]`) into `fv`: (each flag's value by name, the other arguments).

        Help exits 0 with `help`'s text on stdout. A flag `fv` lacks (unless
        `known_only`: then it is returned), a bad value, a missing required
        flag or, unless `arguments` or `known_only`, an argument that is not a
        flag exits with `usage_status` and one line on stderr naming it.
        """
        argv = sys.argv[1:] if argv is None else list(argv)
        if asks_for_help(argv):
            sys.stdout.write(self.help(fv))
            sys.stdout.flush()
            sys.exit(0)
        if fv.is_parsed():  # A second parse of the same flags starts from their defaults again.
            fv.unparse_flags()
        try:
            rest = fv([self.name, *argv], known_only=known_only)
        except flags.Error as e:
            self.fail(f"{e} (see --help)", self.usage_status)
        if len(rest) > 1 and not (arguments or known_only):
            self.fail(f"unexpected arguments: {' '.join(rest[1:])} (every setting is a --flag; see --help)",
                      self.usage_status)
        return types.SimpleNamespace(**fv.flag_values_dict()), rest[1:]

    def fail(self, message: str, status: int = 1) -> NoReturn:
        """One line on stderr, `<name>: error: <message>`, and exit with `status`."""
        sys.stdout.flush()
        print(f"{self.name}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(status)
