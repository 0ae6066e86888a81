"""Tests for pipeline.py: guided prior map, DDIM scheduler (closed form and diffusers oracle),
heterologous noise, diffusion focal loss and DDIM sampling (SPEC sections 3, 4 and 6)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffmic.v2.pipeline import (
    DDIMScheduler,
    ddim_sample,
    diffusion_focal_loss,
    focal_weight,
    guided_prior_map,
    heterologous_noise,
)

T = 1000
# Closed-form schedule in float64: linear betas 1e-4 .. 0.02 over 1000 steps, alpha_bar = cumprod(1 - beta).
BETAS64 = np.linspace(1e-4, 0.02, T, dtype=np.float64)
AC64 = np.cumprod(1.0 - BETAS64)


def hand_step(y: np.ndarray, e: np.ndarray, t: int, ratio: int, clip: bool) -> np.ndarray:
    """One DDIM (eta = 0) update written from SPEC section 6, in float64."""
    a_t = AC64[t]
    a_prev = AC64[t - ratio] if t - ratio >= 0 else 1.0
    x0 = (y - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
    if clip:
        x0 = np.clip(x0, -1.0, 1.0)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * e


# --------------------------------------------------------------------------- guided prior map


def test_guided_prior_map_k3_hand_values():
    g = torch.tensor([[2.0, -1.0], [0.5, 4.0]])  # y_global (B=2, C=2), raw logits incl. negatives
    l = torch.tensor([[-4.0, 3.0], [1.5, -2.0]])  # y_local
    p = guided_prior_map(g, l, 3)
    assert p.shape == (2, 2, 3, 3)
    # D = [[0, .5, 1], [.5, 0, .5], [1, .5, 0]]; P = (1 - D) g + D l
    m = -1.0  # (2 + -4) / 2
    expected_b0_c0 = torch.tensor([[2.0, m, -4.0], [m, 2.0, m], [-4.0, m, 2.0]])
    torch.testing.assert_close(p[0, 0], expected_b0_c0)
    torch.testing.assert_close(p[0, 1], torch.tensor([[-1.0, 1.0, 3.0], [1.0, -1.0, 1.0], [3.0, 1.0, -1.0]]))
    torch.testing.assert_close(p[1, 0], torch.tensor([[0.5, 1.0, 1.5], [1.0, 0.5, 1.0], [1.5, 1.0, 0.5]]))
    torch.testing.assert_close(p[1, 1], torch.tensor([[4.0, 1.0, -2.0], [1.0, 4.0, 1.0], [-2.0, 1.0, 4.0]]))


def test_guided_prior_map_k6_hand_values():
    g = torch.tensor([[3.0, -2.0, 0.0]])
    l = torch.tensor([[-1.0, 8.0, 5.0]])
    p = guided_prior_map(g, l, 6)
    assert p.shape == (1, 3, 6, 6)
    for i in range(6):
        torch.testing.assert_close(p[0, :, i, i], g[0])  # diagonal: y_global
    torch.testing.assert_close(p[0, :, 5, 0], l[0])  # far corners: y_local
    torch.testing.assert_close(p[0, :, 0, 5], l[0])
    # D[1, 4] = 3/5: 0.4 g + 0.6 l
    torch.testing.assert_close(p[0, :, 1, 4], torch.tensor([0.4 * 3 - 0.6, -0.8 + 4.8, 3.0]))
    # D[2, 0] = 2/5: 0.6 g + 0.4 l
    torch.testing.assert_close(p[0, :, 2, 0], torch.tensor([1.8 - 0.4, -1.2 + 3.2, 2.0]))
    # symmetric in (i, j)
    torch.testing.assert_close(p, p.transpose(2, 3))


def test_guided_prior_map_k1_is_global():
    g, l = torch.tensor([[1.0, -2.0]]), torch.tensor([[7.0, 9.0]])
    p = guided_prior_map(g, l, 1)
    assert p.shape == (1, 2, 1, 1)
    torch.testing.assert_close(p[:, :, 0, 0], g)


# --------------------------------------------------------------------------- scheduler, closed form


def test_schedule_closed_form():
    s = DDIMScheduler()
    assert s.betas.dtype == torch.float32 and s.betas.shape == (T,)
    np.testing.assert_allclose(s.betas.double().numpy(), BETAS64, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(s.alphas_cumprod.double().numpy(), AC64, rtol=1e-4)
    # schedule buffers are not checkpointed
    assert "betas" not in s.state_dict() and "alphas_cumprod" not in s.state_dict()


@pytest.mark.parametrize(
    "steps, expected",
    [
        (10, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        (7, [852, 710, 568, 426, 284, 142, 0]),
        (1, [0]),
        (3, [666, 333, 0]),
    ],
)
def test_set_timesteps_leading(steps, expected):
    s = DDIMScheduler()
    out = s.set_timesteps(steps)
    assert out.tolist() == expected
    assert s.timesteps.tolist() == expected
    assert s.step_ratio == T // steps


@pytest.mark.parametrize("steps", [0, T + 1])
def test_set_timesteps_rejects_out_of_range(steps):
    with pytest.raises(ValueError, match=f"num_inference_steps must be in 1..{T}, got {steps}"):
        DDIMScheduler().set_timesteps(steps)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps, t", [(10, 900), (10, 500), (10, 100), (10, 0), (7, 852), (7, 142), (7, 0)])
def test_step_matches_hand_formula(steps, t, clip):
    rng = np.random.default_rng(steps * 1000 + t)
    y = rng.normal(size=(2, 3, 4, 4))
    e = rng.normal(size=(2, 3, 4, 4))
    s = DDIMScheduler(clip_sample=clip)
    s.set_timesteps(steps)
    out = s.step(torch.tensor(e, dtype=torch.float32), t, torch.tensor(y, dtype=torch.float32))
    assert out.dtype == torch.float32 and out.shape == y.shape
    np.testing.assert_allclose(out.double().numpy(), hand_step(y, e, t, T // steps, clip), rtol=1e-4, atol=1e-5)


def test_clip_changes_result_when_x0_out_of_range():
    # at t = 900 sqrt(alpha_bar) ~ 0.016: x0_hat of y = 1, eps = 0 is ~ 60, far outside [-1, 1]
    y, e = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    clipped, raw = DDIMScheduler(clip_sample=True), DDIMScheduler(clip_sample=False)
    clipped.set_timesteps(10)
    raw.set_timesteps(10)
    a_prev = AC64[800]
    assert clipped.step(e, 900, y).item() == pytest.approx(math.sqrt(a_prev) * 1.0, rel=1e-5)
    assert raw.step(e, 900, y).item() == pytest.approx(math.sqrt(a_prev / AC64[900]), rel=1e-4)


def test_last_step_uses_alpha_prev_one():
    # after t = 0, a_prev = 1: the output is x0_hat itself, with no noise component
    s = DDIMScheduler(clip_sample=False)
    s.set_timesteps(10)
    y = torch.tensor([[[[0.3]]], [[[-0.7]]]])
    e = torch.tensor([[[[2.0]]], [[[-1.0]]]])
    out = s.step(e, 0, y)
    expected = (y.double() - math.sqrt(1e-4) * e.double()) / math.sqrt(1 - 1e-4)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_add_noise_per_cell_t():
    b, c, k = 2, 3, 4
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(b, c, k, k, generator=g)
    eps = torch.randn(b, c, k, k, generator=g)
    t = torch.randint(0, T, (b, k, k), generator=g)
    t[0, 0, 0], t[1, 3, 3] = 0, T - 1
    out = DDIMScheduler().add_noise(y0, eps, t)
    assert out.shape == (b, c, k, k)
    for bi in range(b):
        for ci in range(c):
            for i in range(k):
                for j in range(k):
                    a = AC64[int(t[bi, i, j])]
                    ref = math.sqrt(a) * float(y0[bi, ci, i, j]) + math.sqrt(1 - a) * float(eps[bi, ci, i, j])
                    assert float(out[bi, ci, i, j]) == pytest.approx(ref, abs=1e-5)


def test_add_noise_per_sample_t():
    b, c, k = 3, 2, 3
    g = torch.Generator().manual_seed(1)
    y0 = torch.randn(b, c, k, k, generator=g)
    eps = torch.randn(b, c, k, k, generator=g)
    t = torch.tensor([0, 499, 999])
    out = DDIMScheduler().add_noise(y0, eps, t)
    for bi in range(b):
        a = AC64[int(t[bi])]
        ref = math.sqrt(a) * y0[bi].double() + math.sqrt(1 - a) * eps[bi].double()
        torch.testing.assert_close(out[bi].double(), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- scheduler vs diffusers


def diffusers_ddim(clip: bool = True):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDIMScheduler(
        num_train_timesteps=T,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=clip,
        set_alpha_to_one=True,
        timestep_spacing="leading",
        steps_offset=0,
        prediction_type="epsilon",
    )


@pytest.mark.parametrize("steps", [10, 7, 50])
def test_timesteps_match_diffusers(steps):
    ref = diffusers_ddim()
    ref.set_timesteps(steps)
    assert DDIMScheduler().set_timesteps(steps).tolist() == ref.timesteps.tolist()


def test_alphas_cumprod_match_diffusers():
    ref = diffusers_ddim()
    torch.testing.assert_close(DDIMScheduler().alphas_cumprod, ref.alphas_cumprod.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps", [10, 7])
def test_sampling_loop_matches_diffusers(steps, clip):
    ref = diffusers_ddim(clip)
    ours = DDIMScheduler(clip_sample=clip)
    g = torch.Generator().manual_seed(steps)
    mix = torch.randn(3, 3, generator=g) * 0.2  # fixed linear map across classes

    def fake_eps(y: torch.Tensor, t: int) -> torch.Tensor:
        return 0.3 * y + torch.einsum("oc,bchw->bohw", mix, y) + 0.01 * t / T

    y_ref = y_ours = torch.randn(2, 3, 3, 3, generator=g)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    for t_ref, t_ours in zip(ref.timesteps, ours.timesteps.tolist(), strict=True):
        y_ref = ref.step(fake_eps(y_ref, int(t_ref)), t_ref, y_ref, eta=0.0).prev_sample
        y_ours = ours.step(fake_eps(y_ours, t_ours), t_ours, y_ours)
        torch.testing.assert_close(y_ours, y_ref, rtol=0, atol=1e-5)
    assert torch.isfinite(y_ours).all()


def test_add_noise_matches_diffusers():
    ref = diffusers_ddim()
    g = torch.Generator().manual_seed(3)
    y0 = torch.randn(4, 3, 3, 3, generator=g)
    eps = torch.randn(4, 3, 3, 3, generator=g)
    t = torch.tensor([0, 17, 600, 999])
    torch.testing.assert_close(DDIMScheduler().add_noise(y0, eps, t), ref.add_noise(y0, eps, t), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- heterologous noise


def test_heterologous_noise_per_cell():
    torch.manual_seed(0)
    b, c, k = 4, 3, 6
    y0 = torch.nn.functional.one_hot(torch.tensor([0, 2, 1, 2]), c).float()
    s = DDIMScheduler()
    y_t, eps, t = heterologous_noise(s, y0, k)
    assert y_t.shape == (b, c, k, k) and eps.shape == (b, c, k, k) and t.shape == (b, k, k)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= T - 1
    # every cell has its own t: within one sample, the 36 cells carry (almost) all different t
    for bi in range(b):
        assert t[bi].unique().numel() >= 30
    assert not torch.equal(t[0], t[1])
    # Y_t = sqrt(a_t) Y_0 + sqrt(1 - a_t) eps, with Y_0 the label copied to every cell
    a = torch.tensor(AC64)[t][:, None]  # (B, 1, K, K) float64
    expected = a.sqrt() * y0.double()[:, :, None, None] + (1 - a).sqrt() * eps.double()
    torch.testing.assert_close(y_t.double(), expected, rtol=1e-5, atol=1e-5)


def test_heterologous_noise_eps_standard_normal():
    torch.manual_seed(1)
    y0 = torch.nn.functional.one_hot(torch.arange(64) % 4, 4).float()
    _, eps, t = heterologous_noise(DDIMScheduler(), y0, 6)
    assert eps.numel() == 64 * 4 * 36
    assert abs(eps.mean().item()) < 0.05
    assert abs(eps.std().item() - 1.0) < 0.05
    # t uniform over 0..T-1: mean ~ 499.5
    assert abs(t.float().mean().item() - 499.5) < 30
    # own noise per cell and per class channel
    assert eps.flatten(2).std(dim=2).min() > 0.3
    assert not torch.allclose(eps[:, 0], eps[:, 1])


# --------------------------------------------------------------------------- diffusion focal loss


@pytest.mark.parametrize(
    "logits, label, alpha, gamma, expected",
    [
        ([0.0, 0.0, 0.0, 0.0], 2, 10.0, 1.0, 8.5),  # p = 0.25: 1 + 10 * 0.75
        ([0.0, 0.0, 0.0, 0.0], 2, 10.0, 2.0, 6.625),  # 1 + 10 * 0.75^2
        ([1000.0, 0.0, 0.0, 0.0], 0, 10.0, 1.0, 1.0),  # p = 1
        ([1000.0, 0.0, 0.0, 0.0], 1, 10.0, 1.0, 11.0),  # p = 0
        ([math.log(3.0), 0.0], 0, 10.0, 1.0, 3.5),  # p = 0.75
        ([math.log(3.0), 0.0], 1, 4.0, 2.0, 1 + 4 * 0.5625),  # p = 0.25
    ],
)
def test_focal_weight_hand_values(logits, label, alpha, gamma, expected):
    y_fusion = torch.tensor([logits])
    y0 = torch.nn.functional.one_hot(torch.tensor([label]), len(logits)).float()
    w = focal_weight(y_fusion, y0, alpha, gamma)
    assert w.shape == (1,)
    assert w.item() == pytest.approx(expected, rel=1e-5)


def test_focal_weight_batch():
    y_fusion = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    y0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(focal_weight(y_fusion, y0, 10.0, 1.0), torch.tensor([3.5, 8.5]))


def test_focal_weight_multilabel_spec():
    # SPEC: p = mean over classes of sigmoid(y) where the label is 1 and 1 - sigmoid(y) where it is 0
    y_fusion = torch.tensor([[2.0, -2.0, 2.0], [2.0, 2.0, 0.0]])
    y0 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    s = 1 / (1 + math.exp(-2.0))
    expected = [1 + 10 * (1 - s), 1 + 10 * (1 - ((1 - s) + (1 - s) + 0.5) / 3)]
    w = focal_weight(y_fusion, y0, 10.0, 1.0, multilabel=True)
    assert w.tolist() == pytest.approx(expected, rel=1e-5)
    # a confident, correct DCG gives a weight near 1; the softmax version would not
    sure = focal_weight(torch.tensor([[9.0, -9.0, 9.0]]), torch.tensor([[1.0, 0.0, 1.0]]), 10.0, 1.0, multilabel=True)
    assert sure.item() == pytest.approx(1.0, abs=1e-2)


def test_diffusion_focal_loss_hand_value():
    # B = 2, C = 2, K = 1; squared errors sample 0: (1, 4), sample 1: (9, 0); w = (2, 0.5)
    eps = torch.zeros(2, 2, 1, 1)
    eps_hat = torch.tensor([[1.0, -2.0], [3.0, 0.0]]).view(2, 2, 1, 1)
    w = torch.tensor([2.0, 0.5])
    loss = diffusion_focal_loss(eps_hat, eps, w)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx((2 * (1 + 4) + 0.5 * (9 + 0)) / 4)
    # a larger grid: every cell counts in the mean
    eps_hat4 = eps_hat.expand(2, 2, 3, 3)
    assert diffusion_focal_loss(eps_hat4, torch.zeros(2, 2, 3, 3), w).item() == pytest.approx(3.625)


def test_diffusion_focal_loss_gradient():
    eps = torch.zeros(2, 1, 1, 1)
    eps_hat = torch.tensor([1.0, 1.0]).view(2, 1, 1, 1).requires_grad_()
    diffusion_focal_loss(eps_hat, eps, torch.tensor([3.0, 1.0])).backward()
    # d/d eps_hat of mean(w (eps_hat - eps)^2) = 2 w (eps_hat - eps) / N
    torch.testing.assert_close(eps_hat.grad.view(-1), torch.tensor([3.0, 1.0]))


# --------------------------------------------------------------------------- DDIM sampling


class FakeDenoiser(nn.Module):
    """eps_hat = 0.2 Y_t - 0.1 P + x_w + t / 2000, x_w = mean of the image per sample."""

    def __init__(self, c, k):
        super().__init__()
        self.num_classes, self.grid_size = c, k

    def encode(self, image, patches):
        return image.mean(dim=(1, 2, 3))[:, None]

    def denoise(self, x_w, y_in, t):
        c = self.num_classes
        assert t.shape == (y_in.shape[0], self.grid_size, self.grid_size) and t.dtype == torch.long
        return 0.2 * y_in[:, c:] - 0.1 * y_in[:, :c] + x_w[:, :, None, None] + t[:, None].float() / 2000


@pytest.mark.parametrize("steps", [10, 4])
def test_ddim_sample_matches_hand_loop(steps):
    b, c, k = 2, 2, 3
    g = torch.Generator().manual_seed(5)
    y_global, y_local = torch.randn(b, c, generator=g), torch.randn(b, c, generator=g)
    image = torch.rand(b, 3, 16, 16, generator=g) * 0.1
    start = torch.rand(2, b, c, generator=g)
    denoiser = FakeDenoiser(c, k)
    out = ddim_sample(
        denoiser,
        DDIMScheduler(),
        denoiser.encode(image, None),
        guided_prior_map(y_global, y_local, k),
        guided_prior_map(start[0], start[1], k)[None],
        steps,
    )

    def grid(gv, lv):  # hand guided map (float64)
        d = np.abs(np.arange(k)[:, None] - np.arange(k)[None, :]) / (k - 1)
        return (1 - d) * gv[:, :, None, None] + d * lv[:, :, None, None]

    prior = grid(y_global.double().numpy(), y_local.double().numpy())
    y = grid(start[0].double().numpy(), start[1].double().numpy())  # Y_T from the uniform start vectors
    x_w = image.double().mean(dim=(1, 2, 3)).numpy()[:, None, None, None]
    ratio = T // steps
    for t in range(ratio * (steps - 1), -1, -ratio):
        e = 0.2 * y - 0.1 * prior + x_w + t / 2000
        y = hand_step(y, e, t, ratio, clip=True)
    assert out.shape == (1, b, c, k, k)
    np.testing.assert_allclose(out[0].double().numpy(), y, rtol=1e-4, atol=1e-5)


@pytest.fixture
def small_models(make_dcg, make_denoiser):
    return make_dcg().eval(), make_denoiser().eval()


def count_calls(**modules: nn.Module) -> dict[str, int]:
    counts = dict.fromkeys(modules, 0)
    for name, module in modules.items():
        module.register_forward_hook(lambda *args, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


@torch.no_grad()
def authors_sampling_loop(dcg, denoiser, scheduler, image, y_t, steps):
    """The authors' sampler (validation_step and SR3Sampler.sample_high_res): the DCG and the prior map once per
    batch, both encoders again at every DDIM step (their denoiser's forward encodes the image and the patches)."""
    k = denoiser.grid_size
    scheduler.set_timesteps(steps)
    out = dcg(image)
    prior = guided_prior_map(out.y_global, out.y_local, k)
    for t in scheduler.timesteps.tolist():
        t_cells = torch.full((image.shape[0], k, k), t, dtype=torch.long)
        y_t = scheduler.step(denoiser(image, out.patches, torch.cat([prior, y_t], dim=1), t_cells), t, y_t)
    return y_t


def test_sampling_with_the_encoders_once_equals_the_authors_loop(small_models):
    """SPEC 6: both encoders depend only on the image. Computed once, they give the same grid as the authors'
    loop that recomputes them at every step."""
    dcg, denoiser = small_models
    counts = count_calls(dcg=dcg, image=denoiser.image_encoder, patch=denoiser.patch_encoder)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 64, 64, generator=g)
    start = torch.rand(2, 2, 3, generator=g)
    y_start, steps = guided_prior_map(start[0], start[1], 3), 10

    with torch.no_grad():
        out = dcg(image)
        cached = ddim_sample(
            denoiser,
            DDIMScheduler(),
            denoiser.encode(image, out.patches),
            guided_prior_map(out.y_global, out.y_local, 3),
            y_start[None],
            steps,
        )[0]
    assert counts == {"dcg": 1, "image": 1, "patch": 1}
    counts.update(dcg=0, image=0, patch=0)
    reference = authors_sampling_loop(dcg, denoiser, DDIMScheduler(), image, y_start, steps)
    assert counts == {"dcg": 1, "image": steps, "patch": steps}
    assert cached.shape == (2, 3, 3, 3) and torch.isfinite(cached).all()
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-6)
    # the sample depends on its start
    other = ddim_sample(
        denoiser,
        DDIMScheduler(),
        denoiser.encode(image, out.patches),
        guided_prior_map(out.y_global, out.y_local, 3),
        y_start.flip(0)[None] * 0.5,
        steps,
    )[0]
    assert not torch.allclose(other, cached)


