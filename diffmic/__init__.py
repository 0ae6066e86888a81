"""DiffMIC-v2 (Yang et al., IEEE TMI 2025) and DiffMIC (v1, MICCAI 2023): medical image classification by
denoising label vectors under a DCG's global and local priors.

    api.py        the commands (fit, validate, test, predict) as a Python API; results.py: the files they write
    v2/           DiffMIC-v2: the LightningModule (system.py), its denoiser (model.py), the grid diffusion
                  and DDIM sampler (pipeline.py)
    v1/           DiffMIC (v1): system, denoiser, CARD's diffusion, EMA
    guided.py     what both methods share around their denoisers (the DCG, its file); methods.py: the registry
    evaluation/   whole-split evaluation, metrics, calibration and uncertainty, their figures
    explain/      what guided a prediction, its figure, where explanations go
    config.py     the configuration and its checks; utils.py: optimiser, Trainer, logging
    checkpoints.py, checkpoint_io.py, durable.py, faults.py, seeding.py, precision.py: files, faults, random
                  numbers and float32 policy

The repository's design folders beside it: `dataloader/` (data), `pretraining/` (the DCG and encoder
pre-trainers), `EfficientSAM/` (the image encoder). docs/layout.md maps the authors' files to these."""

__version__ = "0.3.0"
