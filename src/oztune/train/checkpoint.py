"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a directory ``step-00000120`` in the checkpoint folder holding ``state.pt`` (model,
optimizer, scheduler, RNG states of every rank, position in the data, best-so-far weights and metrics,
the log) and ``manifest.json`` (size and SHA-256 of ``state.pt``, written last). Both are written into a
temporary directory that is renamed into place, so a checkpoint is complete or absent; one whose manifest
is missing or does not match its file (truncated, corrupted) is skipped with a message, never loaded.
``state.pt`` holds only tensors and plain Python values: it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from oztune.errors import OztuneError
from oztune.models.hub import sha256_file
from oztune.models.lora import LoRALinear
from oztune.outdir import fsync_path, renamed
from oztune.train.distributed import DistEnv, barrier, broadcast_object, gather_objects

STATE, MANIFEST = "state.pt", "manifest.json"
_NAME = re.compile(r"step-(\d+)")
_PARTIAL = re.compile(r"\.step-\d+\.tmp-.+")  # the temporary directory of a write that did not finish


@dataclass
class Progress:
    """Where a run stands: the next batch to train on, counters, best-so-far weights and metrics, the log.

    Args:
        epoch: current epoch (0-based).
        batch: index of the next batch in the epoch's batch order (``train_batches(..., seed + epoch)``).
        step: optimizer steps taken.
        bad_evals: evaluations in a row without improvement.
        best_state: weights of the best evaluation so far (None without evaluation data).
        best: metrics of the best evaluation so far.
        history: one entry per evaluation (each epoch's end, and every ``eval_every`` steps).
        log: one row per optimizer step.
        ema: the moving average of the trainable weights (``TrainConfig.ema_decay``; None when off).
        seconds: training time so far (evaluations excluded), over every attempt of a resumed run.
        seen: examples trained on so far, over every attempt.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    bad_evals: int = 0
    best_state: dict | None = None
    best: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)
    ema: list | None = None
    seconds: float = 0.0
    seen: int = 0


def rng_state() -> dict:
    """The Python, NumPy and torch (CPU) generator states of this process, as plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured, so dropout masks and sampling continue identically."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


class _Writes:
    """A file torch.save writes through, keeping the OSError of a failed write."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj, path: Path) -> None:
    """``torch.save`` whose failed write raises the OSError it was: writing to a path, torch reports a full disk
    as a RuntimeError ("unexpected pos 704 vs 598"), which :meth:`Checkpointer.save_run` would not know for one."""
    with open(path, "wb") as f:
        out = _Writes(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def remove_checkpoints(directory: str | os.PathLike) -> None:
    """Delete the checkpoints (and partial writes) in ``directory``, and the folder itself if that empties it."""
    folder = Path(directory)
    if not folder.is_dir():
        return
    found = [p for p in folder.iterdir() if p.is_dir() and (_NAME.fullmatch(p.name) or _PARTIAL.fullmatch(p.name))]
    for p in [_set_aside(p) for p in found]:  # every one set aside first: see _set_aside
        shutil.rmtree(p, ignore_errors=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def _set_aside(path: Path) -> Path:
    """Rename a checkpoint to a temporary name (one step, atomic) before deleting it: deleting takes a while, and
    a run stopped in it left a half-deleted ``step-*`` folder, read later as another run's unfinished checkpoint
    (a fresh start was refused). A temporary name is removed the next time checkpoints are looked for."""
    return renamed(path, f".{path.name}.tmp-removing") if _NAME.fullmatch(path.name) else path


def data_digest(data) -> str:
    """A short SHA-256 of a data set's token ids, lengths and labels (EncodedData)."""
    h = hashlib.sha256(data.lengths.tobytes())
    h.update(np.fromiter(itertools.chain.from_iterable(ids for ids, _ in data.encoded), dtype=np.int64).tobytes())
    if data.labels is not None:
        h.update(data.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def base_weights_digest(model: torch.nn.Module) -> str:
    """A short SHA-256 of the pre-trained encoder's weights as training starts: the backbone's, without the LoRA
    updates and the task head that a run initialises itself, so that another pre-trained model of the same
    shape (``--model``) is not resumed into."""
    h = hashlib.sha256()
    for name, t in model.backbone.state_dict().items():
        if name.rsplit(".", 1)[-1] not in ("lora_a", "lora_b"):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> dict:
    """What the network is, beyond its parameter counts: the task head's settings, a digest of its weights'
    names and shapes (which layers carry LoRA updates), and each LoRA update's scale and dropout."""
    names = hashlib.sha256("\n".join(f"{k}:{tuple(t.shape)}" for k, t in model.state_dict().items()).encode())
    lora = sorted({(round(float(m.scaling), 9), float(m.dropout.p)) for m in model.modules() if isinstance(m, LoRALinear)})
    head = getattr(model, "head_cfg", None)
    return {"head": head.to_dict() if head is not None else None, "layout": names.hexdigest()[:16],
            "lora": [list(x) for x in lora]}


def _listed_files(manifest) -> dict[str, tuple[int, str]]:
    """{name: (bytes, sha256)} of a manifest as :meth:`Checkpointer.save` writes it, which lists state.pt.

    Anything else is an error (ValueError, KeyError, TypeError or AttributeError): a manifest that does not
    list state.pt would let it be loaded unchecked.
    """
    files = {name: (want["bytes"], want["sha256"]) for name, want in manifest["files"].items()}
    if STATE not in files or not all(type(n) is int and isinstance(d, str) for n, d in files.values()):
        raise ValueError(f"expected the size and SHA-256 of {STATE}")
    return files


class HeldSigterm:
    """SIGTERM during a checkpointed run, held until the optimizer step ends: the run then writes a checkpoint
    and stops as the SIGTERM would have (its previous handler: oztune's CLI exits 143), so that a preempted job
    resumes where it was told to stop rather than at its last scheduled checkpoint. A second SIGTERM stops at
    once. Held only in one process's main thread (under torchrun the ranks would have to agree on the step;
    there SIGTERM stops at once, as without checkpoints).

    Args:
        active: hold SIGTERM (a run that writes checkpoints, in one process).
    """

    def __init__(self, active: bool):
        self.requested, self.previous = False, None
        if active and threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGTERM)
            if previous not in (signal.SIG_IGN, None):  # (None: a handler not set from Python, left alone)
                self.previous = previous
                signal.signal(signal.SIGTERM, self._hold)

    def _hold(self, signum, frame) -> None:
        if self.requested:  # asked twice: now
            self._deliver(frame)
        self.requested = True

    def _deliver(self, frame=None) -> None:
        previous = self.previous
        self.release()
        if callable(previous):
            previous(signal.SIGTERM, frame)
        else:  # SIG_DFL: the process ends as SIGTERM ends it
            os.kill(os.getpid(), signal.SIGTERM)

    def stop_if_asked(self) -> None:
        """Stop now, as the held SIGTERM would have, if one came."""
        if self.requested and self.previous is not None:
            self._deliver()

    def release(self) -> None:
        """Put the previous handler back (a SIGTERM held and not yet delivered is dropped)."""
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


