"""DiffMIC (v1) beside DiffMIC-v2: CARD's forward process and posterior against their closed forms, v1's MMD
kernel against hand-computed values, the EMA update, shapes and gradients of the training step, the number of
denoiser calls per sampled image, checkpoints with a frozen and a fine-tuned DCG, and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import TINY, cli, ok

from diffmic.config import ConfigError, load_config
from diffmic.methods import METHODS, build_system
from diffmic.v1 import DiffMICv1
from diffmic.v1.card import CARDScheduler, card_sample, gaussian_kernel, mmd
from diffmic.v1.ema import EMA
from diffmic.v1.model import DenoiserV1

V1 = ["model.method=diffmic_v1", "v1.feature_dim=16", "data.num_classes=3", "data.class_names=null"]


def small_v1(*overrides: str) -> DiffMICv1:
    torch.manual_seed(0)
    return build_system(load_config(None, [*V1, *overrides]))


def test_forward_process_matches_its_closed_form():
    scheduler = CARDScheduler(1000, 1e-4, 0.02)
    y0, y_hat, eps = torch.eye(3)[[0, 2]], torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]), torch.randn(2, 3)
    t = torch.tensor([0, 999])
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].float()[:, None]
    expected = alpha_bar.sqrt() * y0 + (1 - alpha_bar.sqrt()) * y_hat + (1 - alpha_bar).sqrt() * eps
    torch.testing.assert_close(scheduler.add_noise(y0, y_hat, eps, t), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("timesteps", "beta_end"), [(1000, 0.02), (200, 0.02), (50, 0.5)])
def test_add_noise_sqrt_one_minus_alpha_bar_is_exact_to_float32(timesteps, beta_end):
    """The noise's coefficient sqrt(1 - alpha_bar_t) of add_noise, at every t, within 1e-7 of the float64 value from
    the same (float32) alpha_bar. Through sqrt(1 - sqrt(alpha_bar)^2) it was off by up to 1.3e-6 at small t."""
    scheduler = CARDScheduler(timesteps, 1e-4, beta_end)
    t = torch.arange(timesteps)
    zeros = torch.zeros(timesteps, 1)
    coefficient = scheduler.add_noise(zeros, zeros, torch.ones(timesteps, 1), t)[:, 0].double()
    exact = (1 - scheduler.alphas_cumprod.double()).sqrt()
    assert (coefficient - exact).abs().max() < 1e-7


def test_y_T_marginal_is_normal_around_the_prior():
    """q(y_T | y_0, y_hat) ~ N(y_hat, I) at T = 1000: its mean drifts from the label to the DCG prior."""
    scheduler = CARDScheduler(1000, 1e-4, 0.02)
    torch.manual_seed(0)
    n = 200_000
    y0, y_hat = torch.eye(3)[0].expand(n, 3), torch.tensor([0.1, 0.3, 0.6]).expand(n, 3)
    y_T = scheduler.add_noise(y0, y_hat, torch.randn(n, 3), torch.full((n,), 999))
    torch.testing.assert_close(y_T.mean(0), y_hat[0], atol=0.01, rtol=0)
    torch.testing.assert_close(y_T.var(0), torch.ones(3), atol=0.01, rtol=0)


@pytest.mark.parametrize("t", [1, 2, 100, 999])
def test_posterior_is_the_gaussian_product_of_the_two_forward_factors(t):
    """q(y_{t-1} | y_t, y_0): the product of q(y_{t-1} | y_0) = N(sqrt(ab') y_0 + (1 - sqrt(ab')) y_hat, 1 - ab')
    and q(y_t | y_{t-1}) = N(sqrt(a) y_{t-1} + (1 - sqrt(a)) y_hat, 1 - a), solved by completing the square."""
    scheduler = CARDScheduler(1000, 1e-4, 0.02).double()
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, 0)  # consistent in float64: a formula test
    a, ab_prev = scheduler.alphas[t], scheduler.alphas_cumprod[t - 1]  # the formulas, not float32's rounding
    y0, y_t, y_hat = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 3)
    y_hat = y_hat.double()
    prior_mean, prior_var = ab_prev.sqrt() * y0 + (1 - ab_prev.sqrt()) * y_hat, 1 - ab_prev
    precision = a / (1 - a) + 1 / prior_var
    mean = (a.sqrt() / (1 - a) * (y_t - (1 - a.sqrt()) * y_hat) + prior_mean / prior_var) / precision
    got_mean, got_var = scheduler.posterior(y0, y_t, y_hat, t)
    torch.testing.assert_close(got_mean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_var.squeeze().double(), 1 / precision, rtol=1e-4, atol=1e-9)


def test_the_last_step_returns_y0_hat_and_a_true_eps_recovers_y0():
    scheduler = CARDScheduler(50, 1e-4, 0.02)
    y0, y_hat, eps = torch.eye(3)[[1, 2]], torch.rand(2, 3), torch.randn(2, 3)
    for t in (0, 10, 49):
        y_t = scheduler.add_noise(y0, y_hat, eps, torch.full((2,), t))
        torch.testing.assert_close(scheduler.predict_y0(y_t, eps, y_hat, t), y0, rtol=0, atol=1e-4)
    torch.testing.assert_close(
        scheduler.step(eps, 0, scheduler.add_noise(y0, y_hat, eps, torch.zeros(2).long()), y_hat, None),
        y0,
        rtol=0,
        atol=1e-5,
    )


def test_antithetic_timesteps_pair_up():
    scheduler = CARDScheduler(100)
    torch.manual_seed(0)
    t = scheduler.timesteps_antithetic(9)
    assert t.shape == (9,) and t.min() >= 0 and t.max() <= 99
    torch.testing.assert_close(t[5:9], 99 - t[:4])


def test_mmd_kernel_against_hand_computed_values():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0, 2.0]])
    # k(x_i, y_j) = exp(-mean_d (x_id - y_jd)^2 / D), D = 2: ((0 + 4) / 2) / 2 = 1 and ((1 + 1) / 2) / 2 = 0.5
    torch.testing.assert_close(gaussian_kernel(x, y), torch.tensor([[math.exp(-1.0)], [math.exp(-0.5)]]))
    # k(x, x): 1 on the diagonal, exp(-((1 + 1) / 2) / 2) off it
    kxx = (2 + 2 * math.exp(-0.5)) / 4
    expected = kxx + 1.0 - 2 * (math.exp(-1.0) + math.exp(-0.5)) / 2
    assert mmd(x, y).item() == pytest.approx(expected, rel=1e-6)
    assert mmd(x, x).item() == pytest.approx(0.0, abs=1e-7)


def test_ema_update_follows_its_formula_on_parameters_and_copies_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9)
    before = [p.detach().clone() for p in ema.average.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(4, 3))  # the BatchNorm statistics move
    ema.update(model)
    for old, new, live in zip(before, ema.average.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * live.detach())
    torch.testing.assert_close(ema.average[1].running_mean, model[1].running_mean)
    assert not any(p.requires_grad for p in ema.average.parameters())


def test_training_step_shapes_gradients_and_joint_dcg_training():
    system = small_v1("v1.joint_train=true")
    system.log = lambda *args, **kwargs: None
    system.train()
    batch = {"image": torch.randn(4, 3, 64, 64), "label": torch.tensor([0, 1, 2, 1])}
    loss = system.training_step(batch, 0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in system.denoiser.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in system.dcg.parameters()), "joint training"
    assert not system.dcg.training, "the DCG computes the priors in eval mode and returns to it"
    assert all(p.grad is None for p in system.ema.parameters())


def test_training_step_with_the_authors_resnet50_dcg():
    """The authors' v1 DCG (ResNet-50 trunks): the three priors, the loss and the joint DCG step, at 64 px."""
    system = small_v1("v1.joint_train=true", "dcg.backbone=resnet50")
    assert system.dcg.saliency_conv.in_channels == system.dcg.mil.classifier.in_features == 2048
    system.log = lambda *args, **kwargs: None
    system.train()
    image = torch.randn(4, 3, 64, 64)
    priors = system.priors(image)
    assert all(p.shape == (4, 3) and torch.isfinite(p).all() for p in priors)
    loss = system.training_step({"image": image, "label": torch.tensor([0, 1, 2, 1])}, 0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for part in (system.dcg.global_trunk, system.dcg.local_trunk, system.dcg.mil, system.denoiser):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_a_checkpoint_of_the_other_dcg_trunk_is_refused_by_name():
    """A checkpoint holding a fine-tuned DCG of the other trunk: a ConfigError naming dcg.backbone, not a state
    dict of other widths; a checkpoint whose stored config predates the key holds a ResNet-18 DCG."""
    trained = small_v1("dcg.backbone=resnet50")
    content = {"state_dict": trained.state_dict(), "hyper_parameters": {"cfg": trained.cfg}}
    with pytest.raises(ConfigError, match=r"^config key dcg.backbone: .* resnet50 DCG, .* set dcg.backbone=resnet50$"):
        small_v1().load_checkpoint_file("v1.ckpt", checkpoint=content)
    older = small_v1()
    cfg = {**older.cfg, "dcg": {k: v for k, v in older.cfg["dcg"].items() if k != "backbone"}}
    content = {"state_dict": older.state_dict(), "hyper_parameters": {"cfg": cfg}}
    small_v1().load_checkpoint_file("older.ckpt", checkpoint=content)
    with pytest.raises(ConfigError, match="set dcg.backbone=resnet18"):
        trained.load_checkpoint_file("older.ckpt", checkpoint=content)


def test_frozen_dcg_gets_no_gradient():
    system = small_v1("v1.joint_train=false")
    system.log = lambda *args, **kwargs: None
    system.train()
    loss = system.training_step({"image": torch.randn(4, 3, 64, 64), "label": torch.tensor([0, 1, 2, 1])}, 0)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in system.dcg.parameters())


