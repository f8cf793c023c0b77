"""Is what a run would save finite? The model's weights and buffers and the optimizer's state.

Gradients are checked at every step (``capsexp.engine.step``); what they cannot see is checked here,
at every validation and before every checkpoint: BatchNorm's running statistics, which a
diverging run can drive to infinity while every gradient stays finite, and weights or optimizer
moments that overflowed in an update. A checkpoint with a non-finite value is never written.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from capsexp.runtime import Runtime, all_reduce


def _named_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, Tensor]]:
    yield from model.state_dict(keep_vars=False).items()
    names = {id(p): n for n, p in model.named_parameters()}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                yield f"optimizer {key} of {names.get(id(param), 'a loss parameter')}", value


def first_nonfinite(model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime) -> str | None:
    """The name of the first tensor of model or optimizer state with a NaN or an infinity, or None.

    One batched max-|x| per device (it cannot overflow: only a non-finite element makes it
    non-finite) and one host read. Under DDP the flags are all-reduced (MAX), so every rank
    takes the same decision.
    """
    named = [(n, t.detach()) for n, t in _named_state(model, optimizer) if t.is_floating_point() and t.numel()]
    flags = torch.zeros(len(named), device=rt.device)
    for device in {t.device for _, t in named}:
        index = [i for i, (_, t) in enumerate(named) if t.device == device]
        norms = torch._foreach_norm([named[i][1] for i in index], float("inf"))
        bad = (~torch.isfinite(torch.stack([n.float() for n in norms]))).float()
        flags[torch.tensor(index, device=rt.device)] = bad.to(rt.device)
    if rt.distributed:
        all_reduce(flags, rt, "max")
    found = flags.tolist()  # note: the one CPU-GPU sync of this check
    return next((name for (name, _), bad in zip(named, found) if bad), None)
