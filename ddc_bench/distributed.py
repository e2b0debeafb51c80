"""Multi-process data parallelism: torch.distributed under ``torchrun``, nothing of our own.

``hardware=ddp`` selects it; the processes come from ``torchrun`` (which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables)::

    torchrun --standalone --nproc_per_node=4 -m ddc_bench.cli hardware=ddp task=gpt_lm ...

Each rank builds the same model from the same seed, wraps it in
``DistributedDataParallel`` (NCCL on GPUs, gloo on CPU) and trains on its own shard of
every global batch (the task streams give each rank a disjoint, contiguous slice). Rank 0
alone evaluates, writes the run folder and logs; the training loss is averaged over ranks.
Every collective has the ``hardware.timeout_s`` timeout, so a dead rank ends the job with
a one-line :class:`DistributedError` instead of a hang.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class DistributedError(RuntimeError):
    """A DDP set-up or communication failure (one-line message)."""


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` (1 and 0 without DDP)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes results and logs (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether several processes train together."""
        return self.size > 1


def world_from_env(ddp: bool) -> World:
    """The :class:`World` torchrun describes in the environment (a single process without
    ``hardware.ddp``). ``hardware.ddp`` outside torchrun is a one-process job."""
    if not ddp:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # torchrun, but not a DDP profile
            raise DistributedError(
                f"started as {os.environ['WORLD_SIZE']} processes (torchrun) but the hardware "
                f"profile is not DDP: every process would train the whole run; use hardware=ddp")
        return World()
    try:
        return World(rank=int(os.environ.get("RANK", 0)), size=int(os.environ.get("WORLD_SIZE", 1)),
                     local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as err:
        raise DistributedError(f"bad torchrun environment: {err}") from None


def init(world: World, device: torch.device, timeout_s: float) -> str | None:
    """Join the process group (NCCL for CUDA, gloo for CPU); return the backend or ``None``."""
    if not world.active:
        return None
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        except Exception as err:  # noqa: BLE001 - rendezvous failures have many types
            raise DistributedError(f"rank {world.rank}: could not join the DDP job: "
                                   f"{_first_line(err)}") from None
    return backend


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


#: Phrases of the errors gloo and NCCL raise (as plain ``RuntimeError`` from DDP's
#: gradient all-reduce) when a peer dies or a collective times out.
_COMM_MARKERS = ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out", "Timed out",
                 "ProcessGroup")


def is_communication_error(err: BaseException) -> bool:
    """Whether ``err`` is a failed collective (a dead, hung or unreachable rank)."""
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and any(m in str(err) for m in _COMM_MARKERS))


def lost_contact(world: World, err: BaseException) -> DistributedError:
    """The one-line error for a failed collective on this rank."""
    return DistributedError(
        f"rank {world.rank}: lost contact with the other ranks ({_first_line(err)}); "
        f"a rank died or hung, see its output above")


def guard(world: World, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, turning a communication failure into a one-line :class:`DistributedError`."""
    try:
        return fn(*args)
    except RuntimeError as err:
        if is_communication_error(err):
            raise lost_contact(world, err) from None
        raise


def mean(world: World, value: float, device: torch.device) -> float:
    """The mean of ``value`` over ranks (``value`` itself without DDP)."""
    if not world.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    guard(world, dist.all_reduce, t)
    return float(t.item()) / world.size


def any_rank(world: World, flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (so that every rank stops at the same step)."""
    if not world.active:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    guard(world, dist.all_reduce, t, dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast(world: World, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable Python object)."""
    if not world.active:
        return obj
    box = [obj]
    guard(world, dist.broadcast_object_list, box, 0)
    return box[0]


def barrier(world: World) -> None:
    """Wait for every rank."""
    if world.active:
        guard(world, dist.barrier)


def replicas_identical(world: World, model: nn.Module) -> bool | None:
    """Whether every rank holds bitwise the same parameters and buffers (``None`` without
    DDP): each rank's tensors are gathered as raw bytes and compared with rank 0's."""
    if not world.active:
        return None
    tensors = [t.detach() for t in model.state_dict().values()]
    local = torch.cat([t.reshape(-1).contiguous().view(torch.uint8).cpu() for t in tensors
                       if t.numel()])
    gathered = broadcast(world, local)  # rank 0's bytes on every rank
    same = torch.tensor([1 if torch.equal(gathered, local) else 0], dtype=torch.int32,
                        device=next(model.parameters()).device)
    guard(world, dist.all_reduce, same, dist.ReduceOp.MIN)
    return bool(same.item())
