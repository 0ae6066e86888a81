"""On a CUDA GPU (skipped without one; `benchmarks/gpu_check.sh` runs them): float32 on the GPU computes what it
computes on the CPU (denoiser, DCG, scheduler, one sampled batch) within a stated tolerance, a tiny bf16-mixed fit
runs, DDP over NCCL on every visible GPU evaluates as one process does, and the data path's device half (8-bit
batches turned and normalised on the GPU) gives the CPU's model inputs.

Tolerance: under the configured float32 policy (default.yml: highest) the GPU runs IEEE float32; its kernels sum in
other orders than the CPU's, so results agree to about 1e-5 relative (checked at 1e-4 absolute on values of order
1), not bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, cli, ok, textured_image
from torch.utils.data import default_collate

from dataloader.transforms import ModelInput, build_transform, item
from diffmic.config import load_config
from diffmic.precision import apply_float32_policy, float32_policy
from diffmic.v2.pipeline import DDIMScheduler
from diffmic.v2.system import DiffMICv2

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")
ATOL, RTOL = 1e-4, 1e-4
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def configured_float32_policy():
    """The float32 policy a run applies (trainer.float32_matmul_precision of default.yml: highest, IEEE float32), so
    these tests check what a run computes; the policy in force before is put back."""
    matmul, conv = float32_policy()
    apply_float32_policy(load_config(None)["trainer"]["float32_matmul_precision"])
    yield
    apply_float32_policy(matmul)
    torch.backends.cudnn.allow_tf32 = conv


@pytest.mark.cuda
@needs_cuda
def test_denoiser_on_cuda_equals_cpu(make_denoiser):
    model = make_denoiser().eval()
    torch.manual_seed(0)
    image, patches = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)  # (B, K, r, r)
    y = torch.randn(2, 6, 3, 3)
    t = torch.randint(0, 1000, (2, 3, 3))
    with torch.no_grad():
        cpu = model(image, patches, y, t)
        gpu = model.to(CUDA)(image.to(CUDA), patches.to(CUDA), y.to(CUDA), t.to(CUDA))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=ATOL, rtol=RTOL)


@pytest.mark.cuda
@needs_cuda
def test_dcg_on_cuda_equals_cpu(make_dcg):
    dcg = make_dcg().eval()
    image = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu = dcg(image)
        gpu = dcg.to(CUDA)(image.to(CUDA))
    for name in ("y_global", "y_local", "y_fusion"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(gpu.patches.cpu(), cpu.patches, atol=ATOL, rtol=RTOL)  # the same ROIs cropped


@pytest.mark.cuda
@needs_cuda
def test_scheduler_on_cuda_equals_cpu():
    scheduler = DDIMScheduler(1000, 1e-4, 0.02)
    torch.manual_seed(2)
    y0, eps, t = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3), torch.randint(0, 1000, (4, 3, 3))
    cpu = scheduler.add_noise(y0, eps, t)
    gpu = scheduler.to(CUDA).add_noise(y0.to(CUDA), eps.to(CUDA), t.to(CUDA))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-6, rtol=1e-6)
    scheduler.set_timesteps(10)
    step_gpu = scheduler.step(eps.to(CUDA), 900, cpu.to(CUDA)).cpu()
    scheduler.to("cpu").set_timesteps(10)
    torch.testing.assert_close(step_gpu, scheduler.step(eps, 900, cpu), atol=1e-6, rtol=1e-6)


@pytest.mark.cuda
@needs_cuda
def test_one_sampled_batch_on_cuda_equals_cpu():
    cfg = load_config(None, ["model.feature_dim=16", "diffusion.eval_samples=2"])
    torch.manual_seed(0)
    system = DiffMICv2(cfg).eval()
    batch = {"image": torch.randn(4, 3, 64, 64), "label": torch.tensor([0, 1, 2, 3]), "index": torch.arange(4)}
    cpu = system.evaluate_batch(batch)
    gpu = system.to(CUDA).evaluate_batch({k: v.to(CUDA) for k, v in batch.items()})
    for key in ("scores", "probs", "spread"):
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=ATOL, rtol=RTOL)


@pytest.mark.cuda
@needs_cuda
def test_the_layers_kept_in_float32_ignore_a_tf32_policy():
    """Under trainer.float32_matmul_precision=high the body may run in TF32, but the frozen DCG and the label-space
    layers (cc1, out) compute exactly what they compute under highest."""
    cfg = load_config(None, ["model.feature_dim=16"])
    torch.manual_seed(0)
    system = DiffMICv2(cfg).eval().to(CUDA)
    image = torch.randn(4, 3, 64, 64, device=CUDA)
    y_in, t = torch.randn(4, 8, 3, 3, device=CUDA), torch.randint(0, 1000, (4, 3, 3), device=CUDA)
    runs = {}
    for policy in ("highest", "high"):
        apply_float32_policy(policy)
        with torch.no_grad():
            guide = system.guide(image)
            runs[policy] = (guide.y_global, guide.y_local, guide.y_fusion, system.denoiser.cc1(y_in, t))
    for ieee, tf32 in zip(runs["highest"], runs["high"], strict=True):
        torch.testing.assert_close(tf32, ieee, rtol=0, atol=0)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(
    "method, precision",
    [("diffmic_v2", p) for p in ("32-true", "bf16-mixed", "16-mixed", "64-true")]
    + [("diffmic_v1", "16-mixed"), ("diffmic_v1", "64-true")],  # v1: gradient clipping under the GradScaler; float64
)
def test_every_supported_precision_fits_on_cuda(tmp_path, method, precision):
    ok(
        cli(
            "fit",
            *TINY,
            "trainer.max_epochs=1",
            f"model.method={method}",
            "v1.feature_dim=16",
            "v1.warmup_epochs=0",
            "v1.sampling_steps=20",
            "diffusion.timesteps=20",
            f"trainer.log_dir={tmp_path}",
            "trainer.accelerator=gpu",
            f"trainer.precision={precision}",
        )
    )
    metrics = json.loads((tmp_path / "demo" / "version_0" / "metrics.json").read_text())
    assert all(v == v for k, v in metrics["test"].items() if not k.startswith(("recall/", "selective/")))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_the_guard_stops_a_gpu_fit_at_the_non_finite_step_without_a_sync(tmp_path, precision):
    """The deferred check of a GPU (faults.DivergenceGuard): the flag stays on the device (found_inf), the host reads
    it through a pinned copy; the error names the step, and no update was taken with the non-finite loss."""
    from test_faults import _Diverging

    from diffmic.checkpoints import read_checkpoint
    from diffmic.faults import TrainingDiverged
    from diffmic.utils import build_trainer

    cfg = load_config(
        None,
        [f"trainer.log_dir={tmp_path}", "trainer.accelerator=gpu", f"trainer.precision={precision}"]
        + ["trainer.log_every_n_steps=1"],
    )
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=4)
    trainer, _ = build_trainer(cfg, "guard", max_epochs=4, val_every=1)
    model = _Diverging(at_step=9, fused_adam=True)
    with pytest.raises(TrainingDiverged, match=r"step 9 \(epoch 1; last finite loss .* at step 8\)"):
        trainer.fit(model, train_dataloaders=data, val_dataloaders=data)
    if precision != "16-mixed":  # the GradScaler takes the steps after it (faults.DivergenceGuard)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value.cpu(), model.before_bad_step[key].cpu(), rtol=0, atol=0)
    saved = read_checkpoint(tmp_path / "guard" / "version_0" / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 8, "the diverged epoch wrote no checkpoint"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs two GPUs or more")
def test_ddp_over_nccl_on_every_gpu_evaluates_as_one_process(tmp_path):
    gpus = torch.cuda.device_count()
    # a test split with more batches of 16 than GPUs: the batches of one process (bit-identical metrics, README)
    common = [*TINY, "trainer.accelerator=gpu", "data.synthetic.num_val=33", f"data.synthetic.num_test={16 * gpus + 9}"]
    ok(cli("fit", *common, f"trainer.log_dir={tmp_path}", f"trainer.devices={gpus}", "trainer.strategy=ddp"))
    best = str(tmp_path / "demo" / "version_0" / "checkpoints" / "best.ckpt")
    runs = {}
    for name, devices in (("one", ["trainer.devices=1"]), ("all", [f"trainer.devices={gpus}", "trainer.strategy=ddp"])):
        ok(
            cli(
                "test",
                "--ckpt",
                best,
                *common,
                f"trainer.log_dir={tmp_path / name}",
                *devices,
                "--out",
                str(tmp_path / f"{name}.json"),
            )
        )
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())["test"]
    assert json.dumps(runs["one"]) == json.dumps(runs["all"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_check_says_it_needs_a_gpu():
    """Outside the cuda mark: on a machine without CUDA the script stops at once, saying why."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    env = dict(os.environ, PYTHON=sys.executable)
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    result = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "needs a CUDA GPU" in result.stderr


