"""The fast path and its benchmark: Lightning's bf16-mixed autocasts every step on the CPU while the loss, the DDIM
scheduler and the scores stay float32; the float32 path computes what it did before; the FLOP count of sampling
with the encoders once is exactly the DCG and encoders once plus the body steps; benchmarks/speed.py runs."""

import json

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import diffmic.v2.model as model
from benchmarks import speed
from diffmic.config import load_config
from diffmic.v2.pipeline import (
    DDIMScheduler,
    diffusion_focal_loss,
    focal_weight,
    guided_prior_map,
    heterologous_noise,
    one_hot,
)
from diffmic.v2.system import DiffMICv2
from pretraining.train_dcg import pretraining_precision

# a denoiser small enough for unit tests, at the demo's 64 px
TINY = [
    "data.image_size=64",
    "data.num_classes=3",
    "data.class_names=null",
    "dcg.num_rois=3",
    "model.image_encoder=vit_t",
    "model.feature_dim=16",
    "diffusion.timesteps=200",
]


def tiny_system(*overrides: str) -> DiffMICv2:
    torch.manual_seed(0)
    return DiffMICv2(load_config(None, [*TINY, *overrides]))


def tiny_batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 3, 64, 64, generator=g), "label": torch.arange(n) % 3, "index": torch.arange(n)}


