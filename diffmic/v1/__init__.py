"""DiffMIC (v1, Yang et al., MICCAI 2023; SPEC 9) beside DiffMIC-v2, selected by model.method=diffmic_v1:

    system.py   the LightningModule DiffMICv1: dual-guidance training, ancestral sampling, v1's optimiser
    card.py     CARD's diffusion of the label vector: forward process, posterior, sampler, the MMD
    model.py    its denoiser DenoiserV1
    ema.py      the EMA of the denoiser's weights

It shares the command line, the data, the DCG and its file, evaluation and checkpoints with DiffMIC-v2."""

from diffmic.v1.system import DiffMICv1

__all__ = ["DiffMICv1"]
