"""Output directories written whole or not at all: checked before any work, written into a temporary sibling,
swapped into place at the end (the earlier model put back if the swap is stopped half-way), and the leftovers
of saves killed on the spot removed by the next save of the same output.

Every command that writes a model directory (finetune, quantize, prune, distill, compress, export) goes through
:func:`check_output_dir` before its work and :func:`staged_dir` for the write; a single file (predict --output,
evaluate --mistakes) is written through :func:`staged_file` (beside a symbolic link's target, which it replaces:
the link stays), whose leftovers are removed in the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from oztune.errors import ModelError, OztuneError, path_errors

MODEL_MARKERS = ("config.json", "model.onnx")  # a model directory holds one of these
# Every name a model save writes at the top of its directory: an existing output is replaced only when it is
# empty, or holds one of MODEL_MARKERS and nothing but these (anything else in it would be deleted with it).
MODEL_FILES = frozenset({
    # oztune's saves: models/hub.py save_classifier (finetune, quantize, prune, distill, compress), with
    # train/finetune.py's step log; data/tokenize.py TextEncoder.save (TOKENIZER_FILES); compress/report.py
    # and compress/search.py (the report, every variant under variants/); train/calibrate.py's reliability
    # diagram; serve/export.py (ONNX: model.onnx and its external weights; AOT: the model copied, its graphs
    # under aoti/, models/aot.py AOT_DIR)
    "config.json", "model.safetensors", "run.json", "README.md", "train_log.csv", "reliability.png",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "report.md", "report.json", "pareto.png", "variants",
    "model.onnx", "model.onnx.data", "aoti",
    # Hugging Face save_pretrained's (a model, its tokenizer): the ones above and these
    "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json", "generation_config.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.model",
})
MODEL_FILE_PATTERNS = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")  # shards of a large model


def is_model_file(name: str) -> bool:
    """Whether ``name``, at the top of a directory, is something a model save writes (:data:`MODEL_FILES`)."""
    return name in MODEL_FILES or MODEL_FILE_PATTERNS.fullmatch(name) is not None


def _not_model_files(out: Path) -> tuple[list[str], bool]:
    """What replacing ``out`` would delete that is not a model's: the names of its entries (all of them where it
    holds no model: none of :data:`MODEL_MARKERS`; else those that are not :data:`MODEL_FILES`), sorted, and
    whether it is a model directory. Nothing for a missing or empty directory, or one a model save wrote."""
    if not out.is_dir():
        return [], False
    names = sorted(p.name for p in out.iterdir())
    model = any((out / f).is_file() for f in MODEL_MARKERS)
    return ([n for n in names if not is_model_file(n)] if model else names), model


def _refusal(out: Path) -> tuple[str, str] | None:
    """Why ``out`` may not be replaced as a whole (after its path, for a message) and what the user can do,
    or None where it may."""
    held, model = _not_model_files(out)
    if not held:
        return None
    shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
    if model:
        return f"exists and holds files that are not a model's ({shown})", "move them"
    return f"exists and is not a model directory (it holds {shown})", "empty this one"


def check_output_dir(output: str | os.PathLike | None, option: str = "--output",
                     inputs: tuple[str | os.PathLike | None, ...] = (), replaced: bool = True) -> Path:
    """Check, before any work, a directory that will be written: replaced as a whole, atomically, from a
    sibling temporary directory. Nothing that is not a model is ever replaced.

    Refused: no value; an existing file; an existing directory that holds anything but a model (config.json
    or model.onnx, and nothing a model save does not write, :data:`MODEL_FILES`: the model of an earlier run is
    replaced, anything else in it would be deleted); the current
    directory or one above it; a directory that holds one of ``inputs``, or is inside one of them that is a
    directory (a model inside its input model would go with it when that is replaced or copied); a path whose
    nearest existing ancestor is not a directory we can create files in; a name the file system cannot hold
    (over 255 bytes: :func:`oztune.errors.path_errors`), or too long for the temporary sibling.

    Args:
        output: the directory.
        option: the command-line option that named it, for the message.
        inputs: the command's input files and directories (None entries are skipped).
        replaced: False for a directory that is written into, not replaced (checkpoints): then only the
            checks of a value, a file and a writable place apply.

    Returns:
        The absolute path.
    """
    if not output:
        raise OztuneError(f"{option} is required")
    with path_errors(f"{option} {output}"):  # (a name too long for the file system, ...)
        return _check_output_dir(output, option, inputs, replaced)


def _check_output_dir(output: str | os.PathLike, option: str, inputs: tuple[str | os.PathLike | None, ...],
                      replaced: bool) -> Path:
    """:func:`check_output_dir`'s checks of a given ``output``."""
    out = Path(os.path.abspath(output))
    real = out.resolve()
    if not replaced:
        inputs = ()
    elif real == Path.cwd().resolve() or real in Path.cwd().resolve().parents:
        raise OztuneError(f"{option} {output}: the current directory or one above it; name a directory to write to")
    for given in inputs:
        with path_errors(str(given)):  # (an input's own name, said as its own)
            _check_not_input(real, output, option, given)
    if out.exists() and not out.is_dir():
        raise OztuneError(f"{option} {output}: exists and is not a directory")
    refused = _refusal(out) if replaced else None
    if refused:
        raise OztuneError(f"{option} {output}: {refused[0]}; oztune replaces its output directory as a whole: "
                          f"choose a new one or {refused[1]}")
    parent = out.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise OztuneError(f"{option} {output}: cannot be created, {parent} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise OztuneError(f"{option} {output}: cannot write to {parent} ({e.strerror or e})") from None
    if replaced:
        check_name_length(out, parent, option, output)
    return out


def _check_not_input(real: Path, output, option: str, given) -> None:
    """Refuse an output (``real``: resolved) that is the input ``given``, holds it, or is inside it (a directory)."""
    if given and real == Path(given).resolve():
        raise OztuneError(f"{option} {output}: is the input {given}, which would be replaced; write to "
                          "another directory")
    if given and real in Path(given).resolve().parents:
        raise OztuneError(f"{option} {output}: holds the input {given}, and would be replaced as a whole; "
                          "choose another directory")
    if given and os.path.isdir(given) and Path(given).resolve() in real.parents:
        raise OztuneError(f"{option} {output}: is inside the input {given}, and would go with it when that is "
                          "replaced or copied; write the result elsewhere")


def check_name_length(out: Path, parent: Path, option: str, output, what: str = "directory") -> None:
    """Refuse, before any work, a name whose temporary siblings (:func:`_stage_prefix`: ~25 bytes and the host
    name longer) the file system cannot hold: the save, at the end of the run, would fail on it. ``what``: the
    temporary sibling's kind (directory, file), for the message."""
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # (no such query here: the save will say)
        return
    extra = len(os.fsencode(_stage_prefix(Path(""), "kept"))) + 8  # (.kept-, the longest; mkdtemp's 8 characters)
    name = len(os.fsencode(out.name))
    if name + extra > limit:
        raise OztuneError(f"{option} {output}: its name is too long ({name} bytes; at most {limit - extra} here, "
                          f"for the temporary {what} beside it)")


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` to write into; when the block succeeds it replaces ``out`` as a
    whole (:func:`_replace_dir`), when it fails it is removed: ``out`` is never half-written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=_stage_prefix(out, "tmp"), dir=out.parent))
    except OSError as e:
        raise _not_written(out, e) from None
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a read-only or unwritable place: the user's to fix
            raise _not_written(out, e, tmp) from None
        raise
    _replace_dir(tmp, out)  # (where it refuses, it keeps tmp and its message names it)


def staged_file(out: Path) -> tuple[int, Path]:
    """A new temporary file beside ``out`` (open descriptor and path; mode 0600, as ``mkstemp`` makes it) for the
    caller to write and rename over ``out``. It is named as :func:`staged_dir`'s directories are, after the writing
    process, and the leftovers of earlier writes of ``out`` killed on the spot are removed first, so a kill -9
    during a write leaves its temporary file only until the next write of the same file.
    """
    _remove_stale(out)
    fd, name = tempfile.mkstemp(prefix=_stage_prefix(out, "tmp"), dir=out.parent)
    return fd, Path(name)


def write_atomically(path: str | os.PathLike, text: str | bytes | Iterable[str], option: str = "--output") -> None:
    """Write ``text`` (or its pieces, as they come; or bytes) through a temporary file beside ``path``: an old file is
    replaced whole or kept. The temporary file is removed whatever stops the write; one left by a write killed
    on the spot (kill -9) is removed by the next write of ``path`` (:func:`staged_file`). A ``path`` that is not a
    regular file (``/dev/stdout``, a named pipe, ``/dev/null``) is written into, not replaced (:func:`_write_into`).
    A ``path`` that is a symbolic link is written through: its target is replaced (:func:`_link_target`), the
    link is kept."""
    if _is_special_file(path):
        return _write_into(path, text, option)
    target, tmp = _link_target(path), None
    try:  # a fresh name (.NAME.tmp-PID@HOST-*: never a file of the user's such as PATH.tmp)
        fd, tmp = staged_file(target)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # the mode of a new file, not mkstemp's 0600
        _write(fd, text)
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OztuneError(f"{option} {path}: cannot be written ({e.strerror or e})") from None
        raise


def _link_target(path: str | os.PathLike) -> Path:
    """The file that a write of ``path`` replaces: ``path`` itself (absolute), or, where it is a symbolic link
    (also one whose target does not exist yet), the file it leads to, links followed: a rename over the link
    would replace the link with a regular file and leave its target as it was."""
    if os.path.islink(path):
        return Path(os.path.realpath(path))
    return Path(path).absolute()


def _write(target: int | str | os.PathLike, text: str | bytes | Iterable[str]) -> None:
    """Write ``text`` (a string, its pieces as they come, or bytes) to ``target``: a path, or an open file
    descriptor (closed after)."""
    if isinstance(text, bytes):
        with open(target, "wb") as f:
            f.write(text)
    else:
        with open(target, "w", encoding="utf-8") as f:
            f.writelines([text] if isinstance(text, str) else text)


def _is_special_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` (its links followed) exists and is not a regular file or directory: a pipe, a terminal or
    a device, which a rename would replace with a regular file (the reader gets nothing; as root, ``/dev/stdout``
    itself would be gone)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _write_into(path: str | os.PathLike, text: str | bytes | Iterable[str], option: str) -> None:
    """Write ``text`` (as :func:`write_atomically` takes it) straight into the special file ``path``."""
    try:
        _write(path, text)
    except OSError as e:
        raise OztuneError(f"{option} {path}: cannot be written ({e.strerror or e})") from None


def _stage_prefix(out: Path, kind: str) -> str:
    """The name of a temporary directory or file beside ``out`` (``kind``: tmp, being written; old, the earlier
    model set aside) up to mkdtemp's (mkstemp's) random part: it names the writing process, so that a later save can tell the
    leftover of one killed on the spot (kill -9, power loss: nothing ran to remove it) from a live run's."""
    return f".{out.name}.{kind}-{os.getpid()}@{process_space()}-"


def process_space() -> str:
    """Where this process's id means something: the host name, and on Linux the id of its PID namespace (two
    containers that share a host name, with host networking, and a folder each count processes from 1)."""
    try:
        return f"{socket.gethostname()}+{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux, or /proc not mounted
        return socket.gethostname()


def _remove_stale(out: Path) -> None:
    """Remove the leftovers beside ``out`` of earlier saves of it whose process, on this host, no longer exists:
    temporary directories (:func:`staged_dir`) and temporary files (:func:`staged_file`).

    A live process's are left, and another host's or container's (a shared file system: its process ids are not
    ours, :func:`process_space`). An earlier model set aside (``old``) by a save killed before it put the new one
    in place is the only copy of ``out``: it is left while ``out`` is missing.
    """
    if os.name != "posix":  # os.kill(pid, 0) asks about a process only on POSIX (on Windows it kills it)
        return
    left = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)@(.+)-[^-]+")
    try:
        names = os.listdir(out.parent)
    except OSError:  # (a folder we may write in but not list: nothing to clean, the save goes on)
        return
    ours = (process_space(), socket.gethostname())  # (the host name alone: names written by earlier versions)
    for name in names:
        m, p = left.fullmatch(name), out.parent / name
        if not m or m[3] not in ours or _alive(int(m[2])) or p.is_symlink():
            continue
        if p.is_dir() and (m[1] == "tmp" or os.path.lexists(out)):
            shutil.rmtree(p, ignore_errors=True)
        elif m[1] == "tmp" and p.is_file():  # a file's (:func:`staged_file`)
            try:
                p.unlink()
            except OSError:
                pass


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts: it cannot be signalled, but it runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError; a number no process can have: not ours to judge
        return True
    return True


