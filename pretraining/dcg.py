"""DCG: the dual-granularity guidance model (SPEC section 2), adapted from GMIC.

Notation: B batch, C classes, K ROIs, (h, w) CAM grid = image / 32, r ROI side in pixels, D trunk width.
    saliency S      (B, C, h, w)   1x1 conv over the global trunk's feature map (B, D, h, w)
    y_global        (B, C)         mean of the top percent_t positions of S
    y_local         (B, C)         gated-attention MIL over the K ROI features
    y_fusion        (B, C)         (y_global + y_local) / 2
    patches         (B, K, r, r)   ROIs cropped from the first channel of the normalised image

The trunks (dcg.backbone): resnet18, D = 512, is DiffMIC-v2's DCG (SPEC 2). resnet50, D = 2048, is the authors'
v1 DCG (scott-yjyang/DiffMIC, pretraining/modules.py): its `DownsampleNetworkResNet18V1`, despite its name, is
torchvision's ResNet-50 without avgpool and fc, used for both the global and the local branch, so the saliency
conv and the MIL's U, V and classifier read 2048 features; the MIL's hidden width stays 128, and everything else
(top-t pooling, greedy ROIs, crops, fusion) does not depend on the trunk. Its ImageNet weights are torchvision's
IMAGENET1K_V1, which `pretrained=True` gives there (for ResNet-18 these are also torchvision's default).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffmic.backbones import Trunk


class DCGOutput(NamedTuple):
    y_fusion: torch.Tensor
    y_global: torch.Tensor
    y_local: torch.Tensor
    patches: torch.Tensor
    attention: torch.Tensor
    saliency: torch.Tensor
    corners: torch.Tensor | None = None  # (B, K, 2) the patches' upper-left pixels (row, col), in proposal order


def top_t_pool(saliency: torch.Tensor, percent_t: float) -> torch.Tensor:
    """Mean of the top `percent_t` fraction of each class map: (B, C, h, w) -> (B, C)."""
    flat = saliency.flatten(2)
    k = max(1, int(round(flat.shape[-1] * percent_t)))
    if k == flat.shape[-1]:
        return flat.mean(-1)
    return flat.topk(k, dim=-1).values.mean(-1)


def roi_window(roi_size: int, cam_size: int, image_size: int) -> int:
    """ROI side in CAM cells: round(roi_size * cam_size / image_size), at least 1."""
    return max(1, int(round(roi_size * cam_size / image_size)))


def roi_score(saliency: torch.Tensor) -> torch.Tensor:
    """What the ROI proposal ranks the cells by: the class maps min-max normalised and summed, (B, C, h, w) -> (B, 1,
    h, w)."""
    lo = saliency.amin(dim=(2, 3), keepdim=True)
    hi = saliency.amax(dim=(2, 3), keepdim=True)
    return ((saliency - lo) / (hi - lo).clamp_min(1e-12)).sum(1, keepdim=True)


def propose_rois(saliency: torch.Tensor, num_rois: int, window: int) -> torch.Tensor:
    """Greedy ROI proposal on the CAM: (B, C, h, w) -> upper-left cells (B, K, 2) as (row, col).

    The class maps are min-max normalised and summed; K times, the window x window box with the
    largest average is taken and zeroed. With a 1-cell window the greedy choice is exactly the top-K
    cells, so no step depends on the previous one; larger windows (chest: 4 cells) need the K
    dependent steps, each one batched over the whole mini-batch.
    """
    b, _, h, w = saliency.shape
    score = roi_score(saliency)
    if window == 1:
        index = score.flatten(1).topk(num_rois, dim=1).indices  # (B, K)
        return torch.stack((index // w, index % w), dim=-1)
    out_w = w - window + 1
    rows = torch.arange(h, device=score.device)
    cols = torch.arange(w, device=score.device)
    corners = []
    for _ in range(num_rois):  # sequential by definition of the greedy choice
        index = F.avg_pool2d(score, window, stride=1).flatten(1).argmax(dim=1)  # (B,)
        r0, c0 = index // out_w, index % out_w
        inside_r = (rows[None] >= r0[:, None]) & (rows[None] < r0[:, None] + window)  # (B, h)
        inside_c = (cols[None] >= c0[:, None]) & (cols[None] < c0[:, None] + window)  # (B, w)
        score = score.masked_fill((inside_r[:, :, None] & inside_c[:, None, :])[:, None], 0.0)
        corners.append(torch.stack((r0, c0), dim=-1))
    return torch.stack(corners, dim=1)


def cells_to_pixels(cells: torch.Tensor, cam_hw: tuple[int, int], image_hw: tuple[int, int]) -> torch.Tensor:
    """CAM cell (i, j) -> pixel (round(i / h * H), round(j / w * W)); (B, K, 2) long."""
    # the scales as float32 numbers, not a tensor built on the host and copied to the device at every forward (a
    # synchronisation a GPU waits on): a float32 tensor times a Python scalar computes in float32, as before
    rows, cols = (float(np.float32(image_hw[d] / cam_hw[d])) for d in (0, 1))
    return torch.round(torch.stack((cells[..., 0].float() * rows, cells[..., 1].float() * cols), dim=-1)).long()


def crop_patches(image: torch.Tensor, corners: torch.Tensor, roi_size: int) -> torch.Tensor:
    """Crop (B, K, r, r) upper-left anchored patches from the first channel of `image` (B, 3, H, W).

    Pixels that fall outside the image take that image's minimum, as in GMIC."""
    plane = image[:, 0]  # (B, H, W)
    b, height, width = plane.shape
    fill = plane.amin(dim=(1, 2))  # (B,)
    offsets = torch.arange(roi_size, device=image.device)
    rows = corners[..., 0, None] + offsets  # (B, K, r)
    cols = corners[..., 1, None] + offsets
    valid = (rows < height)[..., :, None] & (cols < width)[..., None, :]  # (B, K, r, r)
    batch = torch.arange(b, device=image.device)[:, None, None, None]
    patches = plane[batch, rows.clamp(max=height - 1)[..., :, None], cols.clamp(max=width - 1)[..., None, :]]
    return torch.where(valid, patches, fill[:, None, None, None])


