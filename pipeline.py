"""Heterologous diffusion on the K x K latent label grid (SPEC sections 3, 4 and 6).

Notation (the paper's symbols -> names here):
    T                   num_train_timesteps
    beta_t              betas[t], linear from beta_start to beta_end
    alpha_bar_t         alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)
    Y_0                 y0_grid: the label vector copied to every grid cell, (B, C, K, K)
    Y_t                 y_t: noisy grid; each cell has its own t while training
    P                   guided_prior_map(y_global, y_local): the dual-granularity prior, (B, C, K, K)
    eps, eps_hat        the noise and the denoiser's estimate of it
    x0_hat              (Y_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t), clipped to [-1, 1]
"""
from __future__ import annotations

import torch
from torch import nn

from pretraining.cross_fit import CrossFitDCG, guide_outputs
from pretraining.dcg import DCG, DCGOutput


def guided_prior_map(y_global: torch.Tensor, y_local: torch.Tensor, grid_size: int) -> torch.Tensor:
    """P[b, c, i, j] = (1 - D[i, j]) y_global[b, c] + D[i, j] y_local[b, c], D[i, j] = |i - j| / (K - 1).

    The diagonal holds y_global, the corners (K-1, 0) and (0, K-1) hold y_local. (B, C) -> (B, C, K, K)."""
    assert y_global.shape == y_local.shape and y_global.dim() == 2, \
        f"y_global {tuple(y_global.shape)} and y_local {tuple(y_local.shape)} must both be (B, C)"
    index = torch.arange(grid_size, device=y_global.device, dtype=y_global.dtype)
    distance = (index[:, None] - index[None, :]).abs() / max(grid_size - 1, 1)
    return (1 - distance) * y_global[:, :, None, None] + distance * y_local[:, :, None, None]


def condition_prior(dcg_out: DCGOutput, grid_size: int, guided_map: bool = True, roi_branch: bool = True
                    ) -> torch.Tensor:
    """The prior P fed to the denoiser, with the benchmark's ablations (config section `ablation`):
    guided_map False gives zeros (no DCG prior at all); roi_branch False builds P from y_global alone."""
    if not guided_map:
        b, c = dcg_out.y_global.shape
        return dcg_out.y_global.new_zeros(b, c, grid_size, grid_size)
    y_local = dcg_out.y_local if roi_branch else dcg_out.y_global
    return guided_prior_map(dcg_out.y_global, y_local, grid_size)


class DDIMScheduler(nn.Module):
    """DDIM (eta = 0) with the authors' diffusers settings: linear betas, epsilon prediction,
    "leading" timestep spacing, x0 clipped to [-1, 1], alpha_bar = 1 after the last step.

    The schedule tensors are non-persistent buffers: they follow the module's device and are
    rebuilt from the config rather than stored in checkpoints."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 clip_sample: bool = True) -> None:
        super().__init__()
        assert num_train_timesteps >= 1 and 0 < beta_start <= beta_end < 1, "need T >= 1, 0 < beta_start <= beta_end < 1"
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
            raise ValueError(f"num_inference_steps must be in 1..{self.num_train_timesteps}, "
                             f"got {num_inference_steps}")
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

    def step(self, eps_hat: torch.Tensor, t: int, y_t: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM update Y_t -> Y_{t - r} given the predicted noise."""
        t = int(t)
        a_t = self.alphas_cumprod[t]
        prev = t - self.step_ratio
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.ones_like(a_t)
        x0_hat = (y_t - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
        if self.clip_sample:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        return a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps_hat


def heterologous_noise(scheduler: DDIMScheduler, y0: torch.Tensor, grid_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise every one of the B*K*K cells with its own t ~ U{0..T-1} and eps ~ N(0, I).

    y0 (B, C) one-hot / multi-hot -> (y_t (B, C, K, K), eps (B, C, K, K), t (B, K, K))."""
    b, c = y0.shape
    t = torch.randint(0, scheduler.num_train_timesteps, (b, grid_size, grid_size), device=y0.device)
    eps = torch.randn(b, c, grid_size, grid_size, device=y0.device, dtype=y0.dtype)
    y0_grid = y0[:, :, None, None].expand(-1, -1, grid_size, grid_size)
    return scheduler.add_noise(y0_grid, eps, t), eps, t


@torch.no_grad()
def ddim_sample(dcg: DCG | CrossFitDCG, denoiser: nn.Module, scheduler: DDIMScheduler, image: torch.Tensor,
                start: torch.Tensor, num_steps: int, reuse_condition: bool = True, guided_map: bool = True,
                roi_branch: bool = True) -> tuple[torch.Tensor, DCGOutput]:
    """Denoise a label grid for `image` (B, 3, H, W) with DDIM.

    start: (2, B, C) uniform [0, 1) vectors that stand in for y_global and y_local in Y_T (the
    authors' code), or (2, S, B, C) for S samples per image from S starts, whose final grids are
    averaged [ours; the paper draws one]. With reuse_condition the DCG and both encoders run once per
    image, whatever S; without, they run at every step, as in the authors' code: the results are the
    same. guided_map and roi_branch are the ablation switches of `condition_prior`. A cross-fitted DCG
    (k members) guides sample s with member s mod k; S must be a multiple of k.
    Returns the final grid (B, C, K, K) and the DCG output (member 0's when cross-fitted)."""
    grid_size = denoiser.grid_size
    start = start[:, None] if start.dim() == 3 else start
    samples = start.shape[1]
    assert start.dim() == 4 and start.shape[0] == 2 and start.shape[2] == image.shape[0], \
        f"start must be (2, B, C) or (2, S, B, C) with B = {image.shape[0]}, got {tuple(start.shape)}"
    assert reuse_condition or samples == 1, "several samples per image need reuse_condition"
    outs = guide_outputs(dcg, image)
    assert samples % len(outs) == 0, \
        f"{samples} samples per image cannot be shared out evenly over {len(outs)} cross-fitted DCG members"
    dcg_out, repeats = outs[0], samples // len(outs)
    # rows are sample-major (S*B, ...): the members' blocks repeated, so sample s is guided by member s mod k
    prior = torch.cat([condition_prior(out, grid_size, guided_map, roi_branch) for out in outs]).repeat(repeats, 1, 1, 1)
    y_t = guided_prior_map(start[0].flatten(0, 1).to(prior), start[1].flatten(0, 1).to(prior), grid_size)
    condition = None
    if reuse_condition:
        condition = torch.cat([denoiser.encode(image, out.patches) for out in outs]).repeat(repeats, 1)
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps.tolist():
        t_cells = torch.full(y_t.shape[:1] + y_t.shape[2:], t, device=y_t.device, dtype=torch.long)
        if reuse_condition:
            eps_hat = denoiser.denoise(condition, torch.cat([prior, y_t], dim=1), t_cells)
        else:
            step_dcg = dcg(image)
            step_prior = condition_prior(step_dcg, grid_size, guided_map, roi_branch)
            eps_hat = denoiser(image, step_dcg.patches, torch.cat([step_prior, y_t], dim=1), t_cells)
        y_t = scheduler.step(eps_hat, t, y_t)
    return y_t.view(samples, image.shape[0], *y_t.shape[1:]).mean(dim=0), dcg_out


def focal_weight(y_fusion: torch.Tensor, y0: torch.Tensor, alpha: float, gamma: float,
                 multilabel: bool = False) -> torch.Tensor:
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
