"""The methods the command line trains and evaluates, by the config's model.method."""

from __future__ import annotations

from diffmic_v1 import DiffMICv1
from diffmic_v2 import DiffMICv2
from guided import GuidedSystem

METHODS: dict[str, type[GuidedSystem]] = {"diffmic_v2": DiffMICv2, "diffmic_v1": DiffMICv1}


def build_system(cfg: dict) -> GuidedSystem:
    """The LightningModule of the config's method, with random weights."""
    return METHODS[cfg["model"]["method"]](cfg)