def test_the_gpu_check_collects_its_tests():
    """The script's pytest command lines as written (its flags against pyproject's addopts), collected here: a usage
    error would leave every CUDA test of a lent GPU unrun."""
    import re
    import shlex
    import subprocess
    import sys

    from helpers import ROOT

    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    commands = [line for line in text.splitlines() if '"$python" -m pytest' in line]
    assert len(commands) == 2, commands
    for line in commands:
        words = shlex.split(re.search(r'"\$python" (-m pytest .*?) 2>&1', line).group(1))
        result = subprocess.run(
            [sys.executable, *words, "--collect-only", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        collected = re.search(r"tests/test_cuda\.py: (\d+)", result.stdout)
        assert collected and int(collected.group(1)) > 0, result.stdout[-1000:]


@pytest.mark.cuda
@needs_cuda
def test_the_data_path_s_device_half_on_cuda_computes_the_cpu_s_model_inputs():
    """Evaluation inputs to the bit (the divisions by 255 and by the std are by tensors, which CUDA divides exactly;
    by a Python number it would multiply by the reciprocal); a training batch's rotation within one 8-bit level on a
    few pixels in 10,000 (float32 sampling on another device)."""
    cfg = load_config(None, ["data.image_size=64", "data.rotation_degrees=30", "data.vertical_flip=true"])
    images = [textured_image(90 - 9 * (k % 3), 70 + 11 * (k % 4), k) for k in range(24)]
    level = 1 / 255 / 0.224  # one 8-bit level after the normalisation, at the smallest std
    for train in (False, True):
        torch.manual_seed(0)
        transform = build_transform(cfg, train)
        batch = default_collate([item(transform, image) for image in images])
        on_cpu = ModelInput()(batch)["image"]
        on_gpu = ModelInput()({key: value.to(CUDA) for key, value in batch.items()})["image"]
        assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
        if not train:
            assert torch.equal(on_gpu.cpu(), on_cpu)
        else:
            off = (on_gpu.cpu() - on_cpu).abs()
            assert off.max() <= level * 1.001 and (off > 1e-6).float().mean() < 1e-3, off.max()