@pytest.mark.parametrize(("steps", "samples"), [(1, 1), (7, 1), (5, 3)])
def test_one_denoiser_call_per_step_and_the_encoder_once(steps, samples):
    system = small_v1(f"v1.sampling_steps={steps}", f"diffusion.eval_samples={samples}").eval()
    calls = {"denoise": 0, "encode": 0}
    for name in calls:
        original = getattr(system.denoiser, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(system.denoiser, name, counted)
    out = system.evaluate_batch({"image": torch.randn(2, 3, 64, 64), "index": torch.tensor([3, 8])})
    assert calls == {"denoise": steps, "encode": 1}  # each call handles all S samples of the batch
    assert out["scores"].shape == (2, 3) and torch.isfinite(out["scores"]).all()
    torch.testing.assert_close(out["scores"].sum(1), torch.ones(2))
    assert out["spread"].shape == (2,)
    # v1's spread is over the samples: undefined with one, never a made-up 0
    assert torch.isnan(out["spread"]).all() == (samples == 1) and torch.isnan(out["sample_spread"]).all() == (
        samples == 1
    )


def test_sampling_matches_the_authors_loop_with_the_encoder_every_step():
    """card_sample (encoder once) against a transcription of the authors' p_sample_loop, which runs the whole
    model at every step, with the same noise."""
    torch.manual_seed(0)
    model = DenoiserV1(3, 20, 8).eval()
    scheduler = CARDScheduler(20)
    image, y_hat, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 3).softmax(1), torch.randn(6, 1, 2, 3)
    with torch.no_grad():
        ours = card_sample(model, scheduler, model.encode(image), y_hat, noise)[0]
        betas = torch.linspace(1e-4, 0.02, 20)
        alphas, one_minus_sqrt = 1 - betas, (1 - torch.cumprod(1 - betas, 0)).sqrt()
        y = noise[0, 0] + y_hat
        for k, t in enumerate(range(5, 0, -1)):
            s_t, s_prev = one_minus_sqrt[t], one_minus_sqrt[t - 1]
            r_t, r_prev = (1 - s_t.square()).sqrt(), (1 - s_prev.square()).sqrt()
            g0 = (1 - alphas[t]) * r_prev / s_t.square()
            g1 = s_prev.square() * alphas[t].sqrt() / s_t.square()
            g2 = 1 + (r_t - 1) * (alphas[t].sqrt() + r_prev) / s_t.square()
            eps = model(image, y, y_hat, torch.full((2,), t))
            y0 = (y - (1 - r_t) * y_hat - eps * s_t) / r_t
            y = (
                g0 * y0
                + g1 * y
                + g2 * y_hat
                + (s_prev.square() / s_t.square() * (1 - alphas[t])).sqrt() * noise[k + 1, 0]
            )
        r_0 = (1 - one_minus_sqrt[0].square()).sqrt()
        y = (y - (1 - r_0) * y_hat - model(image, y, y_hat, torch.zeros(2).long()) * one_minus_sqrt[0]) / r_0
    torch.testing.assert_close(ours, y, rtol=1e-4, atol=1e-5)


