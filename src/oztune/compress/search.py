"""The accuracy-budget search behind ``oztune compress``: try recipes, measure each, keep the fastest in budget.

Recipes: ``int8`` (the fine-tuned model quantized), ``prune`` (structured pruning at each size, then
distillation from the fp32 model to recover) and ``prune-int8`` (the pruned model quantized). Every
variant is saved and measured the same way (:mod:`oztune.compress.report`); the fastest (``--fastest``: by batch-64
throughput, or batch-1 latency) whose main metric is at most ``--max-drop`` points below fp32 becomes the output
model.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from oztune.compress.args import RECIPES, CompressArgs
from oztune.compress.distillation import (DistillConfig, check_train_options, distill, load_task_data,
                                         load_trained, recipe_card)
from oztune.compress.prune import PruneConfig, prune_
from oztune.compress.vocab import prune_vocab_, unk_id
from oztune.compress.quantize import QuantConfig, quantization_record, quantize_
from oztune.compress.report import (MAX_DROP_UNIT, add_relative, budget_words, check_fastest, fastest_words,
                                   measure, pick_fastest, points_of, write_report)
from oztune.config import ModelConfig
from oztune.errors import OztuneError, check_at_least_1
from oztune.models.hub import format_size, save_classifier
from oztune.outdir import staged_dir
from oztune.train import distributed
from oztune.train.loop import TrainConfig, predict_logits, seed_everything



def variant_name(size: float) -> str:
    """The name of the pruned variant keeping ``size`` of the encoder's weights: prune50 for 0.5."""
    return f"prune{round(100 * size)}"


