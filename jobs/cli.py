"""`capfilt` — the command line.

Each subcommand is a module in `jobs/` exposing:

* ``HELP``: one line for the command list;
* ``add_arguments(parser)``: declares its options (heavy imports stay out of this);
* ``run(args) -> int``: does the work and returns the process exit code.

``main(argv)`` is what the console script calls, and what the end-to-end tests call directly.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import sys

# Subcommand name -> module. Order is the order shown by `capfilt --help`.
COMMANDS = {
    "synth": "capfilt.jobs.commands.synth",
    "models": "capfilt.jobs.commands.models",
    "ingest": "capfilt.jobs.commands.ingest",
    "curate": "capfilt.jobs.commands.curate",
    "pretrain": "capfilt.jobs.commands.pretrain",
    "finetune": "capfilt.jobs.commands.finetune",
    "evaluate": "capfilt.jobs.commands.evaluate",
    "bootstrap": "capfilt.jobs.bootstrap.rounds",
    "demo": "capfilt.jobs.commands.demo",
    "release": "capfilt.jobs.commands.release",
    "run-job": "capfilt.jobs.scheduled.run_job",
    "report": "capfilt.jobs.commands.report",
    "convert": "capfilt.jobs.commands.convert",
}


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each option's help, except where the help already says
    what the default is, or there is none to show (None: unset unless given; False: a flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capfilt",
        description="Curate web image-text data with BLIP's CapFilt bootstrapping.",
    )
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                        help=f"logging level, one of {', '.join(LOG_LEVELS)} in any case (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=HelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def parse_options(command: str, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse `argv` with ``capfilt <command>``'s own parser without running the command:
    (its arguments, the options it does not declare). A bad value or a missing argument is a
    ValueError with argparse's message, instead of a printed error and an exit. Job files and
    bootstrap configs check their steps' options with this before the first step runs."""
    module = importlib.import_module(COMMANDS[command])
    parser = argparse.ArgumentParser(prog=f"capfilt {command}", add_help=False, exit_on_error=False)
    module.add_arguments(parser)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):  # argparse prints some errors before it exits
            return parser.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit) as err:
        printed = stderr.getvalue().strip().splitlines()
        raise ValueError(printed[-1] if printed else str(err)) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Only commands that pass options through to another tool (Beam, img2dataset) accept
    # unknown options; everywhere else they are an error, as with parse_args.
    if extra and not getattr(args, "_accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args._run(args) or 0)


# Errors that mean "this input or option is wrong": the user fixes the command and re-runs.
USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def main_entry(argv: list[str] | None = None) -> None:
    """Console-script entry point: exit with main()'s code.

    An error the command raises about its input (a ``ValueError`` naming the bad value, a
    missing or unwritable path) is printed as one line, ``capfilt <command>: error: ...``, with
    exit code 2 as for a bad option; other ``OSError``s (a full disk, a lost mount) the same way
    with exit code 1. ``--log-level DEBUG`` shows the traceback as well. ``main()`` itself keeps
    raising, for callers and tests that want the exception."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = main(argv)
    except (ValueError, OSError) as exc:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            logging.getLogger("capfilt").exception("traceback")
        command = next((a for a in argv if a in COMMANDS), None)
        prefix = f"capfilt {command}" if command else "capfilt"
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        code = 2 if isinstance(exc, USAGE_ERRORS) else 1
    except KeyboardInterrupt:
        print("capfilt: interrupted (re-run the same command to resume where the command supports it)",
              file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main_entry()
