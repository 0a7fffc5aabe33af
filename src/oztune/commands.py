"""The core commands: finetune, evaluate, predict. Other packages register theirs on import (see the end).

This module and the commands' option dataclasses import no torch: the command line builds its parser and prints
``--help`` from them alone. What a command runs on is imported inside it, and named in its ``needs`` (imported by
:func:`oztune.cli.main` before the command runs, with a Ctrl-C meanwhile held until the imports are done)."""

from __future__ import annotations

import contextlib
import errno
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from oztune.cli import command, gap
from oztune.data.labels import parse_multi_label
from oztune.data.readers import decode_utf8, is_blank, lone_surrogate, read_lines, split_lines
from oztune.errors import DataError, OztuneError, check_at_least_1, check_text_pairs, path_errors
from oztune.outdir import check_name_length
from oztune.outdir import write_atomically as _write_atomically
from oztune.train.args import FinetuneArgs


def _show_metrics(metrics: dict) -> str:
    from oztune.train.metrics import metric_values

    return "  ".join(f"{k} {v:.4f}" for k, v in metric_values(metrics).items())


def _when(entry: dict) -> str:
    """Where in training an evaluation happened: "epoch 2", or "step 300, epoch 0.75" inside an epoch."""
    epoch = entry.get("epoch", "?")
    return f"epoch {epoch}" if not isinstance(epoch, float) else f"step {entry.get('step')}, epoch {epoch:.2f}"


@command("finetune", FinetuneArgs, "fine-tune a pre-trained model with a task head on labelled text",
         needs=("oztune.train.finetune", "oztune.api"))
def finetune_cmd(a: FinetuneArgs) -> int:
    from oztune.api import Classifier
    from oztune.data.load import Columns, read_labelled
    from oztune.train.distributed import is_main_process
    from oztune.train.finetune import finetune

    if not a.train:
        raise OztuneError("--train is required")
    run = finetune(a)
    if not is_main_process():  # under torchrun only rank 0 reports
        return 0
    print(f"{gap(a)}fine-tuned {a.model} on {run['train_examples']:,} examples in {run['train_seconds']:.0f} s "
          f"({run['train_examples_per_s']:.0f} examples/s); saved to {a.output}")
    if run["metrics"]:
        print(f"{'eval' if a.evaluates else 'train'} metrics ({'best' if a.evaluates else 'last'}: "  # (no eval: no choice)
              f"{_when(run['metrics'])}): {_show_metrics(run['metrics'])}")
        if "note" in run["metrics"]:
            print(f"note: {run['metrics']['note']}")
    if a.evaluates:
        clf = Classifier.from_pretrained(a.output)
        examples = read_labelled(a.eval or a.train, Columns(a.text_column, a.text_pair_column, a.label_column),
                                 problem_type=clf.problem_type)
        if a.eval_split:
            held = set(run["eval_lines"][:5])
            examples = [e for e in examples if e.line in held]
        examples = examples[:5]
        preds = clf.predict([e.text for e in examples],
                            [e.text_pair for e in examples] if examples and examples[0].text_pair else None)
        gold_ids = clf.gold_label_ids([e.label for e in examples]) if clf.problem_type != "regression" else {}
        print(f"\nsome predictions on the {'held-out examples' if a.eval_split else 'eval file'} (reloaded from disk):")
        for e, p in zip(examples, preds):
            # a pair's second text too: the label may hang on it alone
            text = f"{e.text[:40]} | {e.text_pair[:40]}" if e.text_pair else e.text[:70]
            if clf.problem_type == "regression":  # a value, no label
                print(f"  {p['score']:>8.3f}  gold {float(e.label):>8.3f}  {text}")
                continue
            if clf.problem_type == "multi_label":  # the labels named, not a Python list; none: "(none)", not "[] ()"
                shown = f"{', '.join(map(str, p['label']))} ({', '.join(f'{s:.3f}' for s in p['score'])})" \
                    if p["label"] else "(none)"
                gold = ", ".join(str(clf.id2label.get(gold_ids.get(str(n)), n))  # (class ids: --label-names)
                                 for n in parse_multi_label(e.label, where=f"line {e.line}")) or "(none)"
                print(f"  {shown:>14}  gold {gold:>8}  {text}")
                continue
            gold = clf.id2label.get(gold_ids.get(str(e.label)), e.label)
            print(f"  {str(p['label']):>8} ({p['score']:.3f})  gold {str(gold):>8}  {text}")
    return 0


