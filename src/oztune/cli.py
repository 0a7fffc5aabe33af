"""The ``oztune`` command line, generated from the typed argument dataclasses of each command.

Each command is a dataclass (its fields are the options, its docstring's Args the help) and a
function taking it. ``--config FILE.yaml`` supplies defaults by field name, each read as its option's type
(a text option keeps the scalar as written); flags given on the command line win, also one given with its
default value. A bad config file (not YAML, an option given twice, an unknown option, a value not of its type) is an
error naming the file and, where it can, the line. Errors a user can fix print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import signal
import sys
import threading
import types
import typing
from typing import Any, Callable

from oztune.errors import OztuneError

COMMANDS: dict[str, tuple[type, Callable, str]] = {}
NEEDS: dict[str, tuple[str, ...]] = {}  # command -> the modules it runs on (torch's among them)


def command(name: str, args_cls: type, help: str, needs: tuple[str, ...] = ()):
    """Register ``fn(args_cls) -> int`` as the subcommand ``name``. The modules of ``fn`` and ``args_cls`` import no
    torch (the parser and ``--help`` come from them alone); ``needs`` names the modules the command runs on, which
    :func:`main` imports (torch with them) before it runs, holding a Ctrl-C until they are in."""

    def register(fn):
        COMMANDS[name] = (args_cls, fn, help)
        NEEDS[name] = tuple(needs)
        return fn

    return register


def _arg_help(cls: type) -> dict[str, str]:
    """Field help parsed from the 'Args:' sections of the dataclass's docstring and its bases' (the
    class's own wins: a recipe may describe a shared option its own way)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if "__doc__" not in vars(klass) or not dataclasses.is_dataclass(klass):
            continue
        doc, current = inspect.cleandoc(klass.__doc__ or ""), None
        if "Args:" not in doc:
            continue
        for line in doc.split("Args:", 1)[-1].splitlines():
            m = re.match(r"\s{4}(\w+): (.*)", line)
            if m:
                current = m.group(1)
                out[current] = m.group(2)
            elif current and line.startswith(" " * 8):
                out[current] += " " + line.strip()
            elif line.strip() and not line.startswith(" "):
                current = None  # prose after the Args block
    return out


def _with_default(help: str, f: dataclasses.Field) -> str:
    """The help text with the field's default appended, unless the text already says it or there is none."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return help
    if "default" in help or default is None or default == "" or default == [] or f.metadata.get("positional"):
        return help
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, (list, tuple)):
        shown = ",".join(map(str, default))
    else:
        shown = str(default)
    return f"{help} (default: {shown})".strip()


def _fields_in_help_order(cls: type) -> list[dataclasses.Field]:
    """The class's own options first, then those it shares with other commands (inherited)."""
    own = list(vars(cls).get("__annotations__", {}))  # in declaration order
    fs = {f.name: f for f in dataclasses.fields(cls)}
    return [fs[n] for n in own if n in fs] + [f for n, f in fs.items() if n not in own]


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(type without Optional, whether it was Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0], True
    return tp, False


def _list_of(item: type) -> Callable[[str], list]:
    def parse(s: str) -> list:
        try:
            return [item(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, got {s!r}") from None

    parse.__name__ = f"list of {item.__name__}"
    return parse


def gap(a) -> str:
    """The blank line a command prints before its result, apart from its progress bars; none with --no-progress
    (the result alone, from its first line)."""
    return "\n" if getattr(a, "progress", True) else ""


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field: --kebab-case, typed, with help; fields with metadata positional=True are positional,
    a field's metadata choices are shown as its value in the help."""
    helps = _arg_help(cls)
    hints = typing.get_type_hints(cls)
    for f in _fields_in_help_order(cls):
        tp, _ = _base_type(hints[f.name])
        kw: dict[str, Any] = {"help": _with_default(helps.get(f.name, ""), f), "default": argparse.SUPPRESS}
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="*", **kw)
            continue
        flag = "--" + f.name.replace("_", "-")
        if "choices" in f.metadata:  # (shown in --help; checked by the command, which a --config value reaches too)
            kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag, type=_list_of(typing.get_args(tp)[0]), **kw)
        else:
            parser.add_argument(flag, type=tp, **kw)


def build_args(cls: type, ns: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The dataclass instance from YAML defaults (--config) overridden by the flags given."""
    values: dict[str, Any] = {}
    if getattr(ns, "config", None):
        values.update(_read_yaml(ns.config, cls))
    values.update({k: v for k, v in vars(ns).items() if k not in ("command", "config")})
    try:
        return cls(**values)
    except TypeError as e:
        parser.error(str(e))


def _read_yaml(path: str, cls: type) -> dict:
    """The options a YAML file sets, read as their types; errors name the file, and the line and option."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise OztuneError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise OztuneError(f"{path}: is a directory, not a YAML file") from None
    except UnicodeDecodeError as e:
        raise OztuneError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise OztuneError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:  # the node tree too: its lines for the messages, and each scalar's text as written
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        seen: dict[str, int] = {}
        for key, _ in node.value if isinstance(node, yaml.MappingNode) else []:
            name, line = str(key.value).replace("-", "_"), key.start_mark.line + 1
            if key.tag == "tag:yaml.org,2002:merge":
                continue
            if name in seen:
                raise OztuneError(f"{path}: line {line}: {name} is given twice (first on line {seen[name]})")
            seen[name] = line
        data = loader.construct_document(node) if node is not None else None  # (merges `<<: *base` in node)
    except (yaml.YAMLError, ValueError) as e:  # (ValueError: a tagged scalar such as `!!int x`)
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise OztuneError(f"{path}: {where}not valid YAML ({problem or str(e).splitlines()[0]})") from None
    if data is None:  # only comments
        return {}
    if not isinstance(data, dict):
        raise OztuneError(f"{path}: expected a mapping of option names to values")
    # Each value is constructed a second time below, deliberately: construct_document (above) checks the whole
    # document with YAML's own messages (an unhashable key, a bad `<<` merge, `!!int x`) and flattens the merges
    # into node.value, which the loop below reads; the deep construction of each value, one by
    # one, refuses a recursive alias with its key's line (construct_document accepts `a: &x [*x]`) and gives each
    # option its own line. A config file is a few lines: the second pass costs nothing that matters.
    given: dict[str, tuple[int, Any, Any]] = {}  # option -> (line, value, value node); a later pair wins a merge's
    for key, value in node.value:
        try:  # (deep: an alias that holds itself, `a: &x [*x]`, is refused here, not in construct_document)
            constructed = loader.construct_object(value, True)
        except (yaml.YAMLError, ValueError) as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise OztuneError(f"{path}: line {key.start_mark.line + 1}: {key.value}: not valid YAML ({problem})") from None
        given[str(key.value).replace("-", "_")] = (key.start_mark.line + 1, constructed, value)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise OztuneError(f"{path}: unknown option(s) {', '.join(_elsewhere(n, cls) for n in unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    positional = {f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")}
    return {name: _yaml_value(v, hints[name], f"{path}: line {line}: {name}", n, split=name not in positional)
            for name, (line, v, n) in given.items()}


def _elsewhere(name: str, cls: type) -> str:
    """An unknown option's name, with the commands that have it ("port (an option of serve)")."""
    others = [c for c, (k, _, _) in COMMANDS.items() if k is not cls and name in {f.name for f in dataclasses.fields(k)}]
    return f"{name} (an option of {', '.join(others)})" if others else name


def _yaml_value(v: Any, tp: Any, where: str, node: Any = None, split: bool = True) -> Any:
    """A YAML value as the option's type, as the command line would read it: YAML reads ``5e-5`` as a string
    and ``a,b`` as one string; ``lr: fast`` or ``epochs: three`` are errors that name the key. A text option
    takes a scalar as written (``label_names: [yes, no]`` are the names yes and no, not booleans). A list
    option splits a scalar at its commas, as its flag does, unless ``split`` is False: a positional list
    (predict's texts, compare's models) takes each command-line word whole, so a scalar is one item."""
    import yaml

    tp, optional = _base_type(tp)
    if v is None:
        if optional:
            return None
        raise OztuneError(f"{where}: expected a value, got nothing")
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        if isinstance(v, dict):
            raise OztuneError(f"{where}: expected a list, got {v!r}")
        if isinstance(v, list):
            nodes = node.value if isinstance(node, yaml.SequenceNode) else [None] * len(v)
            return [_yaml_value(x.strip() if isinstance(x, str) else x, item, where, n) for x, n in zip(v, nodes)]
        if not split:
            return [_yaml_value(v, item, where, node)]
        text = node.value if item is str and isinstance(node, yaml.ScalarNode) else str(v)
        return [_yaml_value(x.strip(), item, where) for x in text.split(",") if x.strip()]
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise OztuneError(f"{where}: expected true or false, got {v!r}")
    if tp in (int, float):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if tp is float or float(v).is_integer():
                return tp(v)
        elif isinstance(v, str):
            try:
                return tp(v)
            except ValueError:
                pass
        raise OztuneError(f"{where}: expected {'an integer' if tp is int else 'a number'}, got {v!r}")
    if tp is str and isinstance(v, (dict, list)):
        raise OztuneError(f"{where}: expected a text value, got {v!r}")
    if tp is str:
        return node.value if isinstance(node, yaml.ScalarNode) else str(v)
    return v


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that takes each option only by its whole name: a prefix (``--out`` for ``--output``) is
    an error, not a guess that a later option would change. The subcommands' parsers are of this class too
    (``add_subparsers`` makes them of the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


class _CommandList(argparse.HelpFormatter):
    """The top-level help, with every command's help beside its name: argparse measures the command names at the
    section's indent, but lists them 2 columns further in, so a name one letter longer than the others (calibrate)
    went on a line of its own."""

    def add_argument(self, action):
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction) and hasattr(self, "_action_max_length"):
            self._action_max_length += 2  # (argparse's own measure, private: left alone where it is not there)


def make_parser() -> argparse.ArgumentParser:
    from oztune import commands  # noqa: F401  (registers the commands; no torch)

    parser = _Parser(prog="oztune", description="Fine-tune, compress and serve transformer classifiers on CPU.",
                     formatter_class=_CommandList)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = {}
    for name, (cls, _, help) in COMMANDS.items():
        p = parser.commands[name] = sub.add_parser(name, help=help,
                                                   description=(inspect.getdoc(cls) or "").split("\n\n")[0])
        add_dataclass_args(p, cls)
        p.add_argument("--config", help="YAML file of option defaults (keys are option names)")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an unknown option is refused by the command's own parser: "oztune predict:
    error: unrecognized arguments: --out" and predict's usage, where argparse names only "oztune"."""
    ns, extra = parser.parse_known_args(argv)
    if extra:
        parser.commands[ns.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return ns


def _version() -> str:
    """oztune's version and torch's (read from its installed metadata: importing torch takes seconds)."""
    from importlib import metadata

    from oztune import __version__

    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    return f"oztune {__version__} (torch {torch})"


class Terminated(BaseException):
    """SIGTERM, raised in the main thread: unwinds like Ctrl-C, so that half-written (staging) directories are
    removed on the way out instead of being left behind by a process killed on the spot."""


def _on_stop(stops: list[int], held: threading.Event | None = None) -> Callable:
    """A handler of SIGINT and SIGTERM that notes the signal in ``stops`` and raises KeyboardInterrupt (Ctrl-C)
    or :class:`Terminated`: raised inside C code (safetensors loading a model), that exception can come out as
    another error ('corrupt file', a TypeError), which the note shows to be the stop that was asked for.

    While ``held`` is set (the commands' modules, torch among them, being imported) the signal is only noted, for
    :func:`main` to act on once the imports are done: an exception raised inside an import can be swallowed by
    importlib ('Exception ignored in ...', and the command then runs all the same) or, inside code that a module
    runs with ``exec`` (dataclasses), leave CPython's mark of an unhandled Ctrl-C, which ends the process by
    SIGINT instead of the exit code 130."""

    def handler(signum, frame):
        stops.append(signum)
        if held is not None and held.is_set():
            return
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    return handler


def _stopped(command: str | None, signum: int) -> int:
    """Say that the command (None: before it is known) was stopped, on one line; its exit code: 143 for SIGTERM,
    130 for Ctrl-C."""
    who = f"oztune {command}" if command else "oztune"
    if signum == signal.SIGTERM:
        print(f"{who}: stopped by SIGTERM (outputs are written whole or not at all)", file=sys.stderr)
        return 143
    print(f"{who}: interrupted (outputs are written whole or not at all)", file=sys.stderr)
    return 130


def _import_needs(name: str) -> None:
    """Import the modules that the command ``name`` runs on (its ``needs``)."""
    import importlib

    for module in NEEDS.get(name, ()):
        importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    """Run the command that ``argv`` (default: the process's arguments) names; its exit code. A stop (Ctrl-C,
    SIGTERM) is taken from the start, not only while a command runs: one that comes while the command's modules
    import torch (~2 s) ends the process as soon as they are imported. Either way: exit 130 or 143 and one
    line, no traceback. ``--help`` and a bad option are answered before torch is imported."""
    stops: list[int] = []
    importing = threading.Event()
    importing.set()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signum == signal.SIGINT and signal.getsignal(signum) is not signal.default_int_handler:
                continue  # (Ctrl-C ignored, as in a background job, or handled by the caller: left so)
            previous[signum] = signal.signal(signum, _on_stop(stops, importing))
    name = None
    try:
        parser = make_parser()  # (imports the commands' options, not torch: a stop meanwhile is only noted)
        importing.clear()
        if stops:
            return _stopped(None, stops[-1])
        if not (sys.argv[1:] if argv is None else argv):  # `oztune` alone: the commands, not only "COMMAND required"
            print(parser.format_help(), end="", file=sys.stderr)
            return 2
        ns = parse(parser, argv)  # (--help and a bad option end here, before torch is imported)
        name = ns.command
        cls, fn, _ = COMMANDS[name]
        args = build_args(cls, ns, parser)
        importing.set()
        _import_needs(name)  # (torch and the modules the command runs on: a stop meanwhile is only noted)
        importing.clear()
        if stops:
            return _stopped(name, stops[-1])
        return int(fn(args) or 0)
    except Terminated:
        return _stopped(name, signal.SIGTERM)
    except KeyboardInterrupt:
        return _stopped(name, signal.SIGINT)
    except Exception as e:
        if stops:  # an extension turned the stop's exception into another error: it is the stop all the same
            return _stopped(name, stops[-1])
        if isinstance(e, OztuneError):
            print(f"oztune {name}: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, BrokenPipeError):  # stdout closed early (oztune predict ... | head): not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            return 141
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":  # python -m oztune.cli: the commands register in oztune.cli, which this __main__ is not
    from oztune.cli import main as cli_main

    sys.exit(cli_main())
