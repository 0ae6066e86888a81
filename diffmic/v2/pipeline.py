"""Heterologous diffusion on the K x K latent label grid (SPEC sections 3, 4 and 6).

Notation (the paper's symbols -> names here):
    T                   num_train_timesteps
    beta_t              betas[t], linear from beta_start to beta_end
    alpha_bar_t         alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)
    y_0                 y0: the label vector, one-hot (multi-label: multi-hot), (B, C)
    Y_0                 y0_grid: the label vector copied to every grid cell, (B, C, K, K)
    Y_t                 y_t: noisy grid; each cell has its own t while training
    P                   guided_prior_map(y_global, y_local): the dual-granularity prior, (B, C, K, K)
    eps, eps_hat        the noise and the denoiser's estimate of it
    x0_hat              (Y_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t), clipped to [-1, 1]
    x_w                 condition: the denoiser's image feature, computed once per image (model.py)

The parts here know nothing of the guidance model or the denoiser's inside: the sampler takes a
denoiser with `denoise(condition, concat[P, Y_t], t)`, the condition, the prior map and the start.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def guided_prior_map(y_global: torch.Tensor, y_local: torch.Tensor, grid_size: int) -> torch.Tensor:
    """P[b, c, i, j] = (1 - D[i, j]) y_global[b, c] + D[i, j] y_local[b, c], D[i, j] = |i - j| / (K - 1).

    The diagonal holds y_global, the corners (K-1, 0) and (0, K-1) hold y_local. (B, C) -> (B, C, K, K)."""
    assert y_global.shape == y_local.shape and y_global.dim() == 2, (
        f"y_global {tuple(y_global.shape)} and y_local {tuple(y_local.shape)} must both be (B, C)"
    )
    index = torch.arange(grid_size, device=y_global.device, dtype=y_global.dtype)
    distance = (index[:, None] - index[None, :]).abs() / max(grid_size - 1, 1)
    return (1 - distance) * y_global[:, :, None, None] + distance * y_local[:, :, None, None]


class DDIMScheduler(nn.Module):
    """DDIM (eta = 0) with the authors' diffusers settings: linear betas, epsilon prediction,
    "leading" timestep spacing, x0 clipped to [-1, 1], alpha_bar = 1 after the last step.

    The schedule tensors are non-persistent buffers: they follow the module's device and are
    rebuilt from the config rather than stored in checkpoints."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        clip_sample: bool = True,
    ) -> None:
        super().__init__()
        assert num_train_timesteps >= 1 and 0 < beta_start <= beta_end < 1, (
            "need T >= 1, 0 < beta_start <= beta_end < 1"
        )
        self.num_train_timesteps = num_train_timesteps
        self.clip_sample = clip_sample
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, dim=0), persistent=False)
        self.register_buffer("timesteps", torch.arange(num_train_timesteps).flip(0), persistent=False)
        self.step_ratio = 1

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Leading spacing: t = (n-1) r, ..., r, 0 with r = T // n (10 steps of 1000: 900, 800, ..., 0)."""
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in 1..{self.num_train_timesteps}, got {num_inference_steps}")
        self.step_ratio = self.num_train_timesteps // num_inference_steps
        steps = torch.arange(num_inference_steps, device=self.betas.device) * self.step_ratio
        self.timesteps = steps.flip(0)
        return self.timesteps

    def add_noise(self, y0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Y_t = sqrt(alpha_bar_t) Y_0 + sqrt(1 - alpha_bar_t) eps, with one t per grid cell.

        y0, noise: (B, C, K, K); t: (B, K, K) long (or (B,) for one t per sample)."""
        a = self.alphas_cumprod[t].to(y0.dtype)
        a = a[:, None] if a.dim() == 3 else a.view(-1, 1, 1, 1)
        return a.sqrt() * y0 + (1 - a).sqrt() * noise

    def predict_x0(self, eps_hat: torch.Tensor, t: int, y_t: torch.Tensor) -> torch.Tensor:
        """x0_hat = (Y_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t), clipped when clip_sample: the clean
        grid a DDIM step estimates (what `step` moves towards). Float32 (or the inputs' wider type), autocast off."""
        with torch.autocast(y_t.device.type, enabled=False):
            dtype = torch.promote_types(torch.promote_types(y_t.dtype, eps_hat.dtype), torch.float32)
            y_t, eps_hat = y_t.to(dtype), eps_hat.to(dtype)
            a_t = self.alphas_cumprod[int(t)]
            x0_hat = (y_t - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
            return x0_hat.clamp(-1.0, 1.0) if self.clip_sample else x0_hat

    def step(self, eps_hat: torch.Tensor, t: int, y_t: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM update Y_t -> Y_{t - r} given the predicted noise. The arithmetic is float32 (or
        the inputs' wider type) with autocast off: a denoiser run under bf16 autocast hands in a bf16 eps_hat,
        which is cast up here, so only the network runs in bf16, never the scheduler."""
        t = int(t)
        with torch.autocast(y_t.device.type, enabled=False):
            x0_hat = self.predict_x0(eps_hat, t, y_t)
            eps_hat = eps_hat.to(x0_hat.dtype)
            prev = t - self.step_ratio
            a_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.ones_like(self.alphas_cumprod[t])
            return a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps_hat


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels (B,) -> float one-hot vectors y0 (B, C); multi-hot rows (B, C) pass through."""
    if labels.dim() == 2:
        assert labels.shape[1] == num_classes, f"multi-hot labels of width {labels.shape[1]}, expected {num_classes}"
        return labels.float()
    return torch.nn.functional.one_hot(labels.long(), num_classes).float()


def heterologous_noise(
    scheduler: DDIMScheduler, y0: torch.Tensor, grid_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise every one of the B*K*K cells with its own t ~ U{0..T-1} and eps ~ N(0, I).

    y0 (B, C) one-hot / multi-hot -> (y_t (B, C, K, K), eps (B, C, K, K), t (B, K, K))."""
    b, c = y0.shape
    t = torch.randint(0, scheduler.num_train_timesteps, (b, grid_size, grid_size), device=y0.device)
    eps = torch.randn(b, c, grid_size, grid_size, device=y0.device, dtype=y0.dtype)
    y0_grid = y0[:, :, None, None].expand(-1, -1, grid_size, grid_size)
    return scheduler.add_noise(y0_grid, eps, t), eps, t


@torch.no_grad()
def ddim_sample(
    denoiser: nn.Module,
    scheduler: DDIMScheduler,
    condition: torch.Tensor,
    prior: torch.Tensor,
    y_start: torch.Tensor,
    num_steps: int,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Denoise label grids with DDIM from S starts per image; the encoders are not run here.

    condition x_w (B, F) and prior P (B, C, K, K) are computed once per image; y_start Y_T is
    (S, B, C, K, K). Every step calls `denoiser.denoise(x_w, concat[P, Y_t], t)` on all S * B grids at
    once, each cell at the same t. Returns the final grids, (S, B, C, K, K).

    on_step(t, x0_hat, y_next) sees every step's clean-grid estimate and the grid it leads to, both (S, B, C, K, K);
    it only reads them (explain/explanation.py records the score trajectory, passing it down through the model's
    `evaluate_batch`), so the grids are the same with and without it."""
    samples, batch = y_start.shape[:2]
    assert y_start.dim() == 5 and y_start.shape[2:] == prior.shape[1:] and batch == prior.shape[0], (
        f"y_start must be (S, B, C, K, K) with (B, C, K, K) = {tuple(prior.shape)}, got {tuple(y_start.shape)}"
    )
    assert condition.shape[0] == batch, f"condition has {condition.shape[0]} rows for {batch} images"
    # rows are sample-major (S * B): sample s of image b is row s * B + b
    prior, condition = prior.repeat(samples, 1, 1, 1), condition.repeat(samples, 1)
    y_t = y_start.flatten(0, 1)
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps.tolist():
        t_cells = torch.full(y_t.shape[:1] + y_t.shape[2:], t, device=y_t.device, dtype=torch.long)
        eps_hat = denoiser.denoise(condition, torch.cat([prior, y_t], dim=1), t_cells)
        y_next = scheduler.step(eps_hat, t, y_t)
        if on_step is not None:
            shape = (samples, batch, *y_t.shape[1:])
            on_step(t, scheduler.predict_x0(eps_hat, t, y_t).view(shape), y_next.view(shape))
        y_t = y_next
    return y_t.view(samples, batch, *y_t.shape[1:])


def focal_weight(
    y_fusion: torch.Tensor, y0: torch.Tensor, alpha: float, gamma: float, multilabel: bool = False
) -> torch.Tensor:
    """w = 1 + alpha (1 - p)^gamma: (B, C) -> (B,). Single-label: p = softmax(y_fusion) at the true
    class. Multi-label [ours]: p = mean over findings of sigmoid(y_fusion) where y0 is 1 and
    1 - sigmoid(y_fusion) where it is 0. Samples the DCG finds hard weigh more in the diffusion loss."""
    if multilabel:
        prob = torch.sigmoid(y_fusion)
        p = (prob * y0 + (1 - prob) * (1 - y0)).mean(dim=1)
    else:
        p = (torch.softmax(y_fusion, dim=1) * y0).sum(dim=1)
    return 1 + alpha * (1 - p).pow(gamma)


def diffusion_focal_loss(eps_hat: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean over b, c, i, j of w[b] (eps_hat - eps)^2."""
    return (weight.view(-1, 1, 1, 1) * (eps_hat - eps).pow(2)).mean()
