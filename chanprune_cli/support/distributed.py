"""Running one command on several processes: `torchrun --nproc-per-node N -m chanprune_cli ...`.

torchrun (``python -m torch.distributed.run``) starts N copies of the command and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (multi-node: its rendezvous
options, same variables). `init_distributed` turns them into a process group: NCCL when the
command runs on CUDA (one GPU per local rank), gloo on CPUs. Outside torchrun everything here is a
no-op for a single process (rank 0 of 1), so callers never branch on "distributed or not".

Conventions every distributed command follows:

* only rank 0 writes files and prints (`env.is_main`); other ranks stay silent;
* batch sizes given on the command line are *global*: each rank gets `batch / world` samples
  (`local_batch`), so a run gives the same result on 1 or N processes for the same global batch;
* score accumulators are sums (`all_reduce_sum_`, `all_reduce_sums`) reduced before they are
  turned into scores, so `score` and the training-time schedules see the statistics of all ranks.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UserError

__all__ = [
    "DistEnv",
    "ShardedBatches",
    "all_gather_objects",
    "all_reduce_sum_",
    "all_reduce_sums",
    "any_rank",
    "barrier",
    "broadcast_object",
    "current",
    "init_distributed",
    "launched_by_torchrun",
    "local_batch",
    "reduce_scores",
    "shutdown",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank `rank` of `world_size` (1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" | "nccl" | None (single process)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_SINGLE = DistEnv()
_current: DistEnv = _SINGLE


def current() -> DistEnv:
    """The environment set by the last `init_distributed` (single process before)."""
    return _current


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def launched_by_torchrun() -> bool:
    """True when torchrun started this process as one of several (WORLD_SIZE > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def init_distributed(device: torch.device, *, timeout_s: float = 1800.0) -> tuple[DistEnv, torch.device]:
    """Join the process group torchrun prepared; returns the environment and this rank's device.

    `device` is the resolved `--device`: CUDA → NCCL, one GPU per local rank (`cuda:LOCAL_RANK`);
    CPU → gloo. Without torchrun (WORLD_SIZE unset or 1) nothing happens.
    """
    global _current
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        _current = _SINGLE
        return _SINGLE, device
    local_rank = _env_int("LOCAL_RANK", 0)
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run without torchrun")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(f"torchrun started {local_rank + 1}+ processes on a node with {count} GPU(s); "
                            f"use --nproc-per-node {count} or fewer")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the communicator now: no guessing, no hangs
        try:
            dist.init_process_group(**kwargs)
        except TypeError:  # older torch without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(**kwargs)
    _current = DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, backend=backend)
    return _current, device


def shutdown() -> None:
    """Leave the process group (safe to call when none was joined)."""
    global _current
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  # pragma: no cover  (best effort at exit)
            pass
    _current = _SINGLE


@contextmanager
def distributed_session(device: torch.device) -> Iterator[tuple[DistEnv, torch.device]]:
    """`init_distributed` for the length of a command; leaves the group on exit (unless the
    caller had already joined one, e.g. a script running several commands in one launch)."""
    owned = not (dist.is_available() and dist.is_initialized())
    env, device = init_distributed(device)
    try:
        yield env, device
    finally:
        if env.distributed and owned:
            shutdown()


class ShardedBatches:
    """Batch i of `loader` goes to rank i mod W (calibration passes split over ranks)."""

    def __init__(self, loader: Any, env: DistEnv | None = None) -> None:
        self.loader = loader
        self.env = env or _current
        self.batches = 0  # batches this rank has seen

    def __len__(self) -> int:
        n = len(self.loader)
        return len(range(self.env.rank, n, self.env.world_size))

    def __iter__(self) -> Iterator[Any]:
        self.batches = 0
        for i, batch in enumerate(self.loader):
            if i % self.env.world_size == self.env.rank:
                self.batches += 1
                yield batch


def reduce_scores(scores: Mapping[Any, torch.Tensor], weight: float, env: DistEnv | None = None) -> dict[Any, torch.Tensor]:
    """The `weight`-weighted mean over ranks of per-rank scores (weight: batches each rank scored).

    Exact for criteria whose score is a mean over batches (taylor, hrank, sensitivity) and for
    weight-only criteria; the mean of per-rank estimates for the others.
    """
    env = env or _current
    if not env.distributed:
        return dict(scores)
    sums = {k: v.detach().double().cpu() * weight for k, v in scores.items()}
    all_reduce_sums(sums, env)
    total = torch.tensor([float(weight)], dtype=torch.float64)
    all_reduce_sum_(total, env)
    if total.item() <= 0:
        raise UserError("no calibration batches on any process: use fewer processes or more --calib-batches")
    return {k: v / total.item() for k, v in sums.items()}


def local_batch(global_batch: int, env: DistEnv | None = None) -> int:
    """This rank's share of a global batch; UserError unless it divides evenly."""
    env = env or _current
    if global_batch % env.world_size:
        raise UserError(f"--batch-size {global_batch} is the global batch and must be divisible by the "
                        f"number of processes ({env.world_size})")
    return global_batch // env.world_size


def barrier(env: DistEnv | None = None) -> None:
    env = env or _current
    if env.distributed:
        dist.barrier()


def _reduce_device(t: torch.Tensor, env: DistEnv) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors (and CUDA ones via a copy).
    if env.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensor: torch.Tensor, env: DistEnv | None = None) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place (returns it). A no-op for one process."""
    env = env or _current
    if not env.distributed:
        return tensor
    dev = _reduce_device(tensor, env)
    if tensor.device == dev:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    staged = tensor.to(dev)
    dist.all_reduce(staged, op=dist.ReduceOp.SUM)
    tensor.copy_(staged.to(tensor.device))
    return tensor


def all_reduce_sums(values: Mapping[Any, torch.Tensor], env: DistEnv | None = None) -> None:
    """Sum every tensor of `values` over all ranks, in place, with one collective.

    The score accumulators (sums of losses, counts, squared gradients ...) of a criterion or a
    schedule go through here before they become scores, so every rank sees the totals.
    """
    env = env or _current
    if not env.distributed or not values:
        return
    keys = list(values)
    flat = torch.cat([values[k].detach().reshape(-1).to(torch.float64).cpu() for k in keys])
    all_reduce_sum_(flat, env)
    offset = 0
    for k in keys:
        t = values[k]
        n = t.numel()
        t.copy_(flat[offset:offset + n].reshape(t.shape).to(t.dtype))
        offset += n


def any_rank(flag: bool, env: DistEnv | None = None) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a stop request)."""
    env = env or _current
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    all_reduce_sum_(t, env)
    return bool(t.item() > 0)


def broadcast_object(obj: Any, env: DistEnv | None = None, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    env = env or _current
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any, env: DistEnv | None = None) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list for one process)."""
    env = env or _current
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