def check_args(a: CompressArgs) -> None:
    if not math.isfinite(a.max_drop) or a.max_drop < 0:
        raise OztuneError(f"--max-drop must be 0 or more ({MAX_DROP_UNIT}), not {a.max_drop}")
    unknown = [r for r in a.recipes if r not in RECIPES]
    if unknown or not a.recipes:
        raise OztuneError(f"--recipes: unknown {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(RECIPES)}")
    bad = [s for s in a.sizes if not 0.01 <= s <= 0.99]  # (a variant is named by its percentage: prune1 to prune99)
    if bad or (not a.sizes and any(r.startswith("prune") for r in a.recipes)):
        raise OztuneError(f"--sizes must be shares of weights kept, each from 0.01 to 0.99; got {a.sizes}")
    names = [variant_name(s) for s in a.sizes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice and any(r.startswith("prune") for r in a.recipes):
        raise OztuneError(f"--sizes {','.join(map(str, a.sizes))}: sizes that round to the same percentage would be "
                          f"one variant ({', '.join(twice)}); give sizes at least 0.01 apart")
    check_at_least_1("--importance-batches", a.importance_batches)
    check_fastest(a.fastest)
    DistillConfig(a.temperature, a.alpha)  # checks both
    check_train_options(a)


def plan(cfg: ModelConfig, keep: float) -> PruneConfig:
    """Pruning that keeps about ``keep`` of the encoder's weights: depth and width each shrink by about sqrt(keep).

    Whole layers save the most CPU time per weight (their layer norms, activations and attention go too),
    but a model that keeps some width in more layers recovers better; this splits the cut between them.
    """
    L = cfg.num_layers
    layers = max(1, min(L, round(L * keep ** 0.5)))
    width = min(1.0, keep * L / layers)
    return PruneConfig(heads=1 - width, ffn=1 - width, layers=L - layers)


def compress(a: CompressArgs) -> dict:
    """Run the search; writes ``a.output`` and returns the report (as report.json holds it).

    Under torchrun every process runs this and trains its share of each batch of the recoveries; only rank 0
    measures the variants (while the others wait, idle), chooses and writes the output; the other ranks return
    an empty dict.
    """
    check_args(a)
    with distributed.joined() as env:  # (the other ranks wait while rank 0 saves)
        return _compress(a, env.is_main)


def _compress(a: CompressArgs, main: bool) -> dict:
    start = time.perf_counter()
    seed_everything(a.seed)
    teacher, enc, meta = load_trained(a.model, "--model", a.max_length)
    cols = a.columns()
    data = load_task_data(teacher, enc, meta, a.train, a.eval, cols, a.max_train_examples, a.seed)
    out = Path(a.output)
    sizes = a.sizes if any(r.startswith("prune") for r in a.recipes) else []
    steps = [("fp32", None)] + ([("int8", None)] if "int8" in a.recipes else []) + [
        (variant_name(s), s) for s in sizes]
    bar = tqdm(steps, desc="compress", unit="step", disable=not (a.progress and main), dynamic_ncols=True)
    rows: list[dict] = []
    teacher_logits = None
    n_params = sum(p.numel() for p in teacher.parameters())

    def add(name: str, model, recipe: str, params: int, quant: dict | None = None, extra: dict | None = None) -> None:
        """Save a variant under work/variants/<name> (fp32: work/fp32, the output if it is kept) and measure it.

        ``params``: the parameter count before quantization (int8 weights are buffers, not parameters).
        fp32 is weighed as saved (fp32 safetensors), not as the input's files (fp16, pytorch_model.bin ...).
        """
        bar.set_postfix_str(f"measuring {name}")
        d = work / "fp32" if name == "fp32" else work / "variants" / name
        run = {"command": "compress", "variant": name, "recipe": recipe, "source": str(a.model), **(extra or {})}
        save_classifier(model, enc, d, meta["id2label"], run=run, quantization=quant, text_pairs=data.text_pairs)
        row = {"name": name, "recipe": recipe, "shape": shape(model), **(extra or {}),
               **measure(model, enc, data.eval, data.eval_texts, data.eval_pairs, d, params)}
        rows.append(row)
        busy = f" (machine busy: other processes took {row['other_cores']:.1f} cores)" if row["busy_machine"] else ""
        tqdm.write(f"{name}: {points_of(row['metric'])} {row['score']:.2f}, {format_size(row['file_mb'])}, "
                   f"{row['throughput']:.0f} texts/s at batch 64, batch-1 p50 {row['latency_p50_ms']:.2f} ms{busy}")

    try:
        with staged_dir(out) if main else nullcontext() as work:  # replaces the output as a whole at the end
            for name, keep in bar:
                bar.set_description(f"compress: {name}")
                if name == "fp32":
                    if main:
                        add("fp32", teacher, "none", n_params)
                elif name == "int8":
                    if main:
                        q = QuantConfig()
                        add("int8", quantize_(copy.deepcopy(teacher), q), "int8", n_params, quantization_record(q))
                else:  # (every rank: the recovery trains data-parallel under torchrun)
                    if teacher_logits is None:
                        bar.set_postfix_str("teacher logits")
                        teacher_logits = torch.from_numpy(predict_logits(teacher, data.train, precision=a.precision))
                    student, info = _pruned(teacher, enc, data, keep, teacher_logits, a, bar)
                    if main and "prune" in a.recipes:
                        add(name, student, "prune", info["parameters"], extra=info)
                    if main and "prune-int8" in a.recipes:
                        q = QuantConfig()
                        add(f"{name}-int8", quantize_(copy.deepcopy(student), q), "prune-int8", info["parameters"],
                            quantization_record(q), info)
                distributed.barrier()  # under torchrun the others wait, idle, while rank 0 measures
            if not main:
                return {}
            bar.set_postfix_str("report")
            _finish(a, rows, work, data, start)
    finally:
        bar.close()
    return json.loads((out / "report.json").read_text())


def _pruned(teacher, enc, data, keep: float, teacher_logits: torch.Tensor, a: CompressArgs, bar) -> tuple:
    """Structured pruning to ``keep`` of the encoder, recovery by distillation, then the vocabulary.

    Returns (model, record of what was done).
    """
    pcfg = plan(teacher.cfg, keep)
    pcfg.importance_batches, pcfg.batch_size = a.importance_batches, a.batch_size
    bar.set_postfix_str("ranking heads, neurons, layers")
    student = prune_(copy.deepcopy(teacher), pcfg, data.train)
    bar.set_postfix_str(f"recovering {shape(student)}")
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, precision=a.precision, seed=a.seed,
                      freeze_embeddings=True, progress=a.progress)
    # (an unstructured-pruned input's zeros stay zero through the recovery: see distill)
    result = distill(teacher, student, data.train, cfg, DistillConfig(a.temperature, a.alpha), data.eval,
                     teacher_logits=teacher_logits)
    unk = unk_id(enc)
    if a.prune_vocab and unk is not None and isinstance(student.backbone.embed.word, nn.Embedding):
        prune_vocab_(student, data.train_tokens, unk, enc.pad_id)  # (a vocabulary pruned before, by an earlier compress, stays)
    return student, {"keep": keep, "prune": asdict(pcfg), "parameters": sum(p.numel() for p in student.parameters()),
                     "recovery": {"history": result.history, "seconds": round(result.seconds, 1)}}


