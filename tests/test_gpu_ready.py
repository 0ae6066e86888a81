"""What a first GPU run meets, proven on the CPU: evaluation on more processes than batches, every Lightning precision
working or refused, the float32 policy and the layers it leaves alone, the NCCL settings in place before a process
group forms, CUDA random states on another number of visible GPUs, an ablation under DDP and one device by default."""

from __future__ import annotations

import os
import re
from unittest import mock

import pytest
import torch
from helpers import TINY, cli, ok

from dataloader.datamodule import evaluation_batches
from diffmic.config import ConfigError, load_config, precision_refusal
from diffmic.faults import EXIT_CONFIG, NCCL_ENV, prepare_process_group_env
from diffmic.precision import apply_float32_policy, float32_policy, ieee_float32
from diffmic.seeding import rng_state, set_rng_state
from diffmic.v1.system import DiffMICv1
from diffmic.v2.system import DiffMICv2


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


# ------------------------------------------------------------------------------------------ evaluation batches


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
@pytest.mark.parametrize("num_images", [1, 3, 5, 7, 8, 25, 33, 100])
def test_every_process_gets_a_batch_and_every_image_is_counted_once(num_images, batch_size, world):
    if num_images < world:
        with pytest.raises(AssertionError, match="cannot give each"):
            evaluation_batches(num_images, batch_size, world)
        return
    batches = evaluation_batches(num_images, batch_size, world)
    shares = [batches[rank::world] for rank in range(world)]
    assert all(shares), f"a process without a batch: {shares}"
    assert [i for batch in batches for i in batch] == list(range(num_images)), "consecutive, each image once"
    one_process = evaluation_batches(num_images, batch_size, 1)
    if len(one_process) >= world:
        assert batches == one_process, "the one-process batches whenever there are enough of them"
    else:
        assert len(batches) == world and max(map(len, batches)) - min(map(len, batches)) <= 1


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    ok(cli("fit", *TINY, "trainer.max_epochs=1", f"trainer.log_dir={logs}"))
    return logs / "demo" / "version_0" / "checkpoints" / "best.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("processes, images", [(4, 5), (3, 7)])
def test_more_processes_than_batches_evaluate_each_image_once(tiny_checkpoint, tmp_path, processes, images):
    result = ok(
        cli(
            "test",
            "--ckpt",
            str(tiny_checkpoint),
            *TINY,
            f"data.synthetic.num_test={images}",
            f"trainer.devices={processes}",
            "trainer.strategy=ddp",
            f"trainer.log_dir={tmp_path}",
            threads=1,
        )
    )
    counts = re.findall(r"test \(epoch \d+, (\d+) images\)", result.stderr)
    assert counts == [str(images)], counts


@pytest.mark.slow
def test_fewer_images_than_processes_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    result = cli(
        "test",
        "--ckpt",
        str(tiny_checkpoint),
        *TINY,
        "data.synthetic.num_test=3",
        "trainer.devices=4",
        "trainer.strategy=ddp",
        f"trainer.log_dir={tmp_path}",
    )
    assert result.returncode == EXIT_CONFIG, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "the test split has 3 image(s), fewer than the 4 processes" in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "nothing written"


# ------------------------------------------------------------------------------------------------ precision

LIGHTNING_PRECISIONS = [
    "32-true",
    "32",
    32,
    "64-true",
    "64",
    64,
    "bf16-mixed",
    "bf16",
    "16-mixed",
    "16",
    16,
    "bf16-true",
    "16-true",
    "transformer-engine",
    "transformer-engine-float16",
]


@pytest.mark.parametrize("precision", LIGHTNING_PRECISIONS, ids=str)
def test_every_lightning_precision_is_accepted_or_refused_with_its_key(precision):
    try:
        cfg = load_config(None, [f"trainer.precision={precision}", "trainer.accelerator=cpu"])
    except ConfigError as err:
        assert str(err).startswith("config key trainer.precision:"), err
        assert "\n" not in str(err)
        return
    assert precision_refusal(cfg["trainer"]["precision"]) is None


@pytest.mark.slow
def test_bf16_true_is_refused_before_any_work(tmp_path):
    result = cli("fit", *TINY, "trainer.precision=bf16-true", f"trainer.log_dir={tmp_path}")
    assert result.returncode == EXIT_CONFIG, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "config key trainer.precision: 'bf16-true'" in lines[0] and "bf16-mixed" in lines[0]
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "nothing written"


@pytest.mark.parametrize("system_class", [DiffMICv2, DiffMICv1])
def test_64_true_trains_and_samples_in_float64(system_class):
    """Lightning's 64-true converts the weights and the batch to float64: the DCG runs in its own dtype (it was cast
    to float32 before, a dtype mismatch), and so does the label space."""
    cfg = load_config(None, ["model.feature_dim=16", "v1.feature_dim=16", "v1.warmup_epochs=0"])
    torch.manual_seed(0)
    system = system_class(cfg).double()
    batch = {
        "image": torch.randn(4, 3, 64, 64, dtype=torch.float64),
        "label": torch.tensor([0, 1, 2, 3]),
        "index": torch.arange(4),
    }
    loss = system.training_step(batch, 0) if system_class is DiffMICv1 else system.training_loss(batch)
    assert torch.isfinite(loss)
    system.eval()
    with torch.no_grad():
        out = system.evaluate_batch(batch)
    assert torch.isfinite(out["scores"]).all()


# ------------------------------------------------------------------------------------------ float32 policy


@pytest.fixture
def restore_policy():
    matmul, conv = float32_policy()
    yield
    apply_float32_policy(matmul)
    torch.backends.cudnn.allow_tf32 = conv


