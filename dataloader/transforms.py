"""Image transforms of SPEC section 1 (ImageNet normalisation, square crop, flips, rotation; the
chest X-ray variant with RandomResizedCrop), in two halves.

The CPU half (`build_transform`, run by the loader workers) keeps images in 8 bits: a (3, H, W) uint8 tensor per
image. Evaluation runs torchvision's PIL steps as they are, then PILToTensor. Training crops and resizes in PIL too
(its JPEGs decoded at a reduced scale first for the standard transform, `decode_side`), draws the flips and the angle
as torchvision's transforms draw them, flips in 8 bits and, with a rotation, hands the rotation's sampling
coefficients to the device half with the image.

The device half (`ModelInput`, on the batch once it is on the model's device: DiffMICDataModule's
on_after_batch_transfer, and every loop that builds batches itself) turns the rotation, which samples between pixels
and so needs floats, for the whole batch at once, and normalises: the float32 tensors the models read, computed
with the arithmetic and in the order of before, so bit for bit the tensors of before on the CPU. A uint8 batch is
a quarter of a float one to collate, share between processes and copy to the device (docs/speed.md, "Data
loading")."""

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
ROTATION = "rotation"  # the batch key of the rotation's sampling coefficients, (B, 4) float32


class SquareCenterCrop:
    """Centre crop to a square of side min(h, w)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        side = min(image.size)
        return T.functional.center_crop(image, [side, side])


def as_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor (a view of its pixels; collation makes it contiguous)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


class FlipRotate:
    """What torchvision's RandomHorizontalFlip(0.5) -> [RandomVerticalFlip(0.5)] -> RandomRotation(degrees, bilinear)
    do to a PIL image, split between the halves: the parameters are drawn here, by the same calls in the same order
    from torch's global generator, so a flip and an angle have the same distributions (and, seeded alike, the same
    values). Without rotation the flips are applied here, exactly, and the result is the (3, H, W) uint8 image.
    With it the result is {"image": the uint8 image as it came, "rotation": the (4,) float32 coefficients of
    `rotation_coefficients`}, and `ModelInput` samples the flipped, turned image on the device (`rotate`): PIL's
    rotation to the bit but for one 8-bit level on a few pixels in 10,000 (float32 rounding; tested)."""

    def __init__(self, vertical_flip: bool, degrees: float) -> None:
        self.vertical_flip = vertical_flip
        self.degrees = float(degrees)

    def draw(self) -> tuple[bool, bool, float]:
        """(horizontal flip, vertical flip, angle in degrees), drawn as the torchvision transforms draw them."""
        hflip = bool(torch.rand(1) < 0.5)
        vflip = bool(torch.rand(1) < 0.5) if self.vertical_flip else False
        angle = torch.empty(1).uniform_(-self.degrees, self.degrees).item() if self.degrees > 0 else 0.0
        return hflip, vflip, angle

    def __call__(self, image: Image.Image) -> torch.Tensor | dict[str, torch.Tensor]:
        hflip, vflip, angle = self.draw()
        return self.apply(image, hflip, vflip, angle)

    def apply(self, image: Image.Image, hflip: bool, vflip: bool, angle: float) -> torch.Tensor | dict:
        pixels = as_uint8(image)
        if self.degrees > 0:
            height, width = pixels.shape[1:]
            coefficients = torch.tensor(rotation_coefficients(angle, hflip, vflip, height, width), dtype=torch.float32)
            return {"image": pixels, ROTATION: coefficients}
        dims = [d for d, flip in ((2, hflip), (1, vflip)) if flip]  # flips only: exact
        return pixels.flip(dims) if dims else pixels


def rotation_coefficients(
    angle: float, hflip: bool, vflip: bool, height: int, width: int
) -> tuple[float, float, float, float]:
    """(a, b, c, d): the source of the output pixel centred (u, v) pixels right of and below the image centre lies
    at (a u + b v, c u + d v) in grid_sample's units (the image spans [-1, 1] on both axes): (u, v) turned back by
    `angle` degrees (counter-clockwise on the screen), then mirrored as the flips ask."""
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    sx, sy = (-2.0 if hflip else 2.0) / width, (-2.0 if vflip else 2.0) / height
    return sx * cos, -sx * sin, sy * sin, sy * cos


def rotate(pixels: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float pixels (whole 8-bit levels), each image turned and flipped as its row of the (B, 4)
    float32 `coefficients` (rotation_coefficients) says, as PIL's Image.rotate(angle, BILINEAR) turns 8-bit images:
    bilinear sampling of the four nearest pixels (edge pixels repeated), 0 where the source point lies outside the
    image, rounded down to whole levels as PIL stores them. Every image is computed as it would be alone."""
    batch, _, height, width = pixels.shape
    u = torch.arange(width, dtype=pixels.dtype, device=pixels.device) + (0.5 - width / 2)
    v = (torch.arange(height, dtype=pixels.dtype, device=pixels.device) + (0.5 - height / 2))[:, None]
    c = coefficients.to(pixels.dtype)[:, :, None, None]  # (B, 4, 1, 1)
    grid = torch.empty(batch, height, width, 2, dtype=pixels.dtype, device=pixels.device)
    torch.add(c[:, 0] * u, c[:, 1] * v, out=grid[..., 0])
    torch.add(c[:, 2] * u, c[:, 3] * v, out=grid[..., 1])
    out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = (grid.abs_().amax(dim=-1) < 1)[:, None]
    # float32 weights may land a hair below a whole level that PIL's double arithmetic reaches exactly (a flat region,
    # a pixel centre): rounded down from there it would be one level darker
    return out.add_(2**-14).floor_().mul_(inside)