@dataclass
class EvaluateArgs:
    """Evaluate a saved model on a labelled file.

    Args:
        model: model directory (from oztune finetune, quantize, prune, distill or compress), or an oztune export
            (ONNX: run on onnxruntime).
        data: labelled file (.csv, .tsv or .jsonl).
        json: print one JSON object instead of a table.
        batch_size: examples per forward pass.
        text_column: column holding the text.
        text_pair_column: column holding the second text of a pair.
        label_column: column holding the label.
        per_label: add each label's precision, recall, F1 and support, and (single-label) the confusion matrix.
        mistakes: write the examples the model gets wrong to this JSONL file (line, text, label, predicted,
            score; single-label: most confident first); '-': to stdout, the metrics table then to stderr (not with
            --json).
        reliability: write a reliability diagram of the scores (PNG) to this file: in each confidence bin, the
            share of predictions that are right against their mean confidence (classifiers).
    """

    model: str = ""
    data: str = ""
    json: bool = False
    batch_size: int = 64
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    per_label: bool = False
    mistakes: str | None = None
    reliability: str | None = None


# The confusion matrix is printed for at most this many labels (--json always holds it).
MAX_MATRIX_LABELS = 12


@command("evaluate", EvaluateArgs, "metrics of a saved model on a labelled file", needs=("oztune.serve.backends",))
def evaluate_cmd(a: EvaluateArgs) -> int:
    from oztune.data.load import Columns

    if not a.model or not a.data:
        raise OztuneError("--model and --data are required")
    check_at_least_1("--batch-size", a.batch_size)
    to_stdout = a.mistakes == "-"  # (as predict's --output -: standard output, not a file named '-')
    if to_stdout and a.json:
        raise OztuneError("--mistakes - and --json would both write to standard output; write the mistakes to a file")
    if a.mistakes and not to_stdout:
        _check_output_file(a.mistakes, "--mistakes", inputs=(a.data,), model=a.model)
    if a.reliability:
        _check_output_file(a.reliability, "--reliability", inputs=(a.data, a.mistakes), model=a.model)
    clf = _open(a.model, a.batch_size)
    metrics = clf.evaluate(a.data, Columns(a.text_column, a.text_pair_column, a.label_column),
                           per_label=a.per_label, mistakes=bool(a.mistakes), reliability=bool(a.reliability))
    bins = metrics.pop("reliability", None)
    if bins is not None:
        from oztune.train.calibrate import reliability_png

        _write_atomically(a.reliability, reliability_png(
            {Path(a.model).name: (bins, metrics["ece"])}, clf.problem_type, len(clf.id2label),
            f"Reliability of {Path(a.model).name} on {Path(a.data).name} ({metrics['examples']:,} examples)"),
            "--reliability")
    wrong = metrics.pop("mistakes", None)
    lines = None if wrong is None else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in wrong)
    if lines is not None and not to_stdout:
        _write_atomically(a.mistakes, lines, "--mistakes")
    if a.json:
        print(json.dumps(metrics))
    else:  # (the mistakes on standard output: the table goes to standard error)
        with contextlib.redirect_stdout(sys.stderr if to_stdout else sys.stdout):
            _print_metrics(a, metrics)
    if lines is not None and to_stdout:
        _write_stdout(lines)
    if wrong is not None:
        where = "standard output" if to_stdout else a.mistakes
        print(f"{len(wrong):,} mistakes written to {where}", file=sys.stderr if a.json or to_stdout else sys.stdout)
    if bins is not None:
        print(f"reliability diagram written to {a.reliability}", file=sys.stderr if a.json or to_stdout else sys.stdout)
    return 0


def _print_metrics(a: EvaluateArgs, metrics: dict) -> None:
    """The metrics table of ``evaluate`` (without --json): each metric, the note, the per-label report."""
    print(f"{a.model} on {a.data} ({metrics['examples']:,} examples)")
    for k, v in metrics.items():
        if isinstance(v, float):
            print(f"  {k:<16} {v:.4f}")
    if "note" in metrics:
        print(f"note: {metrics['note']}")
    if "per_label" in metrics:
        _print_label_report(metrics)


