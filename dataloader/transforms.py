"""Image transforms of SPEC section 1 (ImageNet normalisation, square crop, flips, rotation; the
chest X-ray variant with RandomResizedCrop)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SquareCenterCrop:
    """Centre crop to a square of side min(h, w)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        side = min(image.size)
        return T.functional.center_crop(image, [side, side])


def build_transform(cfg: dict, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """standard, train: square crop -> resize -> h-flip -> [v-flip] -> rotation -> tensor -> normalise;
    eval: square crop -> resize -> tensor -> normalise.
    chest, train: RandomResizedCrop -> h-flip -> rotation -> tensor -> normalise; eval: resize."""
    data = cfg["data"]
    size = data["image_size"]
    if data["transform"] == "chest":
        steps: list = [T.RandomResizedCrop(size)] if train else [T.Resize((size, size))]
    else:
        steps = [SquareCenterCrop(), T.Resize((size, size))]
    if train:
        steps.append(T.RandomHorizontalFlip(0.5))
        if data["vertical_flip"]:
            steps.append(T.RandomVerticalFlip(0.5))
        if data["rotation_degrees"] > 0:
            steps.append(T.RandomRotation(data["rotation_degrees"], interpolation=T.InterpolationMode.BILINEAR))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)
