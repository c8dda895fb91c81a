"""Every subcommand answers --help without doing work, and bad options are rejected."""
import pytest

from jobs import cli


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
