"""DiffMIC (v1)'s diffusion of the label vector (SPEC 9): CARD's forward process, whose mean drifts from the label
to the DCG prior, its posterior for ancestral sampling, and the MMD of v1's dual guidance. The formulas are those
of the authors' v1 code (diffusion_utils.py: q_sample, p_sample, p_sample_t_1to0, compute_mmd).

Notation (the paper's symbols -> names here):
    T                   num_train_timesteps; t runs over 0 .. T - 1
    beta_t, alpha_t     betas[t] (linear from beta_start to beta_end), alphas[t] = 1 - beta_t
    alpha_bar_t         alphas_cumprod[t] = prod_{s<=t} alpha_s
    y_0                 the one-hot label vector, (B, C)
    y_hat               the DCG prior: softmax of a DCG output (fused, global or local), (B, C)
    y_t                 sqrt(alpha_bar_t) y_0 + (1 - sqrt(alpha_bar_t)) y_hat + sqrt(1 - alpha_bar_t) eps
    eps, eps_hat        the noise and the denoiser's estimate of it
    y0_hat              (y_t - (1 - sqrt(alpha_bar_t)) y_hat - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)
    gamma_0/1/2         the posterior mean's weights of y0_hat, y_t and y_hat

Sampling follows the authors' `p_sample_loop(n_steps)`: it starts at t = n_steps - 1 from y_hat + N(0, I) and takes
the ancestral steps t = n_steps - 1, ..., 1 of the training chain, then y0_hat at t = 0. With n_steps < T (their
released configs: 250 of 1000 steps for ISIC, 60 for APTOS) the chain is cut, not strided.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class CARDScheduler(nn.Module):
    """CARD's forward process and posterior with linear betas. The schedule tensors are non-persistent buffers:
    they follow the module's device and are rebuilt from the config rather than stored in checkpoints."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        super().__init__()
        assert num_train_timesteps >= 1 and 0 < beta_start <= beta_end < 1, (
            "need T >= 1, 0 < beta_start <= beta_end < 1"
        )
        self.num_train_timesteps = num_train_timesteps
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas", 1.0 - betas, persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, dim=0), persistent=False)

    def _at(self, values: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """values[t] shaped to broadcast over `like` (B, C): t is one step or one step per row."""
        if not isinstance(t, torch.Tensor):  # one step: a view of the schedule, no host-to-device copy
            return values[int(t)]
        return values[t.long()].reshape(-1, *([1] * (like.dim() - 1))) if t.dim() else values[t.long()]

    def timesteps_antithetic(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """n training steps, drawn in pairs t and T - 1 - t (the authors' antithetic sampling)."""
        t = torch.randint(0, self.num_train_timesteps, (n // 2 + 1,), device=device)
        return torch.cat([t, self.num_train_timesteps - 1 - t])[:n]

    def add_noise(self, y0: torch.Tensor, y_hat: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """y_t ~ q(y_t | y_0, y_hat) for a step per row: (B, C) -> (B, C)."""
        alpha_bar = self._at(self.alphas_cumprod, t, y0)
        root = alpha_bar.sqrt()
        # sqrt(1 - alpha_bar) from alpha_bar itself (1 - alpha_bar is exact in float32 near 1), as the authors'
        # one_minus_alphas_bar_sqrt; through root^2 it lost up to 6e-5 relative accuracy at small t
        return root * y0 + (1 - root) * y_hat + (1 - alpha_bar).sqrt() * eps

    def predict_y0(self, y_t: torch.Tensor, eps_hat: torch.Tensor, y_hat: torch.Tensor, t: int) -> torch.Tensor:
        """y0_hat: the forward process solved for y_0 with eps_hat in place of eps."""
        alpha_bar = self._at(self.alphas_cumprod, t, y_t)
        return (y_t - (1 - alpha_bar.sqrt()) * y_hat - (1 - alpha_bar).sqrt() * eps_hat) / alpha_bar.sqrt()

    def posterior(
        self, y0: torch.Tensor, y_t: torch.Tensor, y_hat: torch.Tensor, t: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(y_{t-1} | y_t, y_0, y_hat), t >= 1 (CARD, eq. 6 and 7)."""
        assert t >= 1, "the posterior needs t >= 1; at t = 0 the sample is y0_hat"
        alpha, alpha_bar, alpha_bar_prev = (
            self._at(v, s, y_t) for v, s in ((self.alphas, t), (self.alphas_cumprod, t), (self.alphas_cumprod, t - 1))
        )
        gamma_0 = (1 - alpha) * alpha_bar_prev.sqrt() / (1 - alpha_bar)
        gamma_1 = (1 - alpha_bar_prev) * alpha.sqrt() / (1 - alpha_bar)
        gamma_2 = 1 + (alpha_bar.sqrt() - 1) * (alpha.sqrt() + alpha_bar_prev.sqrt()) / (1 - alpha_bar)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha)
        return gamma_0 * y0 + gamma_1 * y_t + gamma_2 * y_hat, variance

    def step(
        self, eps_hat: torch.Tensor, t: int, y_t: torch.Tensor, y_hat: torch.Tensor, z: torch.Tensor | None
    ) -> torch.Tensor:
        """One ancestral step y_t -> y_{t-1} with standard normal `z`; at t = 0 the step returns y0_hat."""
        y0_hat = self.predict_y0(y_t, eps_hat, y_hat, t)
        if t == 0:
            return y0_hat
        assert z is not None, f"step t = {t} needs its noise z"
        mean, variance = self.posterior(y0_hat, y_t, y_hat, t)
        return mean + variance.sqrt() * z


def card_sample(
    denoiser: nn.Module,
    scheduler: CARDScheduler,
    condition: torch.Tensor,
    y_hat: torch.Tensor,
    noise: torch.Tensor,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Ancestral sampling of S label vectors per image: (S, B, C).

    denoiser: has `denoise(condition, y_t, y_hat, t) -> eps_hat` (diffmic_v1/model.py); condition (B, F), computed once
    per image; y_hat (B, C) the fused prior; noise (steps, S, B, C) standard normal: noise[0] draws the start
    y_{steps-1} = y_hat + noise[0], noise[k] the step from t = steps - k. One denoiser call per step and sample.
    on_step(t, y) sees the vectors each step leads to, (S, B, C), and only reads them (explain/explanation.py, through
    the model's `evaluate_batch`)."""
    steps, samples, batch, classes = noise.shape
    assert steps <= scheduler.num_train_timesteps, f"{steps} sampling steps exceed the {scheduler.num_train_timesteps}"
    assert y_hat.shape == (batch, classes), f"y_hat {tuple(y_hat.shape)} does not match noise {tuple(noise.shape)}"
    condition = condition.repeat(samples, 1)  # sample-major rows: (S * B, F)
    # float32 (float64 under 64-true): never the bf16 of a denoiser under autocast
    label_dtype = torch.promote_types(y_hat.dtype, torch.float32)
    y_hat = y_hat.to(label_dtype).repeat(samples, 1)
    y = y_hat + noise[0].flatten(0, 1)
    for k, t in enumerate(range(steps - 1, -1, -1)):
        t_rows = torch.full((samples * batch,), t, device=y.device, dtype=torch.long)
        eps_hat = denoiser.denoise(condition, y, y_hat, t_rows).to(label_dtype)
        y = scheduler.step(eps_hat, t, y, y_hat, noise[k + 1].flatten(0, 1) if t > 0 else None)
        if on_step is not None:
            on_step(t, y.view(samples, batch, classes))
    return y.view(samples, batch, classes)


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """v1's kernel k(x_i, y_j) = exp(-mean_d (x_id - y_jd)^2 / D) between the rows of x (N, D) and y (M, D)."""
    return torch.exp(-(x[:, None, :] - y[None, :, :]).square().mean(dim=2) / x.shape[1])


def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Maximum mean discrepancy between the rows of x and y with `gaussian_kernel` (biased estimate, as v1)."""
    return gaussian_kernel(x, x).mean() + gaussian_kernel(y, y).mean() - 2 * gaussian_kernel(x, y).mean()


def dual_guidance_loss(
    eps: torch.Tensor, eps_hat: torch.Tensor, eps_hat_global: torch.Tensor, eps_hat_local: torch.Tensor, weight: float
) -> torch.Tensor:
    """v1's loss: ||eps - eps_hat||^2 (mean) + weight (MMD(eps, eps_hat_global) + MMD(eps, eps_hat_local)); the three
    estimates come from the fused, global and local priors with the same eps."""
    return (eps - eps_hat).square().mean() + weight * (mmd(eps, eps_hat_global) + mmd(eps, eps_hat_local))