CALIBRATE_SHOWN = 12  # per-label temperatures printed (all in run.json)


@dataclass
class CalibrateArgs:
    """Calibrate a classifier's scores by temperature scaling: one temperature T fitted on a labelled file, the
    model's logits divided by it (folded into its output layer), the labels unchanged (single- or multi-label;
    --per-label: one temperature per label of a multi-label model).

    Args:
        model: fine-tuned model directory (from oztune finetune, quantize, prune, distill or compress).
        data: labelled file to fit the temperature on: held-out data (an evaluation split), not the training
            file, on which a model is overconfident by construction.
        output: directory to write the calibrated model to (replaced atomically).
        batch_size: examples per forward pass.
        max_length: longest input in tokens (default: the length the model was fine-tuned with).
        text_column: column holding the text.
        text_pair_column: column holding the second text of a pair.
        label_column: column holding the label.
        per_label: multi-label models: one temperature per label, each fitted on that label's yes/no decisions
            alone (labels can be over- and under-confident in different measure); needs enough examples of each
            label in --data.
    """

    model: str = ""
    data: str = ""
    output: str = ""
    per_label: bool = False
    batch_size: int = 64
    max_length: int | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None


@command("calibrate", CalibrateArgs, "fit a temperature so that a classifier's scores match how often it is right",
         needs=("oztune.train.calibrate",))
def calibrate_cmd(a: CalibrateArgs) -> int:
    from oztune.train.calibrate import T_RANGE, run_calibrate

    if not a.model or not a.output:
        raise OztuneError("--model and --output are required")
    run = run_calibrate(a)
    b, m = run["metrics_before"], run["metrics"]
    if run["temperatures"] is None:
        bound = " (the end of the range searched)" if run["temperature_at_bound"] else ""
        print(f"temperature {run['temperature']:.4f}{bound}, fitted on {a.data} ({run['examples']:,} examples): the "
              f"scores are the logits divided by it, the labels unchanged; saved to {a.output}")
    else:
        shown = list(run["temperatures"].items())[:CALIBRATE_SHOWN]
        more = len(run["temperatures"]) - len(shown)
        print(f"a temperature per label, fitted on {a.data} ({run['examples']:,} examples): each label's logit is "
              f"divided by its own, the labels unchanged; saved to {a.output}")
        print("  " + ", ".join(f"{n} {t:.4f}" for n, t in shown) + (f", ... ({more} more in run.json)" if more else ""))
        if run["labels_at_bound"]:
            print(f"  at the end of the range searched, {T_RANGE[0]:g} or {T_RANGE[1]:g} (the fit wanted sharper or "
                  f"flatter still: too few examples, all one way, or logits that say little): "
                  f"{', '.join(run['labels_at_bound'])}")
    print(f"  {'':<10} {'before':>8} {'after':>8}")
    for k in ("log_loss", "ece", run["metric"]):
        print(f"  {k:<10} {b[k]:>8.4f} {m[k]:>8.4f}")
    print("(on the file it was fitted on: measure it on other data with oztune evaluate)")
    return 0


def _print_label_report(metrics: dict) -> None:
    """The per-label table and, for a few labels, the confusion matrix."""
    names = list(metrics["per_label"])
    w = max(12, *(len(n) + 2 for n in names))
    ece = all("ece" in r for r in metrics["per_label"].values())  # (multi-label: each label's own)
    print(f"\n  {'label':<{w}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"
          + (f" {'ece':>9}" if ece else ""))
    for n, r in metrics["per_label"].items():
        print(f"  {n:<{w}} {r['precision']:>9.4f} {r['recall']:>9.4f} {r['f1']:>9.4f} {r['support']:>9,}"
              + (f" {r['ece']:>9.4f}" if ece else ""))
    cm = metrics.get("confusion_matrix")
    if cm is None:
        return
    if len(names) > MAX_MATRIX_LABELS:
        print(f"\n  ({len(names)} labels: the confusion matrix is in --json's confusion_matrix)")
        return
    c = max(9, *(len(n) + 2 for n in names))
    print("\n  confusion matrix (rows: gold label, columns: predicted)")
    print(f"  {'':<{w}}" + "".join(f"{n:>{c}}" for n in names))
    for n, row in zip(names, cm):
        print(f"  {n:<{w}}" + "".join(f"{v:>{c},}" for v in row))


