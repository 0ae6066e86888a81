"""A read-only window on the samplers' steps, for explanations (explain.py): inside `record_steps(on_step)`, every
step of pipeline.ddim_sample and diffmic_v1.card.card_sample hands what it computed to on_step. The methods between
a caller and the sampler (a model's `sample`, `evaluate_batch`) need not pass it along, and the samplers' numbers do
not change: on_step only reads them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

_recorders: list[Callable] = []  # innermost last


@contextlib.contextmanager
def record_steps(on_step: Callable) -> Iterator[None]:
    """Inside, the samplers call `on_step` at every step (its arguments: pipeline.ddim_sample's and
    diffmic_v1.card.card_sample's)."""
    _recorders.append(on_step)
    try:
        yield
    finally:
        _recorders.pop()


def active_recorder() -> Callable | None:
    """The innermost `record_steps` callback, None outside them."""
    return _recorders[-1] if _recorders else None