@pytest.mark.slow
def test_lightning_bf16_mixed_autocasts_training_and_every_evaluation_step_on_the_cpu():
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", logger=False, enable_checkpointing=False)
    plugin = trainer.precision_plugin
    for context in (plugin.train_step_context, plugin.val_step_context, plugin.test_step_context):
        with context():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with plugin.predict_step_context():
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def test_the_scheduler_step_stays_float32_under_autocast():
    scheduler = DDIMScheduler(200)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    y_t, eps_hat = torch.randn(2, 3, 3, 3, generator=g), torch.randn(2, 3, 3, 3, generator=g).bfloat16()
    expected = scheduler.step(eps_hat.float(), 180, y_t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scheduler.step(eps_hat, 180, y_t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_bf16_training_and_sampling_run_on_the_cpu_with_float32_loss_and_scores():
    system = tiny_system()
    batch = tiny_batch()
    system.train()
    with speed.precision_context("bf16-mixed", torch.device("cpu")):
        loss = system.training_loss(batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in system.denoiser.parameters())
    assert system.denoiser.cc2.conv.weight.grad.abs().sum() > 0  # through the bf16 matrix-product form
    system.eval()
    with torch.no_grad(), speed.precision_context("bf16-mixed", torch.device("cpu")):
        out = system.evaluate_batch(batch)
    assert out["scores"].dtype == torch.float32 and torch.isfinite(out["scores"]).all()
    assert out["spread"].dtype == torch.float32 and torch.isfinite(out["spread"]).all()


def test_pointwise_is_the_convolution_in_float32_and_its_matrix_product_under_autocast():
    torch.manual_seed(0)
    conv, x = nn.Conv2d(8, 5, 1), torch.randn(2, 8, 3, 3)
    reference = conv(x)
    assert torch.equal(model.pointwise(conv, x), reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.pointwise(conv, x)
    assert low.dtype == torch.bfloat16 and low.shape == reference.shape
    torch.testing.assert_close(low.float(), reference, rtol=0.03, atol=0.03)
    cache = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = model.pointwise(conv, x, cache=cache)
        cached = cache[conv]
        assert cached.dtype == torch.bfloat16 and torch.equal(model.pointwise(conv, x, cache=cache), first)
        assert cache[conv] is cached  # cast once, reused by every later step
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.pointwise(conv, x, cache=cache)
    assert cache[conv] is cached, "with gradients the weight is cast afresh, never read from or put in the cache"


def test_the_denoiser_keeps_its_cast_weights_for_one_sampled_batch_only():
    """DiffMICv2.sample_grids: the body's 1x1 weights cast once for all DDIM steps, held by the denoiser itself (no
    module-level state) and dropped after the batch."""
    denoiser = tiny_system().denoiser.eval()
    x_w, y_in, t = torch.randn(2, 16), torch.rand(2, 6, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = denoiser.denoise(x_w, y_in, t)
        with denoiser.reuse_pointwise_weights():
            assert torch.equal(denoiser.denoise(x_w, y_in, t), plain)
            held = dict(denoiser.cast_weights)
            assert set(held) == {denoiser.cc2.conv, denoiser.cc3.conv}  # cc1 and out stay float32 (low_precision)
            with denoiser.reuse_pointwise_weights():  # nested: the same copies
                denoiser.denoise(x_w, y_in, t)
                assert all(denoiser.cast_weights[conv] is w for conv, w in held.items())
            assert torch.equal(denoiser.denoise(x_w, y_in, t), plain)
    assert denoiser.cast_weights is None


def test_the_label_space_layers_stay_float32_under_autocast_and_the_feature_layers_run_in_bf16():
    """cc1 reads P and Y_t, out writes eps_hat: under bf16 autocast both compute what they compute in float32, so a
    change of Y_t far below bf16's resolution still reaches the network; cc2 (F x F) is rounded to bf16."""
    denoiser = tiny_system().denoiser.eval()
    g = torch.Generator().manual_seed(2)
    x_w, y_in = torch.randn(2, 16, generator=g), torch.rand(2, 6, 3, 3, generator=g) + 0.5
    t, h = torch.randint(0, 200, (2, 3, 3), generator=g), torch.randn(2, 16, 3, 3, generator=g)
    nudged = y_in.clone()
    nudged[:, 3:] += 2**-14  # Y_t in [0.5, 1.5): bf16's spacing there is 2^-8 or 2^-7
    with torch.no_grad():
        reference = (denoiser.cc1(y_in, t), denoiser.cc2(h, t), denoiser.out(h), denoiser.denoise(x_w, y_in, t))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cc1, cc1_nudged, cc2 = denoiser.cc1(y_in, t), denoiser.cc1(nudged, t), denoiser.cc2(h, t)
            out, eps_hat = model.pointwise(denoiser.out, h, low_precision=False), denoiser.denoise(x_w, y_in, t)
    assert torch.equal(cc1, reference[0]) and not torch.equal(cc1_nudged, cc1)
    assert torch.equal(out, reference[2]) and eps_hat.dtype == torch.float32
    assert not torch.equal(cc2, reference[1])  # the F x F product ran in bf16
    torch.testing.assert_close(cc2, reference[1], rtol=0.05, atol=0.05)
    torch.testing.assert_close(eps_hat, reference[3], rtol=0.05, atol=0.05)


def test_the_dcg_guides_in_float32_under_bf16_autocast_in_training_and_sampling():
    """Under bf16-mixed the frozen DCG still runs in float32: the training loss is the one computed from the float32
    DCG's outputs, with only the denoiser under autocast, and `guide` returns the float32 DCG's outputs exactly."""
    system = tiny_system()
    batch = tiny_batch()
    system.train()
    cpu = torch.device("cpu")
    with torch.no_grad():
        reference = system.dcg(batch["image"])
    torch.manual_seed(5)
    with speed.precision_context("bf16-mixed", cpu):
        loss = system.training_loss(batch)
        guide = system.guide(batch["image"])
    for ours, theirs in zip(guide, reference, strict=True):
        assert ours is None or (ours.dtype == theirs.dtype and torch.equal(ours, theirs))
    torch.manual_seed(5)
    y0 = one_hot(batch["label"], 3)
    prior = guided_prior_map(reference.y_global, reference.y_local, 3)
    y_t, eps, t = heterologous_noise(system.scheduler, y0, 3)
    with speed.precision_context("bf16-mixed", cpu):
        eps_hat = system.denoiser(batch["image"], reference.patches, torch.cat([prior, y_t], dim=1), t)
    expected = diffusion_focal_loss(eps_hat.float(), eps, focal_weight(reference.y_fusion, y0, 10.0, 1.0))
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def test_float32_training_loss_and_sampling_are_those_of_the_code_before_the_fast_path():
    """The reference is the code before this change, written out: the loss inline in training_step, the prior map
    from the DCG's outputs as they come, the DDIM step without casts, the authors' re-encoding loop."""
    system = tiny_system("model.condition_init=default")
    batch = tiny_batch()
    system.train()
    torch.manual_seed(5)
    loss = system.training_loss(batch)
    torch.manual_seed(5)
    y0 = one_hot(batch["label"], 3)
    with torch.no_grad():
        guide = system.dcg(batch["image"])
    prior = guided_prior_map(guide.y_global, guide.y_local, 3)
    y_t, eps, t = heterologous_noise(system.scheduler, y0, 3)
    eps_hat = system.denoiser(batch["image"], guide.patches, torch.cat([prior, y_t], dim=1), t)
    reference = diffusion_focal_loss(eps_hat, eps, focal_weight(guide.y_fusion, y0, 10.0, 1.0))
    torch.testing.assert_close(loss, reference, rtol=0, atol=0)

    system.eval()
    once = speed.sample_once(system, batch, "32-true")
    with torch.no_grad():
        guide = system.dcg(batch["image"])
        prior = guided_prior_map(guide.y_global, guide.y_local, 3)
        noise = speed.start_noise(system.cfg["seed"], batch["index"], (2, 1, 3))
        y = guided_prior_map(noise[:, 0, 0], noise[:, 1, 0], 3)
        scheduler = system.scheduler
        scheduler.set_timesteps(10)
        for step in scheduler.timesteps.tolist():
            cells = torch.full((4, 3, 3), step, dtype=torch.long)
            e = system.denoiser(batch["image"], guide.patches, torch.cat([prior, y], dim=1), cells)
            a_t = scheduler.alphas_cumprod[step]
            a_prev = scheduler.alphas_cumprod[step - 20] if step >= 20 else torch.tensor(1.0)
            x0 = ((y - (1 - a_t).sqrt() * e) / a_t.sqrt()).clamp(-1, 1)
            y = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    torch.testing.assert_close(once, y, rtol=0, atol=1e-6)
    assert torch.equal(once, speed.sample_reencoding(system, batch, "32-true"))  # what the benchmark times


def test_sampling_flops_are_the_dcg_and_encoders_once_plus_the_body_steps():
    system = tiny_system("diffusion.eval_samples=2")
    flops = speed.flop_report(system, tiny_batch(2), steps=4)
    assert flops["identity_holds"]
    for s in (1, 2):
        once, again = flops[f"sample_once_steps4_S{s}"], flops[f"sample_reencode_steps4_S{s}"]
        assert once == flops["dcg"] + flops["encoders"] + 4 * s * flops["body_step"]
        # the authors' sampler: their DCG once per batch, their denoiser's encoders at every step
        assert again == flops["dcg"] + 4 * s * (flops["encoders"] + flops["body_step"])
    assert flops["train_step"] == flops["train_parts_sum"]
    assert system.cfg["diffusion"]["eval_samples"] == 2 and system.cfg["diffusion"]["sampling_steps"] == 10


def test_compile_is_opt_in_and_keeps_the_parameter_names():
    plain, compiled = tiny_system(), tiny_system("trainer.compile=true")
    assert compiled.dcg._compiled_call_impl is not None and plain.dcg._compiled_call_impl is None
    assert list(plain.state_dict()) == list(compiled.state_dict())


@pytest.mark.slow
def test_speed_benchmark_smoke_run_writes_its_report(tmp_path):
    overrides = [
        "data.synthetic.num_train=32",
        "data.synthetic.num_val=8",
        "data.synthetic.num_test=8",
        "model.feature_dim=16",
        "diffusion.eval_samples=2",
    ]
    args = ["--config", "configs/demo.yml", "--batch-size", "4", "--repeats", "1", "--steps", "2"]
    assert speed.main([*args, "--matmul-size", "64", "--profile", "--out", str(tmp_path), *overrides]) == 0
    report = json.loads((tmp_path / "speed_cpu.json").read_text())
    (label,) = report["configs"]
    assert label == speed.entry_label("demo", 4, report["machine"]) and label.startswith("demo, batch 4, ")
    demo = report["configs"][label]
    assert demo["machine"] == report["machine"]
    assert demo["flops_per_image"]["identity_holds"] and demo["samplers_identical"]
    assert {"reencoding_over_encoders_once_time_32-true", "bf16-mixed_speedup_train_model"} <= set(demo["ratios"])
    assert demo["end_to_end"]["bf16-mixed"]["images_per_s"] > 0
    assert demo["end_to_end"]["loader"]["images"] == 32  # the loader alone is timed over a whole epoch
    assert demo["profile"]["bf16-mixed"]["train_step"]["operators"]
    md = (tmp_path / "speed_cpu.md").read_text()
    assert "re-run per step" in md and report["machine"]["torch"] == torch.__version__


def test_speed_report_keeps_earlier_measurements_each_with_its_machine(tmp_path):
    other = {"device": "Other CPU", "cpu": "Other CPU", "cpu_threads": 1, "python": "3.11", "torch": "x"}
    other |= {"torchvision": "y", "lightning": "z"}
    entry = {"config": "configs/isic.yml", "settings": {"batch_size": 4}, "command": "python -m benchmarks.speed"}
    # a report written before entries carried their machine: they take the report's
    (tmp_path / "speed_cpu.json").write_text(json.dumps({"machine": other, "configs": {"isic": entry}}))
    kept = speed.earlier_entries(tmp_path / "speed_cpu.json")
    assert (
        list(kept) == ["isic, batch 4, Other CPU, 1 threads"]
        and kept["isic, batch 4, Other CPU, 1 threads"]["machine"] == other
    )
    gpu = {**other, "device": "NVIDIA H100", "cpu": "Other CPU"}
    assert speed.entry_label("isic", 64, gpu) == "isic, batch 64, NVIDIA H100"
    assert speed.earlier_entries(tmp_path / "missing.json") == {}
    # a loader rate of an older report, timed between prefetched batches, is marked as such
    assert "overestimate" in speed.loader_text({"images_per_s": 1.0, "workers": 4})
    assert "overestimate" not in speed.loader_text({"images_per_s": 1.0, "workers": 0})
    assert "128 images from its start" in speed.loader_text({"images_per_s": 1.0, "workers": 4, "images": 128})


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_speed_refuses_a_precision_it_does_not_measure(precision):
    with pytest.raises(speed.ConfigError, match="--precision"):
        speed.precision_context(precision, torch.device("cpu"))


def test_the_dcg_pretrains_in_float32_when_the_denoiser_trains_mixed():
    for legacy in ("16", "bf16"):
        assert pretraining_precision(load_config(None, [f"trainer.precision={legacy}"]))["trainer"]["precision"] == (
            "32-true"
        )
    cfg = load_config(None, ["trainer.precision=bf16-mixed"])
    assert pretraining_precision(cfg)["trainer"]["precision"] == "32-true"
    assert cfg["trainer"]["precision"] == "bf16-mixed"  # the run's own config is left as it is
    plain = load_config(None, ["trainer.precision=64-true", "trainer.float32_matmul_precision=high"])
    pretraining = pretraining_precision(plain)
    assert pretraining["trainer"]["precision"] == "64-true", "a true precision is kept"
    assert pretraining["trainer"]["float32_matmul_precision"] == "highest", "IEEE float32 under a TF32 policy too"
    assert plain["trainer"]["float32_matmul_precision"] == "high"
