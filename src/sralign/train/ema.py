"""An exponential moving average of a policy's *trainable* parameters, and rolling out with it.

Only what trains is averaged: for a LoRA backend that is the adapters (megabytes), never a
second copy of the base model. ``swapped_in()`` puts the averaged values into the live
parameters for the duration of a ``with`` block (rollouts under ``torch.no_grad``) and
restores the trained values after, so any policy can roll out from its EMA.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


def trainable_named_parameters(model: nn.Module, trainable: Iterator[nn.Parameter]) -> dict[str, nn.Parameter]:
    """{name in ``model``: parameter} for the parameters in ``trainable`` (matched by identity)."""
    ids = {id(p) for p in trainable}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


class ParamEMA:
    """EMA θ̄ ← μ·θ̄ + (1−μ)·θ over ``params`` ({name: parameter}); ``state`` is {name: tensor}."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.state: dict[str, Tensor] = {k: p.detach().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for k, p in self.params.items():
            self.state[k].mul_(decay).add_(p.detach(), alpha=1 - decay)

    @contextmanager
    def swapped_in(self):
        """Inside: the parameters hold the EMA values; after: the trained values again (exactly)."""
        with torch.no_grad():
            trained = {k: p.detach().clone() for k, p in self.params.items()}
            for k, p in self.params.items():
                p.copy_(self.state[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(trained[k])