def _kept(new: Path, out: Path) -> Path:
    """A finished result that could not be put in place, renamed from ``.NAME.tmp-PID@HOST-*`` to
    ``.NAME.kept-PID@HOST-*`` so that no later save takes it for the leftover of a killed one (``new`` itself
    when it has another name or the rename fails)."""
    prefix = f".{out.name}.tmp-"
    if not new.name.startswith(prefix):
        return new
    return renamed(new, f".{out.name}.kept-{new.name[len(prefix):]}")


def renamed(path: Path, name: str) -> Path:
    """``path`` renamed to ``name`` beside it (one atomic step), or ``path`` itself where the rename fails."""
    try:
        os.rename(path, path.with_name(name))
    except OSError:
        return path
    return path.with_name(name)


def _not_written(out: Path, e: OSError, tmp: Path | None = None) -> ModelError:
    """The one-line error of a failed write of ``out`` (its temporary directory ``tmp`` already removed): a file
    of ``tmp`` is named by its name alone (that path is gone), any other file in full."""
    name = Path(e.filename) if e.filename else None
    where = f", {name.name if tmp in name.parents else name}" if name else ""
    kept = "what was there is kept as it was" if os.path.lexists(out) else "nothing was written"
    return ModelError(f"{out}: cannot be written ({e.strerror or e}{where}); {kept}")


