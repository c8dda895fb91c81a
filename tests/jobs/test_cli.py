"""Every subcommand answers --help without doing work, and bad options are rejected."""
import pytest

from capfilt.jobs import cli


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: capfilt {command}")
    # A help text worth the name describes at least one option beyond -h.
    assert out.count("--") >= 2, out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command in out


def test_models_init_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["models", "init", "--help"])
    assert exc.value.code == 0
    assert "--kind" in capsys.readouterr().out


def test_unknown_option_is_an_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["synth", "--out", str(tmp_path), "--no-such-option"])
    assert exc.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


def test_missing_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_entry_point_prints_input_errors_as_one_line(capsys, tmp_path, monkeypatch):
    """An error about the input reaches the user as one line naming the value, exit code 2."""
    monkeypatch.setattr("sys.argv", ["capfilt", "synth", "--out", str(tmp_path / "w"), "--n", "-3"])
    with pytest.raises(SystemExit) as exc:
        cli.main_entry()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("capfilt synth: error: ")
    assert "-3" in err and "Traceback" not in err
    # main() itself still raises, for callers that want the exception.
    with pytest.raises(ValueError, match="-3"):
        cli.main(["synth", "--out", str(tmp_path / "w2"), "--n", "-3"])


def test_entry_point_missing_path_is_exit_2_and_other_os_errors_exit_1(capsys, monkeypatch):
    def fail_with(exc):
        def run(args):
            raise exc
        return run

    monkeypatch.setattr("capfilt.jobs.commands.report.run", fail_with(FileNotFoundError("no such directory: X")))
    with pytest.raises(SystemExit) as exc:
        cli.main_entry(["report", "X"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "capfilt report: error: no such directory: X"
    monkeypatch.setattr("capfilt.jobs.commands.report.run", fail_with(OSError(28, "No space left on device")))
    with pytest.raises(SystemExit) as exc:
        cli.main_entry(["report", "X"])
    assert exc.value.code == 1
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.setattr("capfilt.jobs.commands.report.run", fail_with(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as exc:
        cli.main_entry(["report", "X"])
    assert exc.value.code == 130
    assert "interrupted" in capsys.readouterr().err


def test_help_shows_each_default_once(capsys):
    """argparse's "(default: X)" was appended after help texts that already give the default
    ("(default: DIR/report.html) (default: None)") and to every flag ("(default: False)")."""
    import re

    for argv in (["report", "--help"], ["curate", "--help"], ["bootstrap", "--help"], ["models", "init", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = capsys.readouterr().out
        assert "(default: None)" not in out and "(default: False)" not in out, argv
        for block in re.split(r"\n(?=  -)", out):  # one block per option
            assert block.count("(default") <= 1, (argv, block)
    with pytest.raises(SystemExit):
        cli.main(["curate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--itm-threshold T a caption passes the filter when its ITM p(match) >= T (default: 0.5)" in out


def test_an_unknown_log_level_is_an_error(capsys):
    """--log-level VERBOSE used to mean INFO without a word."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["--log-level", "VERBOSE", "synth", "--help"])
    assert exc.value.code == 2 and "invalid choice: 'VERBOSE'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["--log-level", "debug", "synth", "--help"])  # any case
    assert exc.value.code == 0


@pytest.mark.parametrize("argv, message", [
    (["synth", "--ou", "OUT"], "the following arguments are required: --out"),
    (["synth", "--out", "OUT", "--nois", "0.4"], "unrecognized arguments: --nois 0.4"),
    (["models", "init", "--kin", "itm", "--out", "OUT"], "the following arguments are required: --kind"),
    (["curate", "--inpu", "raw/*.parquet", "--out", "OUT"], "the following arguments are required: --input"),
    (["--log-lev", "DEBUG", "synth", "--out", "OUT"], "invalid choice: 'DEBUG'"),
])
def test_abbreviated_options_are_refused_and_nothing_is_written(argv, message, capsys, tmp_path):
    """argparse would take `--ou` for `--out`: a typo must not quietly set another option."""
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
