"""An exponential moving average of a model's weights (DiffMIC v1's `ema_rate`)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """`average`: a copy of the model whose trainable parameters follow
    average <- decay * average + (1 - decay) * parameter after every `update`, as the authors' ema.py; its buffers
    (BatchNorm statistics) are the model's own, copied at each update, as their `ema_copy` evaluates. A submodule,
    so it is saved in checkpoints and resumed with them."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        assert 0.0 <= decay < 1.0, f"EMA decay {decay} must be in [0, 1)"
        self.decay = decay
        self.average = copy.deepcopy(model).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> EMA:
        return super().train(False)  # the average is only ever evaluated

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = [(a, p) for a, p in zip(self.average.parameters(), model.parameters(), strict=True) if p.requires_grad]
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [p.detach() for _, p in pairs], 1.0 - self.decay)
        for mine, theirs in zip(self.average.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
