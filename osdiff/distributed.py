"""A command split across processes: `torchrun --nproc_per_node N -m osdiff.cli ...` (CPUs) or
`accelerate launch --num_processes N -m osdiff.cli ...` (GPUs) start N copies, each told its
RANK and WORLD_SIZE (and LOCAL_RANK) in the environment. Each takes its `shard` of the work,
rank 0 gathers the results and alone writes and prints.

Without those variables (or WORLD_SIZE=1) everything here is a no-op and torch.distributed is
never touched. With them, `session()` joins the process group (gloo; gloo for objects and
NCCL for tensors when CUDA is present) and leaves it at the end. An error on one rank is
`agree`d on by all of them, so the job stops together with one message (`JobFailed`), never
with ranks waiting on each other.
"""
from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from .errors import OSDiffError

T = TypeVar("T")
TIMEOUT = timedelta(minutes=30)  # the longest one rank waits for the others at a collective


class JobFailed(OSDiffError):
    """An error on some rank, raised on every rank; rank 0 reports it, the others stay quiet."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise OSDiffError(f"environment variable {name}={value!r} is not a whole number") from None


def world_size() -> int:
    """The number of processes in the job (WORLD_SIZE; 1 when not launched split)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's place in the job, 0 .. world_size() - 1 (RANK; 0 when not split)."""
    return _env_int("RANK", 0) if world_size() > 1 else 0


def local_rank() -> int:
    """This process's place on its machine (LOCAL_RANK), e.g. its GPU."""
    return _env_int("LOCAL_RANK", rank()) if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this process writes and prints (rank 0)."""
    return rank() == 0


def shard(items: Sequence[T], of_rank: int | None = None, size: int | None = None) -> list[T]:
    """Rank `of_rank`'s share (default: this rank's) of `items`: every `size`-th item of the
    sorted list, starting at the rank's own place; the shares of all ranks partition `items`."""
    of_rank = rank() if of_rank is None else of_rank
    size = world_size() if size is None else size
    if not 0 <= of_rank < size:
        raise ValueError(f"rank {of_rank} is outside a job of {size}")
    return sorted(items)[of_rank::size]


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    """Whether this process is in a process group of several ranks."""
    if world_size() == 1:
        return False
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def session(timeout: timedelta = TIMEOUT) -> Iterator[None]:
    """Join the job's process group for the block (nothing when not split) and leave it after."""
    if world_size() == 1 or active():
        yield
        return
    import torch

    dist = _dist()
    if not dist.is_available():
        raise OSDiffError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise OSDiffError(f"WORLD_SIZE is set but {name} is not: start split jobs with torchrun or accelerate launch")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"  # object collectives go over gloo
    dist.init_process_group(backend, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank is here."""
    if active():
        _dist().barrier()


def gather(obj: T) -> list[T] | None:
    """Every rank's `obj` (picklable), in rank order, on rank 0; None on the others."""
    if not active():
        return [obj]
    dist = _dist()
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's `obj` (picklable), on every rank."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def agree(error: str | None) -> None:
    """Raise JobFailed on every rank if any rank has an `error` (the lowest rank's message);
    a collective, so every rank must call it at the same point."""
    if not active():
        if error is not None:
            raise JobFailed(error)
        return
    errors: list[str | None] = [None] * world_size()
    _dist().all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise JobFailed(first)


def describe(exc: BaseException) -> str:
    """One line for an error on this rank (naming the rank unless it is rank 0); with OSDIFF_DEBUG
    set, the traceback goes to stderr first."""
    if os.environ.get("OSDIFF_DEBUG"):
        traceback.print_exception(exc)
    text = str(exc) if isinstance(exc, OSDiffError) else f"internal error: {exc.__class__.__name__}: {exc}"
    return f"rank {rank()}: {text}" if rank() > 0 and not isinstance(exc, JobFailed) else text


@contextlib.contextmanager
def together() -> Iterator[None]:
    """A block every rank runs: an exception in it on any rank becomes JobFailed on all of them
    when they leave it (a collective at the end). Not split: exceptions pass unchanged."""
    if not active():
        yield
        return
    error = None
    try:
        yield
    except Exception as exc:  # any rank's failure, bug or bad input, stops every rank
        error = describe(exc)
    agree(error)
