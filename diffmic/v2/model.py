"""The DiffMIC-v2 denoiser, ConditionalModel (SPEC section 5).

Notation: B batch, C classes, K grid side (= number of ROIs), F feature_dim.
    g        (B, F)          global image feature: EfficientSAM ViT -> 1x1 conv -> mean -> BN
    l        (B, F, K)       local features of the K ROI patches: CNN -> linear -> BN
    x_w      (B, F)          condition: tokens [g, l] averaged with learnt softmax weights
    y_in     (B, 2C, K, K)   concat(guided prior map P, noisy grid Y_t)
    t        (B, K, K)       one timestep per grid cell
    eps_hat  (B, C, K, K)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from diffmic.backbones import Trunk
from diffmic.precision import ieee_float32
from EfficientSAM import ENCODERS, ImageEncoderViT, load_efficientsam_encoder

logger = logging.getLogger(__name__)

# the initialisations of the condition's BatchNorms (model.condition_init; config.RULES lists this registry)
CONDITION_INITS = ("default", "identity")


def pointwise(
    conv: nn.Conv2d, x: torch.Tensor, low_precision: bool = True, cache: dict[nn.Conv2d, torch.Tensor] | None = None
) -> torch.Tensor:
    """A 1x1 convolution. Float32: the convolution itself (the numbers of the paper path). Under autocast (bf16-mixed)
    the same map as a matrix product over the cells, (B K K, in) x (in, out): on the K x K grid oneDNN's bf16
    convolution reaches a sixth of the bf16 matmul rate, the product most of it (README, Speed).
    low_precision=False keeps the convolution in IEEE float32 under autocast and under a TF32 float32 policy too (the
    label-space layers: precision.py). `cache`: low-precision copies of weights, by convolution, to reuse rather than
    cast again (ConditionalModel.reuse_pointwise_weights); used without gradients only."""
    if not low_precision:
        with torch.autocast(x.device.type, enabled=False), ieee_float32():
            return conv(x if x.dtype == torch.float64 else x.float())
    if not torch.is_autocast_enabled(x.device.type):
        return conv(x)
    dtype = torch.get_autocast_dtype(x.device.type)
    cache = None if torch.is_grad_enabled() else cache
    weight = None if cache is None else cache.get(conv)
    if weight is None:
        weight = conv.weight.flatten(1).to(dtype)
        if cache is not None:
            cache[conv] = weight
    b, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c).to(dtype)  # contiguous rows: a strided input is a slow path
    bias = None if conv.bias is None else conv.bias.to(dtype)
    # the result is a channels-last view (B, out, K, K); the per-cell factors and BatchNorm take it as it is
    return F.linear(rows, weight, bias).view(b, h, w, -1).permute(0, 3, 1, 2)


class ConditionalConv2d(nn.Module):
    """1x1 convolution scaled per cell by a learnt embedding of that cell's timestep."""

    def __init__(self, in_channels: int, out_channels: int, num_timesteps: int, low_precision: bool = True) -> None:
        super().__init__()
        self.low_precision = low_precision  # False: float32 under autocast too (see ConditionalModel.denoise)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.embed = nn.Embedding(num_timesteps + 1, out_channels)
        nn.init.uniform_(self.embed.weight, 0.0, 1.0)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cache: dict[nn.Conv2d, torch.Tensor] | None = None
    ) -> torch.Tensor:
        gamma = self.embed(t).permute(0, 3, 1, 2)  # (B, K, K, out) -> (B, out, K, K)
        return pointwise(self.conv, x, self.low_precision, cache) * gamma


