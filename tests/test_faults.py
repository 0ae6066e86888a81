"""Faults a user causes end with one line and nothing lost (faults.py): a diverged training, two fits of one run
folder at once, SIGINT and SIGTERM during a fit; and diverged samples at evaluation."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import pytorch_lightning as pl
import torch
from helpers import ROOT, TINY, cli, ok, start_fit

from diffmic.checkpoints import read_checkpoint
from diffmic.config import load_config
from diffmic.faults import (
    EXIT_DIVERGED,
    DivergenceGuard,
    InterruptGuard,
    RunInterrupted,
    TrainingDiverged,
    report_fault,
    resume_command,
)
from diffmic.utils import build_trainer
from diffmic.v2.system import DiffMICv2


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


# ------------------------------------------------------------------------------------------------ divergence


@pytest.mark.slow
def test_a_diverging_demo_stops_at_the_step_with_one_line(tmp_path):
    """The README's case: a learning rate of 1e8. The fit ends in its first epoch, exit 3, one line, no traceback."""
    result = cli("fit", *TINY, "optim.lr=1e8", "trainer.max_epochs=5", f"trainer.log_dir={tmp_path}")
    assert result.returncode == EXIT_DIVERGED, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "training diverged: the loss is not finite at step" in lines[0], lines
    assert "(epoch 0;" in lines[0] and "optim.lr (now 100000000.0)" in lines[0]
    assert "Traceback" not in result.stderr
    assert "val (epoch" not in result.stderr.split("DCG saved to")[-1], "stopped before the first validation"


def test_every_entry_point_maps_its_errors_to_the_documented_exit_codes(caplog):
    """faults.exit_code, shared by diffuser_trainer.py, train_dcg.py and train_encoder.py: one line and the code of the
    table in faults.py; --debug (and any other error) raises instead, a config error stays one line."""
    from pathlib import Path

    from dataloader.lists import ImageUnreadable
    from diffmic.config import ConfigError
    from diffmic.durable import WriteFailed
    from diffmic.faults import exit_code

    cfg = load_config(None)
    unreadable = ImageUnreadable(f"{ImageUnreadable.PREFIX}/data/a.png (row 3 of train.csv): gone")
    peer = RuntimeError("Connection closed by peer")
    cases = [(ConfigError("bad key"), 2), (WriteFailed("could not write x", Path("x")), 5), (unreadable, 2), (peer, 4)]
    for err, code in cases:
        caplog.clear()
        assert exit_code(err, cfg, debug=False) == code
        assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1, err
    assert exit_code(ConfigError("bad key"), None, debug=True) == 2
    for err in (WriteFailed("could not write x", Path("x")), unreadable, peer, ValueError("a bug")):
        with pytest.raises(type(err)):
            exit_code(err, cfg, debug=True)
    with pytest.raises(ValueError):
        exit_code(ValueError("a bug"), cfg, debug=False)


def test_debug_shows_the_traceback_instead_of_the_line():
    err = TrainingDiverged("training diverged: ...", rank=0)
    assert report_fault(err, debug=False) == EXIT_DIVERGED
    with pytest.raises(TrainingDiverged):
        report_fault(err, debug=True)
    assert report_fault(RunInterrupted("x", "SIGTERM", rank=1), debug=False) == 143  # said by rank 0 only


