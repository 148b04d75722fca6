"""What the command-line tests share: running ``treesched`` in-process and
checking the one-line error the CLI promises for bad input."""

from click.testing import CliRunner

from treesched.cli.main import cli


def run(*args):
    """``treesched ARGS...`` through click's runner (arguments made strings);
    exceptions propagate, so a traceback fails the test."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *fragments):
    """Exit status 1, no traceback, exactly one stderr line ``Error: ...``
    holding every fragment."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