class PatchEncoder(nn.Module):
    """ROI patches (B, K, r, r) -> l (B, F, K); patches are single-channel, repeated to 3."""

    def __init__(self, name: str, feature_dim: int) -> None:
        super().__init__()
        self.trunk = Trunk(name)
        self.proj = nn.Linear(self.trunk.width, feature_dim)
        self.norm = nn.BatchNorm1d(feature_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, k, r, _ = patches.shape
        h = self.trunk(patches.reshape(b * k, 1, r, r).expand(-1, 3, -1, -1))
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.norm(self.proj(h)).view(b, k, -1).transpose(1, 2)


class ConditionalModel(nn.Module):
    """eps_hat = denoiser(image, patches, concat[P, Y_t], t); `encode` and `denoise` split it so that
    sampling runs the encoders once per image."""

    def __init__(
        self,
        num_classes: int,
        grid_size: int,
        feature_dim: int,
        num_timesteps: int,
        image_encoder: str = "vit_s",
        patch_encoder: str = "resnet18",
        roi_tokens: bool = True,
        condition_init: str = "default",
    ) -> None:
        super().__init__()
        self.num_classes, self.grid_size = num_classes, grid_size
        self.roi_tokens = roi_tokens  # False (ablation): x_w = g, the patch encoder is not run
        assert image_encoder in ENCODERS, f"image encoder must be one of {sorted(ENCODERS)}, got {image_encoder!r}"
        self.image_encoder = ImageEncoderViT(**ENCODERS[image_encoder])
        self.image_proj = nn.Conv2d(self.image_encoder.embed_dim, feature_dim, kernel_size=1)
        self.image_norm = nn.BatchNorm1d(feature_dim)
        self.patch_encoder = PatchEncoder(patch_encoder, feature_dim)
        self.token_logits = nn.Parameter(torch.randn(1, feature_dim, grid_size + 1))  # theta
        self.cc1 = ConditionalConv2d(2 * num_classes, feature_dim, num_timesteps, low_precision=False)
        self.norm1 = nn.BatchNorm2d(feature_dim)
        self.cc2 = ConditionalConv2d(feature_dim, feature_dim, num_timesteps)
        self.norm2 = nn.BatchNorm2d(feature_dim)
        self.cc3 = ConditionalConv2d(feature_dim, feature_dim, num_timesteps)
        self.norm3 = nn.BatchNorm2d(feature_dim)
        self.out = nn.Conv2d(feature_dim, num_classes, kernel_size=1)
        assert condition_init in CONDITION_INITS, (
            f"condition_init must be one of {', '.join(CONDITION_INITS)}, got {condition_init!r}"
        )
        if not roi_tokens:
            # kept in the state dict (one checkpoint layout), but frozen: they take no part in the forward pass, and
            # DDP (find_unused_parameters off) fails at the second step on a trainable parameter without a gradient
            self.patch_encoder.requires_grad_(False)
            self.token_logits.requires_grad_(False)
        # the low-precision copies of the 1x1 weights while `reuse_pointwise_weights` is active (None: not kept)
        self.cast_weights: dict[nn.Conv2d, torch.Tensor] | None = None
        if condition_init == "identity":
            # [ours] x_w starts at exactly 1 (the softmax weights sum to 1), so the prior reaches the output
            # unscrambled from the first step; the encoders' share grows as the BatchNorm weights leave 0
            # (the zero-initialised modulation of DiT's adaLN-Zero). The default BatchNorm init gives
            # x_w of random sign per image until random-init encoders carry information.
            for norm in (self.image_norm, self.patch_encoder.norm):
                nn.init.zeros_(norm.weight)
                nn.init.ones_(norm.bias)

    @contextlib.contextmanager
    def reuse_pointwise_weights(self) -> Iterator[None]:
        """Inside, under autocast and without gradients, each 1x1 weight is cast to the low precision once and reused:
        the DDIM loop runs the body at every step, and casting its 75 M weights (F = 6144) costs as much as the
        products. The copies are dropped on leaving, so no stale copy outlives a sampled batch."""
        outer = self.cast_weights
        self.cast_weights = {} if outer is None else outer
        try:
            yield
        finally:
            self.cast_weights = outer

    def load_image_encoder(self, efficientsam_weights: str | None, image_size: int | None = None) -> None:
        """The EfficientSAM image encoder of a new run: the official file (or one of pretraining/train_encoder.py,
        which warns when it was trained at another `image_size`), or random init (warned). A file that cannot be
        read or does not fit raises OSError or ValueError naming it."""
        if efficientsam_weights is None:
            logger.warning(
                "model.efficientsam_weights is null: the EfficientSAM image encoder starts from "
                "random init; results will be below the paper's (see README, pretrained weights)"
            )
        else:
            load_efficientsam_encoder(self.image_encoder, efficientsam_weights, image_size)

    def load_patch_encoder(self, patch_encoder_weights: str | None, dcg_local_trunk: nn.Module | None = None) -> None:
        """The patch CNN of a new run: None (random init), "imagenet", a state-dict file, or "dcg": a copy
        of the pre-trained DCG's local trunk (the same network: dcg.backbone), trained on the same ROI patches
        [ours]."""
        if patch_encoder_weights == "dcg":
            assert dcg_local_trunk is not None, "patch_encoder_weights 'dcg' needs the DCG's local trunk"
            self.patch_encoder.trunk.load_state_dict(dcg_local_trunk.state_dict())
            logger.info("patch encoder initialised from the DCG's local trunk (model.patch_encoder_weights: dcg)")
        else:
            self.patch_encoder.trunk.load_weights(patch_encoder_weights, key="model.patch_encoder_weights")

    def encode(self, image: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) and ROI patches (B, K, r, r) -> condition x_w (B, F)."""
        assert patches.shape[1] == self.grid_size, (
            f"need K = {self.grid_size} patches (one per grid row), got {patches.shape[1]}"
        )
        g = self.image_norm(
            pointwise(self.image_proj, self.image_encoder(image), cache=self.cast_weights).mean(dim=(2, 3))
        )
        if not self.roi_tokens:
            return g
        tokens = torch.cat([g[:, :, None], self.patch_encoder(patches)], dim=2)  # (B, F, K+1)
        return (tokens * torch.softmax(self.token_logits, dim=2)).sum(dim=2)

    def denoise(self, x_w: torch.Tensor, y_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Condition (B, F), concat[P, Y_t] (B, 2C, K, K), per-cell t (B, K, K) -> eps_hat (B, C, K, K)."""
        assert y_in.shape[1] == 2 * self.num_classes and y_in.shape[2:] == (self.grid_size, self.grid_size), (
            f"y_in must be (B, {2 * self.num_classes}, {self.grid_size}, {self.grid_size}), got {tuple(y_in.shape)}"
        )
        assert t.shape == (y_in.shape[0], self.grid_size, self.grid_size), (
            f"t must be (B, K, K) = {(y_in.shape[0], self.grid_size, self.grid_size)}, got {tuple(t.shape)}"
        )
        # Under bf16 autocast the label-space layers, cc1 (reads P and Y_t) and out (writes eps_hat), stay float32:
        # bf16 keeps 8 significant bits of Y_t (an error up to 2^-9 of its size), and at small t, where the noise is
        # scaled by sqrt(1 - alpha_bar_t) ~ 0.01, that hides much of the noise the loss asks the network to predict.
        # Their products are 2C x F and F x C per cell, a negligible share of the body's F x F ones.
        y = F.softplus(self.norm1(self.cc1(y_in, t)))
        y = x_w[:, :, None, None] * y
        y = F.softplus(self.norm2(self.cc2(y, t, self.cast_weights)))
        y = F.softplus(self.norm3(self.cc3(y, t, self.cast_weights)))
        return pointwise(self.out, y, low_precision=False)

    def forward(self, image: torch.Tensor, patches: torch.Tensor, y_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoise(self.encode(image, patches), y_in, t)


def build_denoiser(cfg: dict) -> ConditionalModel:
    """The denoiser described by a config."""
    m = cfg["model"]
    return ConditionalModel(
        cfg["data"]["num_classes"],
        cfg["dcg"]["num_rois"],
        m["feature_dim"],
        cfg["diffusion"]["timesteps"],
        m["image_encoder"],
        m["patch_encoder"],
        roi_tokens=cfg["ablation"]["roi_branch"],
        condition_init=m["condition_init"],
    )
