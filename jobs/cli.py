"""`capfilt` — the command line.

Each subcommand is a module in `jobs/` (named in ``COMMANDS`` with its one-line help) exposing:

* ``DESCRIPTION``: its help text;
* ``add_arguments(parser)``: declares its options, from its config dataclasses
  (:mod:`capfilt.jobs.options`);
* ``run(args) -> int``: does the work; an error is raised, never printed and returned.

``main(argv)`` is what the console script calls, and what the end-to-end tests call directly.
This module is the one place that turns an exception into an exit code and an error line
(:func:`exit_code`, :func:`error_line`): 2 for a bad option or input, 1 for a failure, 130 when
interrupted, and the few documented codes of ``release`` (4) and ``run-job`` (3, 4, 5).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from capfilt.transforms.files.locks import Busy

# Subcommand name -> (module, one line for `capfilt --help`). Order is the order shown there;
# only the module of the command that runs is imported.
COMMANDS = {
    "synth": ("capfilt.jobs.commands.synth",
              "Generate the synthetic noisy-web world (img2dataset-format shards + truth)"),
    "models": ("capfilt.jobs.commands.models",
               "Build tiny random-initialised model directories and the WordPiece tokenizer"),
    "ingest": ("capfilt.jobs.commands.ingest",
               "Download a URL list into raw shards with img2dataset"),
    "curate": ("capfilt.jobs.commands.curate",
               "Run the CapFilt Beam pipeline over raw shards (caption, filter, CLIP-rank, select)"),
    "pretrain": ("capfilt.jobs.commands.pretrain",
                 "Pretrain BLIP, BLIP-2 stage 1 or CLIP on shards"),
    "finetune": ("capfilt.jobs.commands.finetune",
                 "Finetune a captioner or filter on a clean split"),
    "evaluate": ("capfilt.jobs.commands.evaluate",
                 "Evaluate a model (retrieval, captioning, filtering) or a curate run against the truth"),
    "bootstrap": ("capfilt.jobs.commands.bootstrap",
                  "Run CapFilt bootstrap rounds (and BLIP's ablations) from a YAML config"),
    "demo": ("capfilt.jobs.commands.demo",
             "Run the CapFilt bootstrap demo (synthetic world, round 0 + round 1 ablations) and print the report"),
    "release": ("capfilt.jobs.commands.release",
                "Build a dataset release: dedup, decontaminate, manifest, report"),
    "run-job": ("capfilt.jobs.scheduled.run_job",
                "Run a scheduled ingest-curate-release job from YAML (incremental)"),
    "report": ("capfilt.jobs.commands.report",
               "Write an HTML report for a curate or release directory"),
    "convert": ("capfilt.jobs.commands.convert",
                "Convert an original BLIP checkpoint to the transformers layout"),
}
# Commands whose main() returns the exit code of an error (printing its line), for the callers
# that read codes in-process (schedulers, scripts), with the errors it does so for; `convert`
# only for a refused input (a failure while writing keeps its traceback). The other commands
# raise every error to main()'s caller; main_entry maps them all, the same way.
RETURNS_CODE = {"ingest": Exception, "curate": Exception, "release": Exception, "run-job": Exception,
                "report": Exception, "convert": ValueError}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Errors that mean "this input or option is wrong": the user fixes the command and re-runs.
USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)
EXIT_USAGE, EXIT_FAILURE, EXIT_BUSY, EXIT_INTERRUPTED = 2, 1, 5, 130
_USAGE_NAMES = frozenset(e.__name__ for e in USAGE_ERRORS)
# A full disk or quota is no fault of the command: the same command may succeed later, so it is
# a failure (exit 1, retried by run-job), also where a command reported it as an unwritable path.
EXHAUSTED_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class UsageError(SystemExit, ValueError):
    """A bad option combination found by a command's own checks (exit 2). It is a SystemExit
    too: a script that calls main() without catching it stops with the message, as after an
    argparse error."""

    def __init__(self, command: str, message: str):
        super().__init__(f"capfilt {command}: {message}")
        self.message = message


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each option's help, except where the help already says
    what the default is, or there is none to show (None: unset unless given; False: a flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s options are declared (None: every command's), so that a
    command does not import what the others need to declare theirs."""
    # No abbreviations anywhere: a typo (`--ou`, `--num-caption`) must not quietly set another option.
    parser = argparse.ArgumentParser(
        prog="capfilt",
        description="Curate web image-text data with BLIP's CapFilt bootstrapping.",
        allow_abbrev=False,
    )
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                        help=f"logging level, one of {', '.join(LOG_LEVELS)} in any case (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help) in COMMANDS.items():
        if command not in (None, name):
            sub.add_parser(name, help=help, allow_abbrev=False)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help, description=getattr(module, "DESCRIPTION", help), allow_abbrev=False,
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def exit_code(exc: BaseException) -> int:
    """The exit code of a command that raised `exc`. A failed Beam job (``worker_error``: the
    class name of the worker's exception) gets the code that exception would get here."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, Busy):  # another run holds --out's lock: try again later
        return EXIT_BUSY
    code = getattr(exc, "exit_code", None)  # run-job's JobError
    if isinstance(code, int):
        return code
    if type(exc).__name__ == "AccountingError":  # pipeline.release.manifest: counts do not reconcile
        from capfilt.jobs.commands.release import EXIT_ACCOUNTING

        return EXIT_ACCOUNTING
    worker_error = getattr(exc, "worker_error", None)  # a Beam job's failure: the worker's exception class
    if isinstance(worker_error, str):
        return EXIT_USAGE if worker_error in _USAGE_NAMES else EXIT_FAILURE
    if _exhausted(exc):
        return EXIT_FAILURE
    return EXIT_USAGE if isinstance(exc, USAGE_ERRORS) else EXIT_FAILURE


def _exhausted(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an error it was raised from is an OSError of EXHAUSTED_ERRNOS."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in EXHAUSTED_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def error_line(command: str | None, exc: BaseException) -> str:
    """``capfilt COMMAND: error: MESSAGE`` (exit 2) or ``... failed: MESSAGE``, on one line
    (hub and Beam messages span several). `report` states a refused input as
    ``capfilt report: MESSAGE``: its messages say what could not be done."""
    if isinstance(exc, KeyboardInterrupt):
        return "capfilt: interrupted (re-run the same command to resume where the command supports it)"
    message = " ".join(str(getattr(exc, "message", exc)).split())
    prefix = f"capfilt {command}" if command else "capfilt"
    if command == "report" and type(exc) is ValueError:
        return f"{prefix}: {message}"
    word = "busy" if isinstance(exc, Busy) else "error" if exit_code(exc) == EXIT_USAGE else "failed"
    return f"{prefix}: {word}: {message}"


def _report(command: str | None, exc: BaseException) -> int:
    if logging.getLogger().isEnabledFor(logging.DEBUG) and not isinstance(exc, KeyboardInterrupt):
        logging.getLogger("capfilt").error("traceback", exc_info=exc)
    print(error_line(command, exc), file=sys.stderr)
    return exit_code(exc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser(next((a for a in argv if a in COMMANDS), None))
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
    if args.command not in RETURNS_CODE:
        return int(args._run(args) or 0)
    try:
        return int(args._run(args) or 0)
    except RETURNS_CODE[args.command] as exc:
        return _report(args.command, exc)


def main_entry(argv: list[str] | None = None) -> None:
    """Console-script entry point: exit with main()'s code, or with the code of the error it
    raised (:func:`exit_code`), printed as one line. ``--log-level DEBUG`` shows the traceback
    as well. ``main()`` itself keeps raising, for callers and tests that want the exception."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    try:
        code = main(argv)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - mapped to an exit code
        code = _report(command, exc)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main_entry()