def test_image_noise_does_not_depend_on_the_batch():
    system = small_v1("v1.sampling_steps=4").eval()
    images = torch.randn(3, 3, 64, 64)
    whole = system.sample(images, torch.tensor([0, 1, 2]))
    part = system.sample(images[1:], torch.tensor([1, 2]))
    torch.testing.assert_close(whole[:, 1:], part, rtol=1e-5, atol=1e-6)


def test_evaluate_with_the_ema_weights():
    system = small_v1("v1.sampling_steps=3", "v1.evaluate_ema=true").eval()
    with torch.no_grad():
        for p in system.ema.average.parameters():
            p.zero_()  # an average that differs from the trained weights
    batch = {"image": torch.randn(2, 3, 64, 64), "index": torch.tensor([0, 1])}
    with_ema = system.evaluate_batch(batch)["scores"]
    system.cfg["v1"]["evaluate_ema"] = False
    assert not torch.allclose(with_ema, system.evaluate_batch(batch)["scores"])


def test_a_diverged_sample_scores_uniform_instead_of_nan():
    system = small_v1("v1.sampling_steps=3").eval()
    system._start()
    system.denoiser.lin4.bias.data.fill_(float("inf"))
    out = system.evaluate_batch({"image": torch.randn(2, 3, 64, 64), "index": torch.tensor([0, 1])})
    torch.testing.assert_close(out["scores"], torch.full((2, 3), 1 / 3))
    assert system._diverged == 2


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("v1.sampling_steps=201", "v1.sampling_steps"),  # the demo's diffusion.timesteps is 200
        ("v1.ema_decay=1.0", "v1.ema_decay"),
        ("v1.warmup_epochs=10", "v1.warmup_epochs"),  # the demo trains 10 epochs
        ("v1.encoder=vit", "v1.encoder"),
        ("data.task=multilabel", "model.method"),
    ],
)
def test_v1_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, ["model.method=diffmic_v1", override])


