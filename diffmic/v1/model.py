"""DiffMIC (v1)'s denoiser (the authors' v1 model.py, SPEC 9): a CNN image encoder to an F-wide feature, and three
time-conditioned linear layers on [y_t, y_hat] that the feature gates. No grid, no ROI patches, no ViT."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffmic.backbones import Trunk

# the image encoders of the authors' v1 code (v1.encoder; config.RULES lists this registry)
ENCODERS = ("resnet18", "resnet50", "densenet121")


class ConditionalLinear(nn.Module):
    """Linear(x) scaled by a learnt embedding of the timestep, initialised uniform in [0, 1) as the authors'."""

    def __init__(self, num_in: int, num_out: int, num_steps: int) -> None:
        super().__init__()
        self.lin = nn.Linear(num_in, num_out)
        self.embed = nn.Embedding(num_steps, num_out)
        nn.init.uniform_(self.embed.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.embed(t) * self.lin(x)


class DenoiserV1(nn.Module):
    """eps_hat = f(image, y_t, y_hat, t). `encode` (the image feature x, once per image) and `denoise` (the
    linear body) are split so that a sampler runs the encoder once per image."""

    def __init__(self, num_classes: int, num_timesteps: int, feature_dim: int, encoder: str = "resnet18") -> None:
        super().__init__()
        assert encoder in ENCODERS, f"v1 encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}"
        steps = num_timesteps + 1  # the authors' embedding size
        self.trunk = Trunk(encoder)  # random init, as the authors' code
        self.project = nn.Linear(self.trunk.width, feature_dim)
        self.norm = nn.BatchNorm1d(feature_dim)
        self.lin1 = ConditionalLinear(2 * num_classes, feature_dim, steps)
        self.norm1 = nn.BatchNorm1d(feature_dim)
        self.lin2 = ConditionalLinear(feature_dim, feature_dim, steps)
        self.norm2 = nn.BatchNorm1d(feature_dim)
        self.lin3 = ConditionalLinear(feature_dim, feature_dim, steps)
        self.norm3 = nn.BatchNorm1d(feature_dim)
        self.lin4 = nn.Linear(feature_dim, num_classes)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """The image feature x: (B, 3, H, W) -> (B, F), pooled, projected and batch-normalised."""
        return self.norm(self.project(self.trunk(image).mean(dim=(2, 3))))

    def denoise(self, x: torch.Tensor, y_t: torch.Tensor, y_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_hat (B, C) from the feature x (B, F), y_t and y_hat (B, C) and the steps t (B,)."""
        y = F.softplus(self.norm1(self.lin1(torch.cat([y_t, y_hat.to(y_t.dtype)], dim=-1), t)))
        y = F.softplus(self.norm2(self.lin2(x * y, t)))
        y = F.softplus(self.norm3(self.lin3(y, t)))
        return self.lin4(y)

    def forward(self, image: torch.Tensor, y_t: torch.Tensor, y_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoise(self.encode(image), y_t, y_hat, t)


def build_denoiser_v1(cfg: dict) -> DenoiserV1:
    v1 = cfg["v1"]
    return DenoiserV1(cfg["data"]["num_classes"], cfg["diffusion"]["timesteps"], v1["feature_dim"], v1["encoder"])
