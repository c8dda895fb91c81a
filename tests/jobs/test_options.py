"""Options declared once on config dataclasses (jobs/options.py), and the one mapping of
errors to exit codes (jobs/cli.py)."""
import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from capfilt.jobs import cli, options


@dataclass
class Example:
    inputs: tuple[str, ...] = field(metadata={"help": "input globs", "flag": "--input", "action": "append",
                                              "metavar": "GLOB", "group": "io"})
    out: Path = field(metadata={"help": "output directory", "group": "io"})
    count: int = field(default=3, metadata={"help": "how many", "metavar": "N"})
    ratio: float | None = field(default=None, metadata={"help": "a ratio"})
    mode: str = field(default="fast", metadata={"help": "speed", "choices": ("fast", "slow")})
    verbose: bool = field(default=False, metadata={"help": "say more"})
    report: bool = field(default=True, metadata={"help": "no report", "flag": "--no-report"})
    mix: list[str] = field(default_factory=list, metadata={"help": "more sources", "nargs": "+"})
    internal: int = 7  # no help: not an option


def parser_for(cls, **kwargs):
    parser = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    options.add_arguments(parser, cls, **kwargs)
    return parser


def action(parser, flag):
    return next(a for a in parser._actions if flag in a.option_strings)


def test_flags_defaults_types_and_help_come_from_the_fields():
    parser = parser_for(Example)
    flags = {s for a in parser._actions for s in a.option_strings}
    assert flags == {"-h", "--help", "--input", "--out", "--count", "--ratio", "--mode", "--verbose",
                     "--no-report", "--mix"}  # `internal` has no help text: not an option
    count = action(parser, "--count")
    assert (count.default, count.type, count.help, count.metavar) == (3, int, "how many", "N")
    assert action(parser, "--ratio").type is float and action(parser, "--ratio").default is None
    assert action(parser, "--mode").choices == ("fast", "slow")
    assert action(parser, "--input").required and action(parser, "--out").required
    assert isinstance(action(parser, "--verbose"), argparse._StoreTrueAction)
    assert isinstance(action(parser, "--no-report"), argparse._StoreTrueAction)
    assert [g.title for g in parser._action_groups if g.title == "io"] == ["io"]
    text = " ".join(parser.format_help().split())
    assert "--count N how many (default: 3)" in text and "(default: False)" not in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--input", "a", "--out", "o", "--mode", "medium"])


def test_args_to_config_and_back():
    parser = parser_for(Example)
    args = parser.parse_args(["--input", "a", "--input", "b", "--out", "o", "--count", "5", "--no-report",
                              "--mix", "x:1", "y:2"])
    cfg = options.from_args(Example, args)
    assert cfg == Example(inputs=("a", "b"), out=Path("o"), count=5, report=False, mix=["x:1", "y:2"])
    again = options.as_args(cfg)
    assert (again.input, again.no_report, again.count) == (["a", "b"], True, 5)
    assert options.from_args(Example, again) == cfg
    # the command line the config stands for parses back into the same config
    assert options.argv(cfg) == ["--input", "a", "--input", "b", "--out", "o", "--count", "5", "--mode", "fast",
                                 "--no-report", "--mix", "x:1", "y:2"]
    assert options.from_args(Example, parser.parse_args(options.argv(cfg))) == cfg


def test_field_defaults_can_be_replaced_per_command():
    assert action(parser_for(Example, defaults={"count": 9}), "--count").default == 9
    assert "--count" not in {s for a in parser_for(Example, skip={"count"})._actions for s in a.option_strings}


def test_a_mapping_is_checked_as_the_parser_checks_it():
    values, unknown = options.check_mapping({"count": "4", "no_report": True, "mode": "slow", "colour": 1}, Example)
    assert values == {"count": 4, "report": False, "mode": "slow"} and unknown == {"colour": 1}
    assert options.flags(unknown) == ["--colour"]
    with pytest.raises(ValueError, match="argument --mode: invalid choice: 'medium'"):
        options.check_mapping({"mode": "medium"}, Example)
    with pytest.raises(ValueError, match="argument --count: invalid int value: 'ten'"):
        options.check_mapping({"count": "ten"}, Example)
    with pytest.raises(ValueError, match="argument --verbose: expected true or false"):
        options.check_mapping({"verbose": "yes"}, Example)
    with pytest.raises(KeyError):
        options.check_mapping({"out": "x"}, Example, reserved={"out"})


