"""Ctrl-C inside a command: exit code 130 and one line on stderr, no traceback."""

from __future__ import annotations

from oztune import cli


def test_keyboard_interrupt_in_a_command_exits_130_with_one_interrupted_line(monkeypatch, capsys):
    from oztune import commands  # noqa: F401  (registers the commands)

    cls, _, help = cli.COMMANDS["predict"]
    seen = []

    def interrupted(args):
        seen.append(args.texts)
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "predict", (cls, interrupted, help))
    assert cli.main(["predict", "--model", "no-such-model", "good movie"]) == 130
    assert seen == [["good movie"]]  # the command did run, and was interrupted inside
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("oztune predict: interrupted") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