class Checkpointer:
    """Writes, lists, validates and loads the checkpoints of one run.

    Args:
        directory: folder holding the checkpoints (created on first save).
        every: optimizer steps between checkpoints (0: never write).
        keep: how many of the newest checkpoints to keep.
        fingerprint: settings that must match for a checkpoint to be resumed (batch size, seed, data size...).
    """

    def __init__(self, directory: str | os.PathLike, every: int, keep: int, fingerprint: dict):
        self.dir, self.every, self.keep = Path(directory), every, max(1, keep)
        self.fingerprint = fingerprint

    @classmethod
    def for_run(cls, cfg, data, model: torch.nn.Module, env: DistEnv, eval_data=None) -> "Checkpointer | None":
        """The checkpointer of a training run (None when ``cfg`` asks for no checkpoints).

        Without ``cfg.resume``, a folder holding another run's checkpoints is an error: mixing two runs
        would let a later ``--resume`` pick up the wrong one.

        Args:
            cfg: the run's TrainConfig.
            data: the training examples (EncodedData): their number and a digest of their token ids and
                labels go into the fingerprint, so another file (or --max-length) is not resumed into.
            model: the model being trained (its parameter counts, layout and pre-trained weights' digest go into
                the fingerprint).
            env: this process's place in a distributed job.
            eval_data: the evaluation examples (a digest goes into the fingerprint: the best evaluation so far
                was chosen on them), or None.
        """
        if not cfg.checkpoint_dir or not (cfg.checkpoint_every or cfg.resume):
            return None
        fingerprint = {"examples": len(data), "data": data_digest(data), "processes": env.world,
                       "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "epochs": cfg.epochs,
                       "seed": cfg.seed, "bucket": cfg.bucket, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                       "warmup_ratio": cfg.warmup_ratio, "max_grad_norm": cfg.max_grad_norm,
                       "layer_lr_decay": cfg.layer_lr_decay, "precision": cfg.precision, "ema_decay": cfg.ema_decay,
                       "freeze_embeddings": cfg.freeze_embeddings, "class_weights": cfg.class_weights,
                       "rdrop": cfg.rdrop,
                       **({"label_smoothing": cfg.label_smoothing} if cfg.label_smoothing else {}),  # (newer key)
                       "eval_every": cfg.eval_every, "patience": cfg.patience,
                       "eval_data": data_digest(eval_data) if eval_data is not None else None,
                       "parameters": sum(t.numel() for t in model.state_dict().values()),
                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                       "base_weights": base_weights_digest(model),
                       **model_fingerprint(model)}
        ckpt = cls(cfg.checkpoint_dir, cfg.checkpoint_every, cfg.keep_checkpoints, fingerprint)
        if not cfg.resume:
            ckpt.check_fresh_start()
        return ckpt

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint directory, newest first (valid or not)."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
        return sorted(found, reverse=True)

    def save(self, step: int, state: dict) -> Path:
        """Write ``state`` as the checkpoint of ``step`` atomically, then drop all but the newest ``keep``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=self.dir))
        try:
            _torch_save({**state, "step": step, "fingerprint": self.fingerprint}, tmp / STATE)
            fsync_path(tmp / STATE)
            manifest = {"step": step, "files": {STATE: {"bytes": (tmp / STATE).stat().st_size,
                                                        "sha256": sha256_file(tmp / STATE)}}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            fsync_path(tmp / MANIFEST)
            if final.exists():  # the same step written again after a resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        others = [p for _, p in self.checkpoints() if p != final]  # the one just written always stays
        for old in [_set_aside(p) for p in others[self.keep - 1:]]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def save_run(self, model, opt, sched, progress: Progress, env: DistEnv) -> None:
        """Checkpoint a run; under torchrun every rank must call it (each sends its RNG state, rank 0 writes)."""
        rngs = gather_objects(rng_state()) if env.world > 1 else [rng_state()]
        if env.is_main:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "rng": rngs, "progress": dict(vars(progress))}
            try:
                self.save(progress.step, state)
            except OSError as e:
                raise OztuneError(f"cannot write a checkpoint to {self.dir}: {e}") from None
        if env.world > 1:
            barrier()  # the others wait while rank 0 writes (not at the next step's all_reduce: no deadline here)

    def resume_run(self, model, opt, sched, env: DistEnv) -> Progress | None:
        """Load the newest valid checkpoint into model, optimizer, scheduler and RNGs; None when there is none.

        Rank 0 picks the checkpoint and tells the others, so all ranks load the same one.
        """
        path = self.newest_valid() if env.is_main else None
        if env.world > 1:
            path = broadcast_object(path)
        if path is None:
            if env.is_main:
                print(f"oztune: no checkpoint to resume from in {self.dir}; starting from the beginning",
                      file=sys.stderr, flush=True)
            return None
        state = self.load(path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][env.rank])
        progress = Progress(**state["progress"])
        if env.is_main:
            # (a checkpoint at an epoch's end resumes at the next one's first batch: "after epoch N", not N + 1)
            where = f"after epoch {progress.epoch}" if progress.batch == 0 else f"in epoch {progress.epoch + 1}"
            print(f"oztune: resuming from {path} ({where}, step {progress.step})",
                  file=sys.stderr, flush=True)
        return progress

    def problem(self, path: Path) -> str | None:
        """Why the checkpoint at ``path`` cannot be loaded, or None when its files match its manifest."""
        try:
            files = _listed_files(json.loads((path / MANIFEST).read_text()))
        except FileNotFoundError:
            return "no manifest.json (the write did not finish)"
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return f"manifest.json is unreadable ({type(e).__name__})"
        for name, (size, digest) in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size:,} bytes, the manifest says {size:,} (truncated?)"
            if sha256_file(f) != digest:
                return f"{name} does not match its SHA-256 checksum (corrupted)"
        return None

    def newest_valid(self) -> Path | None:
        """The newest checkpoint whose files match their manifest; each one skipped is reported on stderr.

        Temporary directories of writes that were cut short are removed.
        """
        for p in self.dir.iterdir() if self.dir.is_dir() else []:
            if _PARTIAL.fullmatch(p.name):
                shutil.rmtree(p, ignore_errors=True)
        for _, path in self.checkpoints():
            why = self.problem(path)
            if why is None:
                return path
            print(f"oztune: skipping checkpoint {path}: {why}", file=sys.stderr, flush=True)
        return None

    def load(self, path: Path) -> dict:
        """The state saved at ``path``; a checkpoint of a run with other settings is an OztuneError."""
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        theirs = state.get("fingerprint", {})
        diff = [f"{k} {theirs.get(k)!r} (now {v!r})" for k, v in self.fingerprint.items() if theirs.get(k) != v]
        if diff:
            raise OztuneError(f"cannot resume from {path}: it was written by a run with other settings: "
                              f"{'; '.join(diff)}. Use the same options, or another --checkpoint-dir")
        return state

    def check_fresh_start(self) -> None:
        """Starting over in a folder that holds another run's checkpoints would mix two runs: refuse."""
        found = self.checkpoints()
        if found:
            raise OztuneError(f"{self.dir} holds checkpoints of an unfinished run (newest: step {found[0][0]}): "
                              "pass --resume to continue it, or remove the folder to start over")