@dataclass
class PredictArgs:
    """Predict labels for texts given on the command line or in a file; one JSON object per line.

    Args:
        texts: texts to classify.
        model: model directory, or an oztune export (ONNX: run on onnxruntime).
        input: file of texts (.csv, .tsv, .jsonl: labels not needed; .txt: one text per line) or '-' for one
            text per line on stdin (in both a blank line is an error).
        output: write the JSON lines here instead of stdout ('-': stdout, as for --input).
        all_scores: add the score of every label.
        batch_size: examples per forward pass.
        text_column: column holding the text in --input.
        text_pair_column: column holding the second text in --input.
    """

    texts: list[str] = field(default_factory=list, metadata={"positional": True})
    model: str = ""
    input: str | None = None
    output: str | None = None
    all_scores: bool = False
    batch_size: int = 64
    text_column: str | None = None
    text_pair_column: str | None = None


@command("predict", PredictArgs, "predict labels for texts, one JSON object per line", needs=("oztune.serve.backends",))
def predict_cmd(a: PredictArgs) -> int:
    from oztune.api import check_classification_only
    from oztune.data.load import Columns, holds_pairs, read_labelled

    if not a.model:
        raise OztuneError("--model is required")
    check_at_least_1("--batch-size", a.batch_size)
    if a.output == "-":  # (as --input -: not a file named '-')
        a.output = None
    if a.output:
        _check_output_file(a.output, inputs=(a.input,), model=a.model)
    texts, pairs = list(a.texts), None
    for i, t in enumerate(texts):
        bad = lone_surrogate(t)
        if bad is not None:  # Python reads an undecodable byte of an argument as a lone surrogate
            raise DataError(f"text {i + 1} is not valid UTF-8 (byte 0x{ord(t[bad]) & 0xFF:02x} at position {bad + 1})")
    one_per_line = a.input == "-" or (a.input or "").lower().endswith(".txt")
    if one_per_line:
        where = "standard input" if a.input == "-" else a.input
        if a.text_column or a.text_pair_column:
            raise OztuneError(f"--input {a.input}: one text per line, no columns: --text-column and "
                              "--text-pair-column are for .csv, .tsv and .jsonl files")
        lines = _stdin_lines() if a.input == "-" else read_lines(a.input)
        for i, line in enumerate(lines):
            if is_blank(line):  # skipped, every later answer would sit on the line of the text before it
                raise DataError(f"{where}: line {i + 1} is empty; every line is a text, answered by the "
                                "output line of the same number")
        texts += lines
    elif a.input:
        ex = read_labelled(a.input, Columns(a.text_column, a.text_pair_column, None), require_label=False)
        if holds_pairs(ex) and texts:
            raise OztuneError(f"--input {a.input} holds text pairs: texts given as arguments have no second text; "
                              "give them in the file")
        texts += [e.text for e in ex]
        pairs = [e.text_pair or "" for e in ex] if holds_pairs(ex) else None
    if not texts:  # (an --input FILE with no rows is refused naming the file: read_labelled)
        if one_per_line:  # (given, but empty: "give them with --input FILE" would send one to what was done)
            raise OztuneError(f"--input {a.input}: no texts ({'standard input' if a.input == '-' else 'the file'} "
                              "was empty)")
        raise OztuneError("no texts: give them as arguments or with --input FILE")
    for i, t in enumerate(texts):
        if is_blank(t):
            raise DataError(f"text {i + 1} is empty")
    clf = _open(a.model, a.batch_size)
    check_classification_only(clf.problem_type, all_scores=a.all_scores)  # (before the first answer is written)
    check_text_pairs(clf.text_pairs, pairs is not None,
                     f"--input {a.input}" if a.input else "the texts given as arguments (pairs come in an --input file)")
    lines = _answer_lines(clf, texts, pairs, a.all_scores)
    if a.output:
        _write_atomically(a.output, lines)
    else:
        for chunk in lines:
            _write_stdout(chunk)  # (each chunk's answers as soon as they are known: a pipe reads them as they come)
    return 0


