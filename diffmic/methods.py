"""The methods the command line trains and evaluates, by the config's model.method; beside them, the baselines the
benchmarks compare them with."""

from __future__ import annotations

from diffmic.baselines import ResNetBaseline
from diffmic.evaluation.evaluator import EvaluatedSystem
from diffmic.guided import GuidedSystem
from diffmic.v1 import DiffMICv1
from diffmic.v2.system import DiffMICv2

METHODS: dict[str, type[GuidedSystem]] = {"diffmic_v2": DiffMICv2, "diffmic_v1": DiffMICv1}
# classifiers without a DCG, trained with cross-entropy on the same data pipeline (benchmarks/)
BASELINES: dict[str, type[EvaluatedSystem]] = {"resnet18": ResNetBaseline}


def build_system(cfg: dict) -> GuidedSystem:
    """The LightningModule of the config's method, with random weights."""
    return METHODS[cfg["model"]["method"]](cfg)