def _publish(tmp: Path) -> None:
    """Give a finished temporary directory (``mkdtemp``: 0700) and its files the modes of new ones (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(tmp):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a directory's entries (a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(top: Path) -> None:
    """Flush every file of a finished temporary directory, then each folder (``top`` last), to disk, as
    checkpoints are: renamed into place unsynced, a crash soon after could leave empty or torn files there."""
    for root, _, files in os.walk(top, topdown=False):
        for f in files:
            if not os.path.islink(os.path.join(root, f)):
                fsync_path(os.path.join(root, f))
        fsync_path(root)


def _replace_dir(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` is swapped out first and removed only afterwards.

    An existing ``out`` that is not a model directory, or holds more than a model (see :func:`check_output_dir`,
    which commands call before their work), is never replaced: ``new`` is kept beside it and the error names it.
    """
    _publish(new)
    refused = _refusal(out)
    if refused:
        raise ModelError(f"{out}: {refused[0]}; not replaced, the result is in {_kept(new, out)}")
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is not a directory; not replaced, the result is in {_kept(new, out)}")
    # an earlier model is moved aside into a fresh folder (a ``.old-`` left by a run killed while removing it
    # must not block this one) and put back if anything stops the swap half-way: ``out`` is always whole
    aside = None
    try:
        _sync_tree(new)  # (before the rename: ``out`` is never a directory of files not yet on disk)
        if os.path.lexists(out):
            aside = Path(tempfile.mkdtemp(prefix=_stage_prefix(out, "old"), dir=out.parent))
            os.replace(out, aside / out.name)
        os.replace(new, out)
    except BaseException as e:
        if aside is not None and not os.path.lexists(out) and os.path.lexists(aside / out.name):
            os.replace(aside / out.name, out)  # stopped between the two renames: the earlier model goes back
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)  # empty, or the earlier model once the new one is in place
        if not isinstance(e, Exception) or not new.exists():  # Ctrl-C, SIGTERM: nothing half-done is left
            shutil.rmtree(new, ignore_errors=True)
            raise
        raise ModelError(f"{out}: cannot be replaced ({getattr(e, 'strerror', None) or e}); "
                         f"{'it is kept as it was, ' if os.path.lexists(out) else ''}the result is in "
                         f"{_kept(new, out)}") from None
    with suppress(OSError):  # the rename, on disk too (the model is in place: a folder whose entries cannot
        fsync_path(out.parent)  # be flushed, as on some network file systems, leaves it so)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