def shape(model) -> str:
    """Short shape: layers, heads and FFN width summed over layers, token-embedding rows (L6 H72 F9216 V30522)."""
    c = model.cfg
    return f"L{c.num_layers} H{sum(c.layer_heads)} F{sum(c.layer_ffn)} V{model.backbone.embed.word.weight.shape[0]}"


def _finish(a: CompressArgs, rows: list[dict], work: Path, data, start: float) -> None:
    """Pick the fastest variant in budget, put it at the top of the output and write the report."""
    add_relative(rows, rows[0], a.max_drop)
    chosen = pick_fastest(rows, a.fastest)
    # fp32: nothing smaller kept the accuracy, the output is the input model (as measured, saved in fp32)
    src = work / "fp32" if chosen == "fp32" else work / "variants" / chosen
    for f in src.iterdir():
        shutil.copy2(f, work / f.name)
    shutil.rmtree(work / "fp32", ignore_errors=True)
    settings = {**asdict(a), "train_examples": len(data.train), "eval_examples": len(data.eval),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "seconds": time.perf_counter() - start}
    write_report(work, rows, chosen, a.max_drop, settings)
    (work / "README.md").write_text(compress_card(a, rows, chosen, data.text_pairs))
    if not a.keep_variants:
        shutil.rmtree(work / "variants", ignore_errors=True)


def compress_card(a: CompressArgs, rows: list[dict], chosen: str, text_pairs: bool | None) -> str:
    """The model card README.md of the model compress keeps (as quantize, prune and distill write one): its
    source, the recipe kept and its score against fp32, the metrics beside fp32's, how to run it."""
    base, best = rows[0], next(r for r in rows if r["name"] == chosen)
    points = points_of(best["metric"])
    kept = (f"`{chosen}` (recipe {best.get('recipe', chosen)}, {best['shape']})" if chosen != "fp32" else
            "fp32, the source model as it was measured (no other variant within the budget was faster)")
    return recipe_card("compressed classifier (oztune compress)", [
        f"Source: `{a.model}`; recipes tried: {', '.join(a.recipes)}; kept: {kept}",
        f"{points} {best['score']:.2f} against fp32's {base['score']:.2f} ({best['change']:+.2f} pt; budget: at most "
        f"{budget_words(a.max_drop, best['metric'])} below), {best['speedup']:.2f}x fp32 throughput at batch 64, "
        f"{best['latency_speedup']:.2f}x its speed at batch 1 (kept as the fastest by {fastest_words(a.fastest)})",
        f"Evaluated on `{a.eval}`; every variant's figures: report.md",
    ], base["metrics"], best["metrics"], a.output, columns=("fp32", f"kept: {chosen}"),
                       text_pairs=text_pairs)