def test_v2_configs_may_leave_v1_keys_at_any_value():
    load_config(None, ["v1.sampling_steps=5000"])  # the demo's diffusion.timesteps is 200: not checked for v2


def test_registry():
    assert set(METHODS) == {"diffmic_v1", "diffmic_v2"}
    assert isinstance(small_v1(), DiffMICv1)


@pytest.fixture(scope="module")
def v1_run(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs_v1")
    args = [f"trainer.log_dir={logs}", *TINY, "model.method=diffmic_v1", "v1.sampling_steps=20", "v1.warmup_epochs=1"]
    ok(cli("fit", *args))
    return logs, args


@pytest.mark.slow
def test_v1_fit_then_validate_and_test_from_best_give_the_same_metrics(v1_run, tmp_path):
    logs, args = v1_run
    run = logs / "demo" / "version_0"
    fit = json.loads((run / "metrics.json").read_text())
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    keys = checkpoint["state_dict"].keys()
    assert any(k.startswith("dcg.") for k in keys), "a fine-tuned DCG (v1.joint_train) lives in the checkpoint"
    assert any(k.startswith("ema.average.") for k in keys)
    assert checkpoint["hyper_parameters"]["cfg"]["model"]["method"] == "diffmic_v1"
    ok(cli("validate", "--ckpt", "best", "--out", str(tmp_path / "val.json"), *args))
    ok(cli("test", "--ckpt", "best", "--out", str(tmp_path / "test.json"), *args))
    assert json.loads((tmp_path / "val.json").read_text())["val"] == pytest.approx(fit["val"], abs=1e-9, nan_ok=True)
    assert json.loads((tmp_path / "test.json").read_text())["test"] == pytest.approx(fit["test"], abs=1e-9, nan_ok=True)
    ok(cli("predict", "--ckpt", "best", "--out", str(tmp_path / "pred.csv"), *args))
    assert len((tmp_path / "pred.csv").read_text().splitlines()) == 1 + 24


@pytest.mark.slow
def test_a_v1_checkpoint_refuses_a_v2_config(v1_run, tmp_path):
    logs, args = v1_run
    v2_args = [a for a in args if a != "model.method=diffmic_v1"]
    result = cli("test", "--ckpt", str(logs / "demo" / "version_0" / "checkpoints" / "best.ckpt"), *v2_args)
    assert result.returncode == 2 and "model.method=diffmic_v1" in result.stderr
    with pytest.raises(ConfigError, match="diffmic_v1"):
        METHODS["diffmic_v2"].load_from_checkpoint(logs / "demo" / "version_0" / "checkpoints" / "best.ckpt")
    system = DiffMICv1.load_from_checkpoint(logs / "demo" / "version_0" / "checkpoints" / "best.ckpt")
    assert not system.training


@pytest.mark.slow
def test_a_v1_demo_fit_with_the_authors_resnet50_dcg(tmp_path, capsys):
    """The demo with v1's own DCG, then its checkpoint and DCG file with a ResNet-18 config: each refused with one
    error line naming dcg.backbone (exit 2), before any state dict is compared."""
    import diffuser_trainer

    logs = tmp_path / "logs"
    args = [
        f"trainer.log_dir={logs}",
        *TINY,
        "data.synthetic.num_train=32",
        "data.synthetic.num_val=16",
        "data.synthetic.num_test=16",
        "trainer.max_epochs=1",
        "model.method=diffmic_v1",
        "v1.feature_dim=16",
        "v1.sampling_steps=2",
        "v1.warmup_epochs=0",
        "v1.joint_train=false",  # the joint step is tested above; a frozen DCG keeps the checkpoints small
    ]
    ok(cli("fit", *args, "dcg.backbone=resnet50"))
    metrics = json.loads((logs / "demo" / "version_0" / "metrics.json").read_text())
    assert math.isfinite(metrics["test"]["acc"])
    dcg_file = torch.load(logs / "demo" / "dcg.pt", map_location="cpu", weights_only=True)
    assert dcg_file["meta"]["backbone"] == "resnet50"
    assert dcg_file["state_dict"]["saliency_conv.weight"].shape == (4, 2048, 1, 1)
    best = logs / "demo" / "version_0" / "checkpoints" / "best.ckpt"
    assert torch.load(best, map_location="cpu", weights_only=True)["hyper_parameters"]["cfg"]["dcg"]["backbone"] == (
        "resnet50"
    )
    capsys.readouterr()
    for command in (["test", "--ckpt", str(best)], ["fit"]):  # the checkpoint; the run's DCG file
        assert diffuser_trainer.main([*command, *args, "dcg.backbone=resnet18"]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
        assert len(lines) == 1 and "config key dcg.backbone:" in lines[0] and "dcg.backbone=resnet50" in lines[0]


@pytest.mark.slow
def test_a_v1_run_resumes_from_last(v1_run):
    """--ckpt last: the fine-tuned DCG comes back from the checkpoint, the run continues in its version folder."""
    logs, args = v1_run
    ok(cli("fit", "--ckpt", "last", *args, "trainer.max_epochs=3"))
    checkpoint = torch.load(
        logs / "demo" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert checkpoint["epoch"] == 2


def test_v1_probabilities_and_sample_uncertainty():
    """v1's scores are already probabilities (the mean of S softmax vectors); agreement and sample_spread over S."""
    system = small_v1("v1.sampling_steps=3", "diffusion.eval_samples=4").eval()
    system._start()
    batch = {"image": torch.randn(2, 3, 64, 64), "index": torch.tensor([0, 1])}
    out = system.evaluate_batch(batch)
    torch.testing.assert_close(out["probs"].sum(dim=1), torch.ones(2))
    with torch.no_grad():
        samples = system.sample(batch["image"], batch["index"])  # (S, B, C)
    predicted = out["scores"].argmax(dim=1)
    torch.testing.assert_close(out["agreement"], (samples.argmax(dim=2) == predicted).float().mean(dim=0))
    torch.testing.assert_close(out["sample_spread"], out["spread"])  # v1's spread was over the samples already
