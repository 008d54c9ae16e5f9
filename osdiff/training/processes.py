"""What keeps several training processes in step (torch.distributed, set up by accelerate):
gradients averaged, weights broadcast and compared, decisions shared."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

BUCKET = 1 << 25  # gradient elements averaged per collective call


def average_gradients(params: list[nn.Parameter], device: torch.device) -> None:
    """Average the gradients of `params` over the processes; a parameter without a gradient on
    every process keeps none, one with a gradient somewhere counts zeros where it has none."""
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has)
    params = [p for p, h in zip(params, has.tolist()) if h > 0]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = dist.get_world_size()
    bucket: list[nn.Parameter] = []
    for i, p in enumerate(params):
        bucket.append(p)
        if i == len(params) - 1 or sum(q.numel() for q in bucket) + params[i + 1].numel() > BUCKET:
            flat = torch.cat([q.grad.reshape(-1).float() for q in bucket])
            dist.all_reduce(flat)
            flat /= world
            for q, g in zip(bucket, flat.split([q.numel() for q in bucket])):
                q.grad.copy_(g.view_as(q.grad))
            bucket = []


def broadcast_module(module: nn.Module) -> None:
    """Process 0's parameters and buffers, on every process."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def any_of_processes(flags: tuple[bool, ...], device: torch.device) -> tuple[bool, ...]:
    """Each flag true on any process, on every process."""
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def gather_floats(value: float, device: torch.device) -> list[float]:
    """`value` of every process, by rank."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(v) for v in out]


@torch.no_grad()
def weights_checksum(modules) -> float:
    """A position-weighted sum of every parameter (equal on processes with equal weights)."""
    total = torch.zeros((), dtype=torch.float64)
    k = 0
    for module in modules:
        for p in module.parameters():
            k += 1
            total += (p.detach().double().sum() * k + p.detach().double().square().sum()).cpu()
    return float(total)
