"""Image transforms of SPEC section 1 (ImageNet normalisation, square crop, flips, rotation; the
chest X-ray variant with RandomResizedCrop).

Evaluation runs torchvision's PIL transforms as they are. Training crops and resizes in PIL too, then flips, rotates
and normalises a float tensor in one resampling (`FlipRotateNormalise`), and for the standard transform its JPEGs may
be decoded at a reduced scale first (`decode_side`): 1.6x less CPU time per image than the PIL path, with the same
augmentation parameters (docs/speed.md, "Data loading")."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SquareCenterCrop:
    """Centre crop to a square of side min(h, w)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        side = min(image.size)
        return T.functional.center_crop(image, [side, side])


class FlipRotateNormalise:
    """What torchvision's RandomHorizontalFlip(0.5) -> [RandomVerticalFlip(0.5)] -> RandomRotation(degrees, bilinear)
    -> ToTensor -> Normalize(ImageNet) do to a PIL image, as one resampling of a float tensor.

    The parameters are drawn by the same calls in the same order from torch's global generator, so a flip and an
    angle have the same distributions (and, seeded alike, the same values). The rotation samples as PIL's does (see
    `rotate`), so the output is torchvision's to the bit without rotation, and with it up to one 8-bit level on a few
    pixels in 10,000 (float32 rounding; tested)."""

    def __init__(self, vertical_flip: bool, degrees: float) -> None:
        self.vertical_flip = vertical_flip
        self.degrees = float(degrees)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def draw(self) -> tuple[bool, bool, float]:
        """(horizontal flip, vertical flip, angle in degrees), drawn as the torchvision transforms draw them."""
        hflip = bool(torch.rand(1) < 0.5)
        vflip = bool(torch.rand(1) < 0.5) if self.vertical_flip else False
        angle = torch.empty(1).uniform_(-self.degrees, self.degrees).item() if self.degrees > 0 else 0.0
        return hflip, vflip, angle

    def __call__(self, image: Image.Image) -> torch.Tensor:
        hflip, vflip, angle = self.draw()
        return self.apply(image, hflip, vflip, angle)

    def apply(self, image: Image.Image, hflip: bool, vflip: bool, angle: float) -> torch.Tensor:
        image = image if image.mode == "RGB" else image.convert("RGB")
        planes = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        pixels = torch.empty(planes.shape).copy_(planes)  # 0..255 as float, one plane a channel
        if self.degrees > 0:
            pixels = rotate(pixels, angle, hflip, vflip)
        else:  # flips only: exact
            dims = [d for d, flip in ((2, hflip), (1, vflip)) if flip]
            pixels = pixels.flip(dims) if dims else pixels
        return pixels.div_(255).sub_(self.mean).div_(self.std)  # ToTensor's scaling, then Normalize, in place


def rotate(pixels: torch.Tensor, angle: float, hflip: bool = False, vflip: bool = False) -> torch.Tensor:
    """(3, H, W) float pixels flipped as asked, then turned `angle` degrees counter-clockwise about the image centre,
    as PIL's Image.rotate(angle, BILINEAR) turns 8-bit ones: bilinear sampling of the four nearest pixels (edge pixels
    repeated), 0 where the source point lies outside the image, rounded down to whole levels as PIL stores them."""
    _, height, width = pixels.shape
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    # the source of the output pixel centred at (u, v) pixels from the image centre (x right, y down): (u, v) turned
    # back by the angle, then mirrored, in grid_sample's units (the image spans [-1, 1] on both axes)
    sx, sy = (-2.0 if hflip else 2.0) / width, (-2.0 if vflip else 2.0) / height
    u = torch.arange(width, dtype=pixels.dtype) + (0.5 - width / 2)
    v = (torch.arange(height, dtype=pixels.dtype) + (0.5 - height / 2))[:, None]
    grid = torch.empty(height, width, 2, dtype=pixels.dtype)
    torch.add((sx * cos) * u, (-sx * sin) * v, out=grid[..., 0])
    torch.add((sy * sin) * u, (sy * cos) * v, out=grid[..., 1])
    out = F.grid_sample(pixels[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0]
    inside = grid.abs_().amax(dim=-1) < 1
    # float32 weights may land a hair below a whole level that PIL's double arithmetic reaches exactly (a flat region,
    # a pixel centre): rounded down from there it would be one level darker
    return out.add_(2**-14).floor_().mul_(inside)


def decode_side(cfg: dict, train: bool) -> int | None:
    """The shortest side a training JPEG may be decoded at (PIL's draft mode: the decoder scales by 1/2, 1/4 or 1/8
    while both sides stay at least this), or None for full size. Only the standard training transform: its square crop
    of side min(h, w) is resized to data.image_size anyway. Evaluation decodes in full (its inputs stay as they were),
    and the chest transform's RandomResizedCrop may enlarge a small part of the image."""
    data = cfg["data"]
    return data["image_size"] if train and data["transform"] == "standard" else None


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
        return T.Compose([*steps, FlipRotateNormalise(data["vertical_flip"], data["rotation_degrees"])])
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)
