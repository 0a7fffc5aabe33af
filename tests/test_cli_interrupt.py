"""Ctrl-C inside a command: exit code 130 and one line on stderr, no traceback."""

from __future__ import annotations

import signal

import pytest

from oztune import cli
from oztune.errors import OztuneError


@pytest.fixture(autouse=True)
def ctrl_c_not_ignored():
    """These tests send Ctrl-C. A shell that starts a job in the background (`pytest &`, nohup, some CI runners) hands
    it SIGINT ignored, which Python keeps and cli.main leaves alone (as it should: the user chose so): the tests then
    saw no Ctrl-C at all and failed. Here SIGINT is Python's default, as in a terminal; it is put back after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


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


# A child that starts oztune as `python -m oztune` or the `oztune` console script does (`from oztune.cli import
# main; sys.exit(main())`), with an import hook that says when torch's import begins and makes it wait there two
# seconds: the Ctrl-C comes while torch is being imported, every time (not only when a timer happens to hit it).
_SLOW_TORCH = """
import importlib.abc, sys, time

class SlowTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            print("importing torch", flush=True)
            time.sleep(2)
        return None

sys.meta_path.insert(0, SlowTorch())
sys.argv = ["oztune", "predict", "--model", "no-such-model", "good movie"]
"""
_ENTRY_POINTS = {"python -m oztune": "import runpy; runpy.run_module('oztune', run_name='__main__', alter_sys=True)",
                 "console script": "from oztune.cli import main; sys.exit(main())"}


@pytest.mark.parametrize("entry", list(_ENTRY_POINTS))
def test_ctrl_c_while_torch_is_imported_exits_130_with_no_traceback(entry):
    """Ctrl-C in a command's first two seconds (torch importing, before main() had put in its handler, and for the
    console script before main() was even called: `import oztune` imported torch) printed a Python traceback. Now
    it is noted and acted on once the imports are done (torch is imported after the options are read: the stop
    names the command)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", _SLOW_TORCH + _ENTRY_POINTS[entry]], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (see ctrl_c_not_ignored)
    try:
        assert p.stdout.readline() == "importing torch\n"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.startswith("oztune predict: interrupted") and len(err.strip().splitlines()) == 1, err
    assert out == ""


def test_ctrl_c_ignored_by_the_caller_stays_ignored(monkeypatch, capsys):
    """A command started with Ctrl-C ignored (a background job) must not start taking it: main() leaves SIGINT as
    it found it, and a Ctrl-C sent meanwhile does nothing."""
    import os
    import time

    from oztune import commands  # noqa: F401  (registers the commands)

    cls, _, help = cli.COMMANDS["predict"]

    def ctrl_c_sent(args):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # (a handler would have raised by now)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "predict", (cls, ctrl_c_sent, help))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (the autouse fixture puts the previous handler back)
    assert cli.main(["predict", "--model", "m", "good movie"]) == 0
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert capsys.readouterr().err == ""
