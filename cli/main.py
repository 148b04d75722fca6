"""The ``treesched`` command line: one group, one module per command.

Every command raises :class:`treesched.TreeschedError` for bad input; the
group turns it into a one-line ``Error: …`` on stderr and exit status 1
(click's own usage errors exit 2), never a traceback.  A training run
stopped by SIGINT / SIGTERM prints how to continue it and exits 130 / 143.
"""

from __future__ import annotations

import importlib

import click

from treesched import __version__
from treesched.errors import TreeschedError
from treesched.interrupts import TrainingInterrupted

# command name -> module in treesched.cli defining a click command ``command``
COMMANDS = {
    "compile": "compile_cmd",
    "info": "info_cmd",
    "parity": "parity_cmd",
    "tasks": "tasks_cmd",
    "train": "train_cmd",
    "eval": "eval_cmd",
    "sweep": "sweep_cmd",
    "table": "table_cmd",
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
        from treesched.distributed import world
        try:
            # under an MPI launcher every rank runs the command: an error on
            # one rank ends them all, an error they all meet is printed once
            with world().stop_job_on_error(passthrough=(click.exceptions.ClickException,
                                                        click.exceptions.Exit,
                                                        click.exceptions.Abort)):
                return super().invoke(ctx)
        except TreeschedError as error:
            raise click.ClickException(str(error)) from None
        except MemoryError:
            raise click.ClickException("out of memory: try a smaller batch, length or hidden size") from None
        except TrainingInterrupted as stop:
            # not an error: the run stopped where asked and says how to go on
            click.echo(stop.message(), err=True)
            ctx.exit(stop.exit_status)
        except KeyboardInterrupt:
            # anything else interrupted (eval, parity, ...): one line, not click's "Aborted!"
            click.echo("Error: interrupted; nothing was left half-written", err=True)
            ctx.exit(130)


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
