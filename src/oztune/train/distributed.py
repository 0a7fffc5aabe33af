"""Data-parallel training over processes started by ``torchrun`` (one or several hosts).

``torchrun`` sets RANK, WORLD_SIZE, MASTER_ADDR... in each process; :func:`init_from_env` joins the
process group from them (gloo for CPU tensors, nccl for CUDA tensors). Each rank trains on its slice of
every global batch and :func:`sync_gradients` sums the gradients over ranks once per optimizer step.

Why one flat ``all_reduce`` per step rather than ``DistributedDataParallel``: DDP synchronises inside
``backward`` only when the forward pass went through its wrapper, so a ``loss_fn`` that calls submodules
(distillation matching hidden states) or attributes (``model.loss``) would silently train unsynchronised
ranks; it also needs ``no_sync`` for gradient accumulation and cannot take a rank whose slice of the last
batch is empty. One reduction after the last micro-batch has none of these problems; what it gives up is
DDP's overlap of communication with the backward pass, which buys little on CPUs where both compete
for the same cores.

Waiting for rank 0: only rank 0 evaluates, checkpoints, measures and saves, while the other ranks wait for it
at the next collective. Those waits (:func:`broadcast_model`, :func:`broadcast_object`, :func:`barrier`) go
through a second group of the same ranks whose timeout, :data:`WAIT_FOR_RANK_0`, is longer than any such work:
under the process group's 30 minutes, rank 0's evaluation of a large set or compress measuring its variants on
CPU timed the others out and crashed the run. A rank 0 that fails still ends them at once: torchrun stops the
processes of its host, and on other hosts gloo's connections to it close. The training steps' collectives
(:func:`sync_gradients`, :func:`gather_objects`), which every rank reaches together, keep the 30 minutes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from oztune.runtime import usable_cpus

WAIT_FOR_RANK_0 = timedelta(days=7)  # the timeout of waits for rank 0's work alone (see the module's doc)
_waits = None  # the group of those waits (None: the default group, when it was joined elsewhere)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: rank and number of processes (1 and 0 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and saves."""
        return self.rank == 0


def init_from_env() -> DistEnv:
    """Join the process group described by torchrun's environment (idempotent); one process: nothing to do.

    Each rank gets ``cores // processes on this host`` torch threads.
    """
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistEnv()
    # Imported before the group exists: its functions take group.WORLD as a default argument, bound at import,
    # and the first optimizer step imports it (through torch._dynamo). Imported later, it would keep the group
    # alive past destroy_process_group, and the group's gloo threads would run on into interpreter shutdown,
    # which now and then aborts a rank at exit ("terminate called without an active exception").
    import torch.distributed.nn.functional  # noqa: F401
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    global _waits
    _waits = dist.new_group(timeout=WAIT_FOR_RANK_0)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    torch.set_num_threads(max(1, len(usable_cpus()) // local))
    return DistEnv(dist.get_rank(), dist.get_world_size())


def is_main_process() -> bool:
    """Whether this is rank 0 (or not under torchrun); read from the environment, so it holds before
    the process group is joined and after it is left (to guard printing and saving in commands)."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    """Processes in the joined process group (1 when none is joined)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Every rank waits here until all are here (the others for rank 0's work alone: no deadline)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=_waits)


def shutdown() -> None:
    """Leave the process group (no barrier: after an error on one rank a barrier could hang the others)."""
    global _waits
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # (every group: _waits too)
    _waits = None


@contextmanager
def joined() -> Iterator[DistEnv]:
    """A command's run inside torchrun's process group: joined on entry (one process: nothing to do), left on
    exit whatever happens; a run that ends well ends with a barrier, so the other ranks wait while rank 0
    evaluates and saves (without a deadline: :func:`barrier`). They wait rather than end (torchrun on one host
    would not mind): on several hosts, the torchrun of a host whose processes have all ended waits 5 minutes
    for the others, then ends, and it may be the one serving the rendezvous store that rank 0's torchrun reads.

        with distributed.joined() as env:
            run = _finetune(a, env)
    """
    env = init_from_env()
    try:
        yield env
        barrier()  # (not after an error: the other ranks may never reach it)
    finally:
        shutdown()


def broadcast_model(model: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers, so all start from the same weights."""
    for t in model.state_dict().values():
        dist.broadcast(t, 0, group=_waits)  # (the others may be waiting for rank 0's evaluation of the teacher)


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (metrics, a checkpoint path)."""
    box = [obj]
    dist.broadcast_object_list(box, src, group=_waits)  # (the others wait for rank 0's work alone)
    return box[0]


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sync_gradients(params: list[nn.Parameter], loss: float) -> float:
    """Sum fp32 gradients (and the logged loss) over ranks in one all_reduce; returns the summed loss.

    Each rank has already weighted its loss by its share of the global batch, so the sum is the gradient
    of the mean loss over the global batch. A parameter keeps grad None only if it has none on every rank.
    """
    has = [float(p.grad is not None) for p in params]
    grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
    flat = torch.cat(grads + [torch.tensor(has + [loss])])  # (sum of numel + len(params) + 1,)
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    for p, n in zip(params, flat[offset:-1].tolist()):
        if n == 0:
            p.grad = None
    return flat[-1].item()
