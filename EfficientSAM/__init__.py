"""EfficientSAM ViT image encoder (trunk only, no neck) used as DiffMIC-v2's backbone."""

from .image_encoder import ENCODERS, ImageEncoderViT, build_image_encoder
from .weights import load_efficientsam_encoder

__all__ = ["ENCODERS", "ImageEncoderViT", "build_image_encoder", "load_efficientsam_encoder"]
