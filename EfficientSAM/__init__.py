"""EfficientSAM ViT image encoder (trunk only, no neck) used as DiffMIC-v2's backbone, and the loader of
the official checkpoints."""

from .image_encoder import ENCODERS, ImageEncoderViT
from .weights import load_efficientsam_encoder

__all__ = ["ENCODERS", "ImageEncoderViT", "load_efficientsam_encoder"]