class _Diverging(pl.LightningModule):
    """A linear model whose loss turns NaN at a chosen global step."""

    def __init__(self, at_step: int, fused_adam: bool = False) -> None:
        super().__init__()
        self.cfg = {"optim": {"lr": 0.1}, "trainer": {"precision": "32-true"}, "data": {"task": "multiclass"}}
        self.net = torch.nn.Linear(4, 2)
        self.at_step, self.fused_adam = at_step, fused_adam
        self.before_bad_step: dict[str, torch.Tensor] | None = None  # the weights the non-finite step started from

    def training_step(self, batch, batch_idx):
        loss = self.net(batch[0]).pow(2).mean()
        if self.global_step != self.at_step:
            return loss
        self.before_bad_step = {k: v.detach().clone() for k, v in self.state_dict().items()}
        return loss * float("nan")

    def validation_step(self, batch, batch_idx):
        self.log("val/f1", 1.0 - self.net(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        if self.fused_adam:
            return torch.optim.Adam(self.parameters(), lr=0.1, fused=True)
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_the_guard_keeps_the_checkpoints_of_the_finished_epochs(tmp_path):
    cfg = load_config(None, [f"trainer.log_dir={tmp_path}", "trainer.log_every_n_steps=1"])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)
    trainer, _ = build_trainer(cfg, "guard", max_epochs=4, val_every=1)
    model = _Diverging(at_step=6)  # 4 steps an epoch: the second epoch's third step
    with pytest.raises(TrainingDiverged, match=r"step 6 \(epoch 1; last finite loss .* at step 5\)"):
        trainer.fit(model, train_dataloaders=data, val_dataloaders=data)
    last = tmp_path / "guard" / "version_0" / "checkpoints" / "last.ckpt"
    saved = read_checkpoint(last)  # loadable, weights only
    assert saved["epoch"] == 0 and saved["global_step"] == 4, "the diverged epoch wrote no checkpoint"
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    # the optimiser took no step with the non-finite loss: the weights in memory are still finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("fused_adam", [True, False], ids=["fused-adam-skips-on-device", "other-optimiser-checked"])
def test_the_deferred_guard_of_a_gpu_takes_no_step_after_the_non_finite_loss(tmp_path, fused_adam):
    """The GPU's way, run on the CPU: the flag stays on the device and is read `lag` steps later. Fused Adam skips the
    non-finite step and the ones after it on the device (found_inf); another optimiser is checked before its step.
    Either way the error names the step where the loss stopped being finite and no checkpoint is written after it."""
    cfg = load_config(None, [f"trainer.log_dir={tmp_path}", "trainer.log_every_n_steps=1"])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=4)
    trainer, _ = build_trainer(cfg, "guard", max_epochs=4, val_every=1)
    guard = next(c for c in trainer.callbacks if isinstance(c, DivergenceGuard))
    guard.deferred = True
    model = _Diverging(at_step=9, fused_adam=fused_adam)  # 8 steps an epoch: the second epoch's second step
    with pytest.raises(TrainingDiverged, match=r"step 9 \(epoch 1; last finite loss .* at step 8\)"):
        trainer.fit(model, train_dataloaders=data, val_dataloaders=data)
    if fused_adam:  # the device went on for `lag` steps, skipping their updates
        assert trainer.global_step == 9 + guard.lag
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, model.before_bad_step[key], rtol=0, atol=0)
    saved = read_checkpoint(tmp_path / "guard" / "version_0" / "checkpoints" / "last.ckpt")
    assert saved["epoch"] == 0 and saved["global_step"] == 8, "the diverged epoch wrote no checkpoint"
    assert all(not hasattr(o, "found_inf") for o in trainer.optimizers), "no flag left to skip a later step"


def test_diverged_samples_score_uniform_in_both_methods():
    system = DiffMICv2(load_config(None, ["model.feature_dim=16", "data.num_classes=3", "data.class_names=null"]))
    system.eval()
    system._start()
    system.denoiser.out.bias.data.fill_(float("nan"))
    batch = {"image": torch.randn(2, 3, 64, 64), "index": torch.tensor([0, 1])}
    out = system.evaluate_batch(batch)
    torch.testing.assert_close(out["scores"], torch.full((2, 3), 1 / 3))
    torch.testing.assert_close(out["probs"], torch.full((2, 3), 1 / 3))
    assert system._diverged == 2  # counted, and said once at the end of the split (GuidedSystem._finish)


# ------------------------------------------------------------------------------------------------ one run folder


@pytest.mark.slow
def test_two_fits_of_one_run_folder_both_finish_with_one_whole_dcg_file(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [sys.executable, str(ROOT / "diffuser_trainer.py"), "fit", f"trainer.log_dir={tmp_path}", *TINY]
    logs = [tmp_path / f"{k}.log" for k in range(2)]
    processes = []
    for log in logs:
        with log.open("w") as handle:
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=handle, env=env))
        time.sleep(1.0)
    assert [p.wait(timeout=900) for p in processes] == [0, 0], [log.read_text()[-2000:] for log in logs]
    texts = [log.read_text() for log in logs]
    assert sum(t.count("DCG saved to") for t in texts) == 1, "the DCG is pre-trained once"
    waited = [t for t in texts if "waiting for pid" in t]
    assert len(waited) == 1 and "setting up a fit in this run folder" in waited[0] and ".run.lock" in waited[0]
    run = tmp_path / "demo"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "dcg",
        "dcg.pt",
        "version_0",
        "version_1",
    ]
    # the DCG file is whole and is the one both runs trained with
    digest = hashlib.sha256((run / "dcg.pt").read_bytes()).hexdigest()
    for version in ("version_0", "version_1"):
        best = read_checkpoint(run / version / "checkpoints" / "best.ckpt")
        assert best["dcg_file"]["sha256"] == digest
    assert "state_dict" in read_checkpoint(run / "dcg.pt")


