"""Loader worker processes: how many (`data.num_workers: auto`), and the per-image seeds that make
training augmentations independent of the workers (their number, their persistence, a resume)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

# auto never starts more workers than this per process: 8 workers decode and augment about 4,000 training images a
# second at 224 px from 600 x 450 JPEGs even on the shared development CPU (docs/speed.md, "Data loading"), more than
# one H100 trains; more would only hold memory and lengthen the start
MAX_AUTO_WORKERS = 8


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: taskset, cgroups' cpusets, SLURM's allocation), or every CPU
    of the machine where the system does not tell."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_num_workers(setting: int | str, processes_per_node: int) -> int:
    """data.num_workers as a number: a number as it is; auto, the CPUs this process may use shared among the
    processes of its machine, less one for the process itself (its training step), at most MAX_AUTO_WORKERS. A
    process with a single CPU of its own loads in the main process (0): a worker would only take turns with it."""
    if setting != "auto":
        return int(setting)
    share = usable_cpus() // max(processes_per_node, 1)
    return max(0, min(MAX_AUTO_WORKERS, share - 1))


class SeededIndices(Sampler):
    """The (index, seed) pairs of an epoch: the indices of `sampler`, each with a seed for its augmentations. The seeds
    are drawn from torch's global generator in the main process when the epoch starts, as the shuffle's own seed is;
    the checkpoint holds that generator's state, so a resumed fit repeats them, and any number of workers, persistent
    or not, augments every image alike."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(self.sampler)
        seeds = torch.randint(0, 2**62, (len(order),)).tolist()
        return iter(zip(order, seeds, strict=True))

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Passed on to a DistributedSampler (Lightning calls it on the loader's sampler every epoch)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class SeededAugmentation(Dataset):
    """`dataset[index]` with torch's generator seeded by the pair's seed for the transforms' draws (in the main
    process the generator's own state is put back afterwards)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]
