"""DiffMIC-v2 (SPEC sections 1-8):

system.py     the LightningModule DiffMICv2: the paper's path top-down (training step, sampling, evaluation)
model.py      the denoiser ConditionalModel: EfficientSAM ViT, ROI patch encoder, guided prior map
pipeline.py   heterologous diffusion on the K x K label grid and its DDIM sampler"""