@pytest.mark.parametrize("policy, conv_tf32", [("highest", False), ("high", True), ("medium", True)])
def test_the_policy_sets_matmuls_and_convolutions_alike(restore_policy, policy, conv_tf32):
    apply_float32_policy(policy)
    assert float32_policy() == (policy, conv_tf32)
    # every getter answers (torch refuses to report a state set through a mix of its legacy and per-backend APIs),
    # and the per-backend view agrees
    assert torch.backends.cuda.matmul.allow_tf32 is conv_tf32
    assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if conv_tf32 else "ieee")
    with torch.backends.cudnn.flags(enabled=True), ieee_float32():
        assert float32_policy() == ("highest", False) and torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert float32_policy() == (policy, conv_tf32)


def test_the_config_key_is_checked_and_applied_by_the_trainer(restore_policy, tmp_path):
    from diffmic.utils import build_trainer

    with pytest.raises(ConfigError, match="config key trainer.float32_matmul_precision: 'fast' is not one of"):
        load_config(None, ["trainer.float32_matmul_precision=fast"])
    cfg = load_config(None, ["trainer.float32_matmul_precision=high", f"trainer.log_dir={tmp_path}"])
    build_trainer(cfg, "probe", 1, 1)
    assert float32_policy() == ("high", True)
    assert load_config(None)["trainer"]["float32_matmul_precision"] == "highest", "IEEE float32 by default"


def test_the_layers_kept_in_float32_run_in_ieee_whatever_the_policy(restore_policy):
    """The frozen DCG and the denoiser's label-space layers (cc1, out) see IEEE float32; the body sees the policy."""
    apply_float32_policy("high")
    system = DiffMICv2(load_config(None, ["model.feature_dim=16"])).eval()
    seen: dict[str, tuple[str, str]] = {}

    def record(name):
        return lambda module, args: seen.__setitem__(name, float32_policy())

    system.dcg.register_forward_pre_hook(record("dcg"))
    system.denoiser.cc1.conv.register_forward_pre_hook(record("cc1"))
    system.denoiser.out.register_forward_pre_hook(record("out"))
    system.denoiser.cc2.conv.register_forward_pre_hook(record("cc2"))
    with torch.no_grad():
        system.training_loss({"image": torch.randn(2, 3, 64, 64), "label": torch.tensor([0, 1])})
    assert seen["dcg"] == seen["cc1"] == seen["out"] == ("highest", False)
    assert seen["cc2"] == ("high", True), "the body follows the policy"
    assert float32_policy() == ("high", True), "the policy is back after each kept layer"


# ------------------------------------------------------------------------------------------------ processes


def test_nccl_error_handling_is_set_before_any_process_group(monkeypatch, tmp_path):
    """torch's default NCCL error handling kills the process with SIGABRT; the project sets the mode that raises
    (faults.NCCL_ENV) when it builds a Trainer, before Lightning forms the process group or starts processes."""
    from diffmic.utils import build_trainer

    for key in NCCL_ENV:
        monkeypatch.delenv(key, raising=False)
    build_trainer(load_config(None, [f"trainer.log_dir={tmp_path}"]), "probe", 1, 1)
    assert {k: os.environ[k] for k in NCCL_ENV} == NCCL_ENV
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    prepare_process_group_env()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1", "a value the user set is kept"


def test_nccl_watchdog_errors_end_with_the_one_line():
    from diffmic.faults import distributed_failure

    cfg = load_config(None)
    err = torch.distributed.DistBackendError("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7)")
    assert "trainer.dist_timeout_s (1800 s)" in distributed_failure(err, cfg)
    aborted = RuntimeError("NCCL communicator was aborted on rank 1.")
    assert distributed_failure(aborted, cfg) is not None
    assert distributed_failure(RuntimeError("shape mismatch"), cfg) is None


def test_cuda_random_states_saved_on_two_devices_restore_on_one():
    states = [torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 9, dtype=torch.uint8)]
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.get_rng_state_all", return_value=states),
    ):
        saved = rng_state()
    assert len(saved["cuda"]) == 2
    restored = []
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.device_count", return_value=1),
        mock.patch("torch.cuda.set_rng_state", side_effect=lambda s, d: restored.append((d, s))),
    ):
        set_rng_state(saved)
    assert [d for d, _ in restored] == [0] and torch.equal(restored[0][1], states[0])


def test_one_device_by_default():
    assert load_config(None)["trainer"]["devices"] == 1


@pytest.mark.slow
def test_the_roi_branch_ablation_trains_under_ddp_and_logs_the_global_batch(tmp_path):
    result = ok(
        cli(
            "fit",
            *TINY,
            "ablation.roi_branch=false",
            "trainer.max_epochs=2",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            f"trainer.log_dir={tmp_path}",
            threads=1,
        )
    )
    assert "training on 2 processes (1 machine(s) x 2): global batch 2 x 16 = 32 images a step" in result.stderr
    lr = load_config(None)["optim"]["lr"]
    assert f"learning rate {lr:g} (optim.lr, not scaled with the processes)" in result.stderr


def test_the_progress_bar_reads_the_loss_only_at_logging_steps_on_a_gpu():
    from diffmic.utils import progress_refresh_rate

    t = {"accelerator": "cpu", "log_every_n_steps": 10}
    assert progress_refresh_rate(t) == 1
    assert progress_refresh_rate({**t, "accelerator": "gpu"}) == 10
    with mock.patch("pytorch_lightning.accelerators.CUDAAccelerator.is_available", return_value=True):
        assert progress_refresh_rate({**t, "accelerator": "auto"}) == 10
    with mock.patch("pytorch_lightning.accelerators.CUDAAccelerator.is_available", return_value=False):
        assert progress_refresh_rate({**t, "accelerator": "auto"}) == 1