def test_the_real_commands_keep_their_option_names_and_defaults():
    from capfilt.model.inference.captioner import CaptionConfig

    curate = argparse.ArgumentParser()
    cli.build_parser("curate")  # imports fine on its own
    from capfilt.jobs.commands import curate as curate_cmd

    curate_cmd.add_arguments(curate)
    defaults = {flag: action(curate, flag).default for flag in
                ("--prompt", "--top-p", "--max-length", "--min-length", "--repetition-penalty", "--num-captions")}
    assert defaults == {"--prompt": CaptionConfig.prompt, "--top-p": 0.9, "--max-length": 30, "--min-length": 10,
                        "--repetition-penalty": 1.1, "--num-captions": 10}
    assert CaptionConfig.prompt == "a picture of "
    args = curate.parse_args(["--input", "g", "--out", "o", "--clip", "c", "--no-synthetic", "--no-filter", "--bf16"])
    assert curate_cmd.config_from_args(args).precision == "bf16"
    from capfilt.jobs.commands import finetune

    ft = argparse.ArgumentParser()
    finetune.add_arguments(ft)
    assert (action(ft, "--lr").default, action(ft, "--steps").default) == (1e-5, 500)
    assert action(ft, "--prompt").default is None


class Accounting(Exception):
    pass


Accounting.__name__ = "AccountingError"


def _raised_from(exc, cause):
    exc.__cause__ = cause
    return exc


FULL = OSError(28, "No space left on device")


@pytest.mark.parametrize("exc, code, line", [
    (_raised_from(ValueError("cannot write the report to r.html (No space left on device)"), FULL), 1,
     "capfilt curate: failed: cannot write the report to r.html (No space left on device)"),
    (OSError(122, "Disk quota exceeded", "out/x"), 1, "capfilt curate: failed: [Errno 122] Disk quota exceeded: 'out/x'"),
    (_raised_from(ValueError("cannot write x (Permission denied)"), PermissionError(13, "Permission denied")), 2,
     "capfilt curate: error: cannot write x (Permission denied)"),
])
def test_a_full_disk_is_a_failure_to_retry_even_when_reported_as_a_path_error(exc, code, line):
    assert cli.exit_code(exc) == code
    assert cli.error_line("curate", exc) == line


@pytest.mark.parametrize("exc, code, line", [
    (ValueError("bad --x 3"), 2, "capfilt curate: error: bad --x 3"),
    (FileNotFoundError("no such file: f"), 2, "capfilt curate: error: no such file: f"),
    (OSError(28, "No space left on device"), 1, "capfilt curate: failed: [Errno 28] No space left on device"),
    (RuntimeError("worker\n  crashed"), 1, "capfilt curate: failed: worker crashed"),
    (KeyboardInterrupt(), 130, "capfilt: interrupted (re-run the same command to resume where the command "
                                "supports it)"),
    (cli.UsageError("curate", "--a needs --b"), 2, "capfilt curate: error: --a needs --b"),
    (Accounting("counts differ"), 4, "capfilt curate: failed: counts differ"),
])
def test_one_mapping_of_errors_to_exit_codes(exc, code, line):
    assert cli.exit_code(exc) == code
    assert cli.error_line("curate", exc) == line


def test_run_job_errors_carry_their_documented_codes():
    from capfilt.jobs.scheduled.job_file import EXIT_BUSY, JobError

    err = JobError(EXIT_BUSY, "another run-job holds L")
    assert cli.exit_code(err) == 5
    assert cli.error_line("run-job", err) == ("capfilt run-job: failed: another run-job holds L "
                                              "(exit 5: another run of this job holds its lock)")


def test_usage_error_is_a_value_error_and_a_system_exit():
    err = cli.UsageError("evaluate", "--task curated needs --truth FILE")
    assert isinstance(err, ValueError) and isinstance(err, SystemExit)
    assert str(err) == "capfilt evaluate: --task curated needs --truth FILE"


def test_commands_that_return_codes_print_one_line(capsys, tmp_path):
    """main() maps the errors of the commands schedulers call in-process, main_entry those of
    every command: the same codes and lines."""
    assert cli.main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"capfilt report: {tmp_path}: neither a release")
    with pytest.raises(SystemExit) as exc:
        cli.main_entry(["evaluate", "--task", "curated", "--data", "x"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "capfilt evaluate: error: --task curated needs --truth FILE"