# ------------------------------------------------------------------------------------------------ signals


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_fit_says_what_was_saved_and_how_to_resume(tmp_path, signum, code):
    log = tmp_path / "fit.log"
    process = start_fit([f"trainer.log_dir={tmp_path}", *TINY, "trainer.max_epochs=50"], log)
    last = tmp_path / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, log.read_text()[-2000:]
    os.kill(process.pid, signum)
    ignored = [line for line in log.read_text().splitlines() if "Exception ignored" in line]
    assert process.wait(timeout=300) == code, (ignored, log.read_text()[-3000:])
    text = log.read_text()
    lines = error_lines(text)
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
    assert f"the fit interrupted by {name}: {last} holds the" in lines[0] and "--ckpt last" in lines[0]
    # the command it names resumes the run in its own version folder
    resume = lines[0].split("resume with: ", 1)[1].split()
    assert resume[:2] == ["python", str(ROOT / "diffuser_trainer.py")] and resume[-2:] == ["--ckpt", "last"]
    epochs = read_checkpoint(last)["epoch"] + 2
    ok(cli(*resume[2:], f"trainer.max_epochs={epochs}"))
    assert read_checkpoint(last)["epoch"] == epochs - 1
    assert not (tmp_path / "demo" / "version_1" / "checkpoints").exists()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_a_ctrl_c_swallowed_where_it_landed_stops_the_next_batch():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a process started from a terminal
    try:
        guard = InterruptGuard()
        guard.setup(None, None, "fit")
        guard.on_train_batch_start(None, None, None, 0)  # no signal: nothing happens
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here, between bytecodes
        except KeyboardInterrupt:
            pass  # where Python swallows it: a __del__, a garbage-collector callback
        for hook in (guard.on_train_batch_start, guard.on_validation_batch_start, guard.on_test_batch_start):
            with pytest.raises(KeyboardInterrupt):
                hook(None, None, None, 0)
        guard.teardown(None, None, "fit")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # a SIGINT ignored at start (nohup, a background job) stays ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        guard.setup(None, None, "fit")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and not guard.pending
        guard.teardown(None, None, "fit")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_resume_command_replaces_any_ckpt():
    argv = ["diffuser_trainer.py", "fit", "--ckpt", "best", "optim.lr=1e-3", "--config=x"]
    assert resume_command(argv) == "python diffuser_trainer.py fit optim.lr=1e-3 --config=x --ckpt last"
    assert resume_command(["diffuser_trainer.py"]) == "python diffuser_trainer.py fit --ckpt last"
    assert resume_command(["t.py", "--ckpt=last", "a b=1"]) == "python t.py fit 'a b=1' --ckpt last"


@pytest.mark.parametrize(
    ("env", "first"),
    [
        ({}, True),
        ({"RANK": "0", "LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
        ({"LOCAL_RANK": "1"}, False),  # Lightning's own launcher, torchrun
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),  # the first process of the second machine
        ({"SLURM_PROCID": "3"}, False),
        ({"OMPI_COMM_WORLD_RANK": "1"}, False),  # mpirun: Lightning's MPIEnvironment
        ({"PMI_RANK": "2"}, False),
    ],
)
def test_only_the_first_process_of_a_run_takes_the_run_folder_lock(monkeypatch, tmp_path, env, first):
    from diffmic.faults import RANK_VARIABLES, launched_as_rank_zero, run_folder_lock

    for key in RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launched_as_rank_zero() is first
    with run_folder_lock(tmp_path, "a test"):
        # the lock's owner file names the holder while it is held, only where the lock was taken
        assert (tmp_path / ".run.lock.owner").is_file() is first


def test_the_dcg_pre_trainer_ends_a_process_group_failure_with_one_line(monkeypatch, capfd, tmp_path):
    """pretraining/train_dcg.py, like diffuser_trainer.py: processes that cannot reach each other end with one line
    naming trainer.dist_timeout_s and exit 4; any other error keeps its traceback."""
    from pretraining import train_dcg

    def lost_peer(cfg, datasets):
        raise torch.distributed.DistError("connection closed by peer")

    monkeypatch.setattr(train_dcg, "pretrain_dcg", lost_peer)
    monkeypatch.setattr(train_dcg, "build_datasets", lambda cfg: {})
    assert train_dcg.main([*TINY, f"trainer.log_dir={tmp_path}"]) == 4
    lines = error_lines(capfd.readouterr().err)
    assert len(lines) == 1 and "trainer.dist_timeout_s" in lines[0]

    def other(cfg, datasets):
        raise ValueError("not a process group error")

    monkeypatch.setattr(train_dcg, "pretrain_dcg", other)
    with pytest.raises(ValueError):
        train_dcg.main([*TINY, f"trainer.log_dir={tmp_path}"])
