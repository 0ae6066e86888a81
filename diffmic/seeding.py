"""Random numbers that do not depend on how a run is spread or interrupted.

- Training: each process of a multi-process run draws its own noise and timesteps from `rank_seed(seed, rank)`.
- Evaluation: the DDIM start noise of an image depends on `seed` and the image's index only (`start_noise`), not on
  its batch, its process or the number of processes.
- Resume: `rng_state()` captures what a process draws from (torch, CUDA, numpy, Python) as plain tensors and
  numbers, so that a checkpoint stays loadable with `weights_only=True`, and `set_rng_state` puts it back.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def rank_seed(seed: int, rank: int) -> int:
    """An independent 32-bit seed for process `rank` of a run seeded with `seed` (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(1)[0])


def start_noise(seed: int, index: torch.Tensor, shape: Sequence[int], normal: bool = False) -> torch.Tensor:
    """Uniform [0, 1) noise (`normal`: standard normal) of `shape` for each image index: (B,) -> (B, *shape), row b
    from a generator seeded by (seed, index[b]) alone. A few generators per batch cost nothing next to the sampling
    steps they feed."""
    draw = torch.randn if normal else torch.rand
    rows = []
    for i in index.tolist():
        generator = torch.Generator().manual_seed(rank_seed(seed, 1 << 20 | int(i)))  # apart from the rank seeds
        rows.append(draw(*shape, generator=generator))
    return torch.stack(rows)


def rng_state() -> dict[str, Any]:
    """The random states this process draws from, as tensors and plain numbers."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        # per device, for the devices this machine shows: a resume where fewer GPUs are visible than at the save
        # (another machine, CUDA_VISIBLE_DEVICES) restores those it has; a process draws on its own device only
        for device, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def reseed(seed: int) -> None:
    """Seed torch, numpy and Python's random, without touching PL_GLOBAL_SEED (the data samplers of all processes
    must keep one seed to split the data consistently)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