class GatedAttentionMIL(nn.Module):
    """Gated attention pooling (Ilse et al., 2018): h (B, K, D) -> (z (B, D), a (B, K), y (B, C))."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.gate_u = nn.Linear(in_dim, hidden, bias=False)
        self.gate_v = nn.Linear(in_dim, hidden, bias=False)
        self.score_w = nn.Linear(hidden, 1, bias=False)
        self.classifier = nn.Linear(in_dim, num_classes, bias=False)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gated = torch.sigmoid(self.gate_u(h)) * torch.tanh(self.gate_v(h))
        a = torch.softmax(self.score_w(gated).squeeze(-1), dim=1)
        z = (a[..., None] * h).sum(1)
        return z, a, self.classifier(z)


# the trunks a DCG is built from (config key dcg.backbone), both branches alike
BACKBONES = ("resnet18", "resnet50")
# the ImageNet weights of the trunks: those of the authors' `resnet50(pretrained=True)` / `resnet18(pretrained=True)`
# (torchvision's default for ResNet-50 is the later IMAGENET1K_V2)
IMAGENET_WEIGHTS = "IMAGENET1K_V1"


class DCG(nn.Module):
    """Global saliency + greedy ROIs + local MIL; forward(image) -> DCGOutput. `backbone` is the trunk of both
    branches: resnet18 (DiffMIC-v2) or resnet50 (the authors' v1 DCG)."""

    def __init__(
        self,
        num_classes: int,
        image_size: int,
        num_rois: int,
        roi_size: int,
        percent_t: float = 1.0,
        backbone: str = "resnet18",
    ) -> None:
        super().__init__()
        assert image_size % 32 == 0, f"image_size {image_size} must be a multiple of 32"
        assert backbone in BACKBONES, f"DCG backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}"
        self.cam_size = image_size // 32
        assert 1 <= num_rois <= self.cam_size**2, f"{num_rois} ROIs do not fit a {self.cam_size}^2 CAM"
        self.num_rois, self.roi_size, self.percent_t = num_rois, roi_size, percent_t
        self.window = roi_window(roi_size, self.cam_size, image_size)
        self.backbone = backbone
        self.global_trunk = Trunk(backbone)
        self.saliency_conv = nn.Conv2d(self.global_trunk.width, num_classes, kernel_size=1, bias=False)
        self.local_trunk = Trunk(backbone)
        self.mil = GatedAttentionMIL(self.local_trunk.width, num_classes)

    def load_backbone_weights(self, weights: str | None) -> None:
        """Initialise both trunks (None, "imagenet" or a file of the `backbone`'s torchvision model) before
        pre-training."""
        for trunk in (self.global_trunk, self.local_trunk):
            trunk.load_weights(weights, key="dcg.backbone_weights", imagenet=IMAGENET_WEIGHTS)

    def forward(self, image: torch.Tensor) -> DCGOutput:
        assert image.dim() == 4 and image.shape[1] == 3, f"expected (B, 3, H, W), got {tuple(image.shape)}"
        saliency = self.saliency_conv(self.global_trunk(image))
        y_global = top_t_pool(saliency, self.percent_t)
        cells = propose_rois(saliency.detach(), self.num_rois, self.window)
        corners = cells_to_pixels(cells, saliency.shape[-2:], image.shape[-2:])
        patches = crop_patches(image, corners, self.roi_size)
        b, k, r, _ = patches.shape
        crops = patches.reshape(b * k, 1, r, r).expand(-1, 3, -1, -1)
        h = self.local_trunk(crops).mean(dim=(2, 3)).view(b, k, -1)
        _, attention, y_local = self.mil(h)
        y_fusion = (y_global + y_local) / 2
        return DCGOutput(y_fusion, y_global, y_local, patches, attention, saliency, corners)


def build_dcg(cfg: dict) -> DCG:
    """The DCG described by a config."""
    d = cfg["dcg"]
    return DCG(
        cfg["data"]["num_classes"],
        cfg["data"]["image_size"],
        d["num_rois"],
        d["roi_size"],
        d["percent_t"],
        d["backbone"],
    )
