"""Shared fixtures: tiny DCG / denoiser builders (64 x 64 images, CAM 2 x 2, K = 3, F = 16, ViT-T)."""

import pytest
import torch

from diffmic.v2.model import ConditionalModel
from pretraining.dcg import DCG

# One intra-op thread: on a small shared CPU box, oversubscribed threads make the tiny
# ResNet / ViT forwards 10-20x slower than a single thread.
torch.set_num_threads(1)

NUM_CLASSES, IMAGE_SIZE, GRID, FEATURES = 3, 64, 3, 16


@pytest.fixture
def make_dcg():
    def build(seed: int = 0, image_size: int = IMAGE_SIZE, num_rois: int = GRID, backbone: str = "resnet18") -> DCG:
        torch.manual_seed(seed)
        return DCG(num_classes=NUM_CLASSES, image_size=image_size, num_rois=num_rois, roi_size=32, backbone=backbone)

    return build


@pytest.fixture
def make_denoiser():
    def build(seed: int = 1, grid_size: int = GRID) -> ConditionalModel:
        torch.manual_seed(seed)
        return ConditionalModel(
            num_classes=NUM_CLASSES,
            grid_size=grid_size,
            feature_dim=FEATURES,
            num_timesteps=1000,
            image_encoder="vit_t",
            patch_encoder="resnet18",
        )

    return build
