"""The ``treesched`` command line: one group, one module per command.

Every command raises :class:`treesched.TreeschedError` for bad input; the
group turns it into a one-line ``Error: …`` on stderr and exit status 1
(click's own usage errors exit 2), never a traceback.
"""

from __future__ import annotations

import importlib

import click

from treesched import __version__
from treesched.errors import TreeschedError

# command name -> module in treesched.cli defining a click command ``command``
COMMANDS = {
    "compile": "compile_cmd",
    "info": "info_cmd",
    "parity": "parity_cmd",
    "tasks": "tasks_cmd",
    "train": "train_cmd",
    "eval": "eval_cmd",
    "generate": "generate_cmd",
    "import-checkpoint": "import_cmd",
}


class TreeschedGroup(click.Group):
    """Loads commands lazily and turns TreeschedError into a clean exit."""

    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._module(name) is not None]

    def get_command(self, ctx, name):
        module = self._module(name)
        return None if module is None else module.command

    @staticmethod
    def _module(name):
        if name not in COMMANDS:
            return None
        try:
            return importlib.import_module(f"treesched.cli.{COMMANDS[name]}")
        except ModuleNotFoundError as error:
            if error.name == f"treesched.cli.{COMMANDS[name]}":
                return None  # command not shipped in this build
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TreeschedError as error:
            raise click.ClickException(str(error)) from None
        except MemoryError:
            raise click.ClickException("out of memory: try a smaller batch, length or hidden size") from None


@click.group(cls=TreeschedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="treesched")
def cli():
    """treesched: merge schedules and tree-structured recurrent models (PR-LSTM).

    Compile a sequence length into a level-wise merge schedule, run and train
    the Parallel Recursive LSTM on NumPy, Numba or CuPy.
    """


def main(argv=None):
    cli.main(args=argv, prog_name="treesched")


if __name__ == "__main__":
    main()
