"""The `capfilt` CLI run in this process, as the end-to-end tests drive it."""
import contextlib
import io

from capfilt.jobs.cli import main


def run_cli(argv):
    """main(argv) with stdout/stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def error_line(stderr, command="curate"):
    """The one ``capfilt COMMAND: ...`` line (log lines may surround it)."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"capfilt {command}:")]
    assert len(lines) == 1, stderr
    return lines[0]
