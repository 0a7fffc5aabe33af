"""Ctrl-C inside a command: exit code 130 and one line on stderr, no traceback."""

from __future__ import annotations

import signal

import pytest

from oztune import cli
from oztune.errors import OztuneError


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


def _raising_after_a_signal(monkeypatch, signum: int, converted: BaseException):
    """Replace predict by a command that gets ``signum`` and then, as a C extension (safetensors loading a model)
    may do with the exception the handler raised inside it, raises ``converted`` in its place."""
    import os
    import time

    from oztune import commands  # noqa: F401  (registers the commands)

    cls, _, help = cli.COMMANDS["predict"]

    def stopped(args):
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises here
        except BaseException:
            raise converted from None
        raise AssertionError("the signal handler did not raise")

    monkeypatch.setitem(cli.COMMANDS, "predict", (cls, stopped, help))


@pytest.mark.parametrize("converted", [OztuneError("m/model.safetensors: not a weights file (corrupt?)"),
                                       TypeError("could not determine the shape of object type 'UntypedStorage'")],
                         ids=["as_an_oztune_error", "as_another_error"])
def test_sigterm_turned_into_another_error_by_an_extension_still_exits_143(converted, monkeypatch, capsys):
    """A SIGTERM's exception raised inside C code came out as another error: exit 2 with a false message
    ('corrupt'), or a traceback. serve treated any error after a SIGTERM as the stop; every command now does."""
    _raising_after_a_signal(monkeypatch, signal.SIGTERM, converted)
    assert cli.main(["predict", "--model", "m", "good movie"]) == 143
    err = capsys.readouterr().err
    assert err.startswith("oztune predict: stopped by SIGTERM") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("converted", [OztuneError("m/model.safetensors: not a weights file (corrupt?)"),
                                       TypeError("could not determine the shape of object type 'UntypedStorage'")],
                         ids=["as_an_oztune_error", "as_another_error"])
def test_ctrl_c_turned_into_another_error_by_an_extension_still_exits_130(converted, monkeypatch, capsys):
    _raising_after_a_signal(monkeypatch, signal.SIGINT, converted)
    assert cli.main(["predict", "--model", "m", "good movie"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("oztune predict: interrupted") and len(err.strip().splitlines()) == 1, err


def test_an_error_without_a_signal_stays_what_it_is(monkeypatch, capsys):
    from oztune import commands  # noqa: F401  (registers the commands)

    cls, _, help = cli.COMMANDS["predict"]

    def failing(args):
        raise OztuneError("a real error")

    monkeypatch.setitem(cli.COMMANDS, "predict", (cls, failing, help))
    assert cli.main(["predict", "--model", "m", "good movie"]) == 2
    assert capsys.readouterr().err.strip() == "oztune predict: error: a real error"
