"""One run on many processes: torchrun starts them, DistributedDataParallel keeps them in step.

``torchrun --nproc_per_node N -m gptlab run EXP.yaml`` starts N copies of the command with RANK,
WORLD_SIZE and LOCAL_RANK set. Each joins one process group (NCCL on CUDA, gloo on CPU), trains
the same runs in the same order, and draws the same batch of windows per step, of which it
trains on its own slice, so the global batch is the configured one whatever N is. Rank 0 alone
writes results, prints and calls the lifecycle hooks; it makes every decision (skip, resume,
stop) and the others follow it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Group:
    """This process's place in the job: rank ``rank`` of ``world`` (1 when not under torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False  #: started by torchrun (a group of one too: it still trains through DDP)

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Group:
    """The group torchrun describes in the environment (an inactive group of one without it)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Group()
    try:
        return Group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
                     active=True)
    except ValueError:
        return Group()


def join(group: Group, device: torch.device) -> torch.device:
    """Join the process group and return this rank's device (its own GPU on CUDA)."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(group.local_rank)
        device = torch.device("cuda", group.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def leave() -> None:
    """Destroy the process group once a torchrun job's runs are done (torch warns when a job exits
    without it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(obj: Any, group: Group) -> Any:
    """Rank 0's ``obj`` on every rank (its decisions: plan, resume step, stop)."""
    if not group.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, group: Group, device: torch.device) -> bool:
    """True on every rank when it is true on any (a stop seen by one rank stops all, at one step)."""
    if not group.active:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean(t: torch.Tensor, group: Group) -> torch.Tensor:
    """The mean of ``t`` over the ranks (each rank's loss is its slice's)."""
    if not group.active:
        return t
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / group.world


def barrier(group: Group) -> None:
    if group.active:
        import torch.distributed as dist

        dist.barrier()