class ModelInput:
    """The device half of the transforms: a batch as the loaders make it (uint8 images, on any device) -> the batch
    the models read, its images ImageNet-normalised float32 (B, 3, H, W), training images turned first (`rotate`,
    the key ROTATION removed). The arithmetic is ToTensor's and Normalize's, in their order: the levels as float32,
    / 255, - mean, / std, each rounded to float32, so on the CPU the tensors are those of before to the bit (tested).
    The constants are tensors on the batch's device, kept for the next batch (copying them there waits for the
    device), and a CUDA division by a tensor divides exactly (by a Python number it would multiply by its
    reciprocal, which can differ in the last bit). A batch whose images are already floats passes unchanged."""

    def __init__(self) -> None:
        self._constants: torch.Tensor | None = None

    def constants(self, device: torch.device) -> torch.Tensor:
        """(7, 1, 1) float32 on `device`: 255, the ImageNet mean, the ImageNet std."""
        if self._constants is None or self._constants.device != device:
            values = torch.tensor([255.0, *IMAGENET_MEAN, *IMAGENET_STD], dtype=torch.float32)
            self._constants = values.view(7, 1, 1).to(device)
        return self._constants

    def __call__(self, batch: dict) -> dict:
        image = batch["image"]
        if image.dtype != torch.uint8:
            assert ROTATION not in batch, "a rotation is applied to 8-bit images only"
            return batch
        batch = dict(batch)
        c = self.constants(image.device)
        pixels = image.float()  # whole levels, exact
        coefficients = batch.pop(ROTATION, None)
        if coefficients is not None:
            pixels = rotate(pixels, coefficients.float())  # 64-true's input conversion may have widened them
        batch["image"] = pixels.div_(c[0:1]).sub_(c[1:4]).div_(c[4:7])
        return batch


def decode_side(cfg: dict, train: bool) -> int | None:
    """The shortest side a training JPEG may be decoded at (PIL's draft mode: the decoder scales by 1/2, 1/4 or 1/8
    while both sides stay at least this), or None for full size. Only the standard training transform: its square crop
    of side min(h, w) is resized to data.image_size anyway. Evaluation decodes in full (its inputs stay as they were),
    and the chest transform's RandomResizedCrop may enlarge a small part of the image."""
    data = cfg["data"]
    return data["image_size"] if train and data["transform"] == "standard" else None


def build_transform(cfg: dict, train: bool) -> Callable[[Image.Image], torch.Tensor | dict]:
    """The CPU half. standard, train: square crop -> resize -> h-flip -> [v-flip] -> [rotation, on the device];
    eval: square crop -> resize. chest, train: RandomResizedCrop -> h-flip -> [rotation, on the device]; eval: resize.
    The result: a (3, H, W) uint8 tensor, or with a rotation {"image": that tensor, "rotation": its coefficients}
    (`item`); ModelInput normalises (and turns) on the device."""
    data = cfg["data"]
    size = data["image_size"]
    if data["transform"] == "chest":
        steps: list = [T.RandomResizedCrop(size)] if train else [T.Resize((size, size))]
    else:
        steps = [SquareCenterCrop(), T.Resize((size, size))]
    if train:
        return T.Compose([*steps, FlipRotate(data["vertical_flip"], data["rotation_degrees"])])
    return T.Compose([*steps, T.PILToTensor()])


def item(transform: Callable | None, image) -> dict:
    """The image part of a data set's item: {"image": the transform's result}, and what the transform hands to the
    device half beside it (the rotation's coefficients). Without a transform the image as it is."""
    out = image if transform is None else transform(image)
    return dict(out) if isinstance(out, dict) else {"image": out}