def test_ddim_sample_several_starts_equal_separate_runs(small_models):
    """(S, B, C, K, K) starts: all S samples of every image in one batched loop, each the same as a
    separate single-start run; the condition and the prior are given once per image."""
    dcg, denoiser = small_models
    g = torch.Generator().manual_seed(3)
    image = torch.randn(2, 3, 64, 64, generator=g)
    y_start = torch.rand(4, 2, 3, 3, 3, generator=g)
    with torch.no_grad():
        out = dcg(image)
        condition, prior = denoiser.encode(image, out.patches), guided_prior_map(out.y_global, out.y_local, 3)
    grids = ddim_sample(denoiser, DDIMScheduler(), condition, prior, y_start, 5)
    assert grids.shape == (4, 2, 3, 3, 3)
    for s in range(4):
        single = ddim_sample(denoiser, DDIMScheduler(), condition, prior, y_start[s : s + 1], 5)
        torch.testing.assert_close(grids[s], single[0], rtol=0, atol=1e-5)
    assert not torch.allclose(grids[0], grids[1])
    with pytest.raises(AssertionError, match="y_start must be"):
        ddim_sample(denoiser, DDIMScheduler(), condition, prior, torch.rand(4, 3, 3, 3, 3), 5)
    with pytest.raises(AssertionError, match="condition has 1 rows"):
        ddim_sample(denoiser, DDIMScheduler(), condition[:1], prior, y_start, 5)