def _write_stdout(text: str) -> None:
    """Write ``text`` to standard output whole or say why not: a large write that fits only in part (a full disk,
    a file-size limit) is a short count to Python, not an error, and the rest was silently lost (exit 0)."""
    buffer = getattr(sys.stdout, "buffer", None)
    try:
        if buffer is None:  # a text stream put in place of stdout (io.StringIO)
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        sys.stdout.flush()
        data = memoryview(text.encode(sys.stdout.encoding or "utf-8"))
        while data:
            n = buffer.write(data)
            if not n:  # (nothing taken and no error: retrying would spin)
                raise OSError(errno.EIO, "nothing written")
            data = data[n:]
        buffer.flush()
    except BrokenPipeError:
        raise  # (stdout closed early: main's to handle)
    except OSError as e:
        raise OztuneError(f"standard output: cannot be written ({e.strerror or e})") from None


PREDICT_CHUNK = 4096  # texts per call of the model's predict: sorted by length within it, so batches stay full


def _answer_lines(clf, texts: list[str], pairs: list[str] | None, all_scores: bool) -> Iterator[str]:
    """The JSON lines of the answers, a chunk of texts at a time: memory stays bounded on a large input (all
    answers at once held 460 MB for 100,000 texts) and the first answers come before the last are computed."""
    for start in range(0, len(texts), PREDICT_CHUNK):
        end = start + PREDICT_CHUNK
        answers = clf.predict(texts[start:end], pairs[start:end] if pairs else None, all_scores=all_scores)
        yield "".join(json.dumps(p) + "\n" for p in answers)


def _stdin_lines() -> list[str]:
    """The lines of standard input, read as UTF-8 (a leading BOM dropped; CRLF, CR or LF ends a line, as in
    Python's text mode); bytes that are not UTF-8 are a DataError naming the line, not a traceback."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream put in place of stdin (io.StringIO): its text is already decoded
        text = sys.stdin.read().removeprefix("\ufeff")  # (a BOM, as the bytes' below)
        bad = lone_surrogate(text)
        if bad is not None:
            raise DataError(f"standard input: line {text.count(chr(10), 0, bad) + 1}: not valid UTF-8")
        return split_lines(text)
    return split_lines(decode_utf8(buffer.read(), "standard input", "give the texts as UTF-8"))


def _open(model: str, batch_size: int):
    """The model to evaluate or predict with: a model directory, an AOT export or an ONNX export."""
    from oztune.serve.backends import open_predictor  # (onnxruntime is imported only for an ONNX export)

    return open_predictor(model, batch_size)


def _check_output_file(output: str, option: str = "--output", inputs: tuple[str | None, ...] = (),
                       model: str | None = None) -> None:
    """``option`` names a file to write (atomically, through a temporary file beside it): say now if it cannot be.
    It must not be one of ``inputs`` (read, then replaced by the results) or any file inside the ``model``
    directory: an existing one would be overwritten, a new one would go with the model when it is replaced or
    copied (as :func:`oztune.outdir.check_output_dir` refuses a directory inside an input one)."""
    with path_errors(f"{option} {output}"):  # (a name too long for the file system, ...)
        _check_output_path(Path(output), output, option, inputs, model)


def _check_output_path(path: Path, output: str, option: str, inputs: tuple[str | None, ...], model: str | None) -> None:
    """:func:`_check_output_file`'s checks."""
    if path.is_dir():
        raise OztuneError(f"{option} {output}: is a directory; give a file name")
    if not path.absolute().parent.is_dir():
        raise OztuneError(f"{option} {output}: its directory {path.absolute().parent} does not exist")
    real = path.resolve()  # (a symbolic link is written through: its target is replaced, beside itself)
    check_name_length(real, real.parent if real.parent.is_dir() else path.absolute().parent, option, output, "file")
    for given in inputs:
        with path_errors(str(given)):  # (an input's own name, said as its own)
            same = given and given != "-" and real == Path(given).resolve()
        if same:
            raise OztuneError(f"{option} {output}: is the input {given}, which would be replaced; write to another file")
    if model and Path(model).is_dir() and Path(model).resolve() in real.parents:
        if path.exists():
            raise OztuneError(f"{option} {output}: is a file of the model {model}, which would be overwritten; "
                              "write to another file")
        raise OztuneError(f"{option} {output}: is inside the model directory {model}, and would go with it when "
                          "that is replaced or copied; write it elsewhere")


def _register_more() -> None:
    """Commands that live with their packages (compression, serving) register themselves on import."""
    import importlib

    for mod in ("oztune.compress.commands", "oztune.serve.commands"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


_register_more()
