"""The methods the command line trains and evaluates, by the config's model.method."""

from __future__ import annotations

from diffmic.guided import GuidedSystem
from diffmic.v1 import DiffMICv1
from diffmic.v2.system import DiffMICv2

METHODS: dict[str, type[GuidedSystem]] = {"diffmic_v2": DiffMICv2, "diffmic_v1": DiffMICv1}


def build_system(cfg: dict) -> GuidedSystem:
    """The LightningModule of the config's method, with random weights."""
    return METHODS[cfg["model"]["method"]](cfg)
