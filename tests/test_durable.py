"""Nothing lost when a disk fills or a run is killed while it saves (durable.py, checkpoint_io.py): checkpoints and the
run's other files are written beside their destination and renamed over it; a failed save ends with one line and
exit 5, the previous files untouched; the system temp folder is not used; a free-space warning before the first
epoch; an image that goes away mid-run, ImageNet weights offline and signals after training end with one line."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, cli, ok, start_fit, write_image_lists

import diffuser_trainer
from dataloader.lists import ImageList, ImageUnreadable, SplitList
from diffmic.checkpoint_io import AtomicCheckpointIO, DiskSpaceCheck, tensor_bytes
from diffmic.checkpoints import read_checkpoint
from diffmic.config import ConfigError, check_imagenet_weights, load_config
from diffmic.durable import EXIT_WRITE, WriteFailed, atomic_open, partial_path, write_atomically
from diffmic.results import prediction_table, write_json, write_prediction_table
from diffmic.utils import build_trainer


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.partial"))


# ------------------------------------------------------------------------------------------------ a failed save


@pytest.mark.slow
def test_enospc_mid_save_keeps_last_ckpt_and_the_run_resumes_without_the_temp_folder(tmp_path, monkeypatch, capsys):
    """The second epoch's save of last.ckpt meets a full disk half-way through the file: the fit ends with exit 5 and
    one line naming the file, the free space and the size it needed; the first epoch's last.ckpt is byte-identical
    and loadable, no temporary file is left. `--ckpt last` then finishes the run, with the system temp folder (TMPDIR)
    a folder nobody can write: no save goes through it."""
    args = ["fit", *TINY, f"trainer.log_dir={tmp_path / 'logs'}"]
    last = tmp_path / "logs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    real, seen = AtomicCheckpointIO.serialise, {}

    def disk_fills(self, checkpoint, handle):
        if Path(handle.name).name.startswith("last.ckpt") and last.is_file():
            seen["before"] = digest(last)
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            handle.write(buffer.getvalue()[: buffer.tell() // 2])
            handle.flush()
            seen["partial"] = Path(handle.name).stat().st_size  # the half file is on disk, beside last.ckpt
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, checkpoint, handle)

    monkeypatch.setattr(AtomicCheckpointIO, "serialise", disk_fills)
    assert diffuser_trainer.main(args) == EXIT_WRITE
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert "Traceback" not in err
    assert f"could not write {last} (No space left on device)" in line, line
    assert " free there, it needed about " in line and "MB" in line and "the previous last.ckpt is kept" in line
    assert seen["partial"] > 0 and digest(last) == seen["before"]
    assert read_checkpoint(last)["epoch"] == 0
    assert not leftovers(tmp_path / "logs")

    # resume, with the system temp folder unusable: a path under a regular file can be created by no one
    blocked = tmp_path / "a_file" / "tmp"
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setattr(AtomicCheckpointIO, "serialise", real)
    monkeypatch.setenv("TMPDIR", str(blocked))
    monkeypatch.setattr("tempfile.tempdir", str(blocked))  # what Lightning's own writer would have used
    assert diffuser_trainer.main([*args[:1], "--ckpt", "last", *args[1:]]) == 0
    assert read_checkpoint(last)["epoch"] == 1
    metrics = json.loads((last.parents[1] / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test", "val_history"}
    assert not leftovers(tmp_path / "logs")


def test_a_write_that_fails_leaves_the_previous_file_and_says_so(tmp_path, monkeypatch):
    """metrics.json and predictions.csv are never seen half-written: an error anywhere before the rename (here the
    fsync of a complete temporary file, an I/O error) leaves the destination as it was, and removes the temporary
    file; the destination changes only by the rename, from the old whole file to the new one."""
    metrics = tmp_path / "run" / "metrics.json"
    write_json(metrics, {"test": {"acc": 0.5}})
    before = metrics.read_bytes()

    def io_error(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr("diffmic.durable.os.fsync", io_error)
    with pytest.raises(WriteFailed, match=r"could not write .*metrics\.json \(Input/output error\).* needed about"):
        write_json(metrics, {"test": {"acc": 0.9}, "long": list(range(1000))})
    assert metrics.read_bytes() == before and not leftovers(tmp_path)
    monkeypatch.undo()

    # predictions.csv: at the rename, the temporary file is complete and the destination still the old file
    dataset = type("Split", (), {"labels": np.array([0, 1, 1]), "ids": ["a", "b", "c"]})()
    predictions = {
        "index": np.arange(3),
        "scores": np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]]),
        "spread": np.zeros(3),
        "label": np.array([0, 1, 1]),
        "probs": np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]]),
    }
    out = tmp_path / "run" / "predictions.csv"
    out.write_text("old,complete\n")
    real_replace, renames = os.replace, []

    def rename(src, dst):
        renames.append((Path(src).read_text(), Path(dst).read_text()))
        real_replace(src, dst)

    monkeypatch.setattr("diffmic.durable.os.replace", rename)
    write_prediction_table(out, prediction_table(predictions, dataset, ["x", "y"], multilabel=False))
    ((new, old),) = renames
    assert old == "old,complete\n" and new == out.read_text() and len(new.splitlines()) == 4
    assert not leftovers(tmp_path)


@pytest.mark.slow
def test_a_writer_killed_mid_file_leaves_the_previous_checkpoint(tmp_path):
    """A child process saves a checkpoint, then is SIGKILLed half-way through writing the next one: the first is
    whole and loadable; the next save in that folder removes the dead writer's temporary file."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    child = textwrap.dedent(
        """
        import io, os, sys, time
        import torch
        from diffmic.checkpoint_io import AtomicCheckpointIO

        writer = AtomicCheckpointIO()
        writer.save_checkpoint({"state_dict": {"w": torch.arange(1000.0)}, "epoch": 0}, sys.argv[1])
        print("saved", flush=True)

        def half_then_hang(self, checkpoint, handle):
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            handle.write(buffer.getvalue()[: buffer.tell() // 2])
            handle.flush()
            os.fsync(handle.fileno())
            print("half", flush=True)
            time.sleep(600)

        AtomicCheckpointIO.serialise = half_then_hang
        writer.save_checkpoint({"state_dict": {"w": torch.zeros(1 << 20)}, "epoch": 1}, sys.argv[1])
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-c", child, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert process.stdout.readline().strip() == "saved", process.stderr.read()
        first = digest(path)
        assert process.stdout.readline().strip() == "half", process.stderr.read()
        (partial,) = leftovers(tmp_path)
        assert partial.stat().st_size > 1 << 20 and partial.parent == path.parent
    finally:
        process.kill()  # SIGKILL: no handler, no clean-up runs in the child
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert digest(path) == first and read_checkpoint(path)["epoch"] == 0
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 2}, path)
    assert read_checkpoint(path)["epoch"] == 2 and not leftovers(tmp_path)


def test_a_live_writers_and_foreign_temporary_files_are_left_alone(tmp_path):
    path = tmp_path / "metrics.json"
    alive = path.with_name(f"{path.name}.{os.uname().nodename}.1.partial")  # pid 1 is alive
    foreign = path.with_name(f"{path.name}.another-host.12345.partial")
    for file in (alive, foreign):
        file.write_text("{")
    write_atomically(path, "{}")
    assert alive.is_file() and foreign.is_file() and path.read_text() == "{}"
    assert partial_path(path).name.endswith(f".{os.getpid()}.partial")


def test_an_error_in_the_block_removes_the_temporary_file(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path, "w") as handle:
            handle.write("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ free space


@pytest.mark.slow  # fits a model
def test_free_space_warning_in_numbers_and_the_estimate_matches_the_files(tmp_path, monkeypatch, caplog):
    import pytorch_lightning as pl

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(256, 256)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val/f1", 1.0 - self.net(batch[0]).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    cfg = load_config(None, [f"trainer.log_dir={tmp_path}", "trainer.accelerator=cpu"])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 256)), batch_size=4)
    estimates = {}
    real_check = DiskSpaceCheck.on_train_start

    def spy(self, trainer, pl_module):
        from diffmic.checkpoint_io import optimizer_bytes, weights_bytes

        estimates["weights"] = weights_bytes(pl_module)
        estimates["full"] = estimates["weights"] + sum(optimizer_bytes(o) for o in trainer.optimizers)
        real_check(self, trainer, pl_module)

    monkeypatch.setattr(DiskSpaceCheck, "on_train_start", spy)
    monkeypatch.setattr("diffmic.checkpoint_io.free_space", lambda folder: 300_000)
    trainer, _ = build_trainer(cfg, "space", max_epochs=1, val_every=1)
    with caplog.at_level(logging.WARNING, logger="diffmic.checkpoint_io"):
        trainer.fit(Model(), train_dataloaders=data, val_dataloaders=data)
    folder = tmp_path / "space" / "version_0" / "checkpoints"
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "diffmic.checkpoint_io"]
    assert f"disk space: {folder} has 300 KB free" in warning
    assert "best.ckpt about 263 KB, last.ckpt about 790 KB" in warning and "need 1.84 MB" in warning, warning
    # the estimate is what the files weigh, within torch.save's few kilobytes of pickle
    for name, key in (("best.ckpt", "weights"), ("last.ckpt", "full")):
        size = (folder / name).stat().st_size
        assert estimates[key] <= size <= estimates[key] + 20_000, (name, size, estimates)


def test_tensor_bytes_counts_a_shared_storage_once():
    t = torch.zeros(100)
    assert tensor_bytes({"a": t, "b": [t, t[:10]], "c": (torch.ones(3, dtype=torch.float64),)}) == 400 + 24


# ------------------------------------------------------------------------------------------------ inputs


@pytest.mark.slow
def test_an_image_deleted_during_a_fit_ends_it_with_one_line(tmp_path, monkeypatch, capsys):
    write_image_lists(tmp_path, count=30, num_classes=3, num_train=24, size=(64, 64))
    args = [
        "fit",
        *TINY,
        "data.dataset=list",
        f"data.root={tmp_path / 'images'}",
        f"data.train_list={tmp_path / 'train.csv'}",
        f"data.test_list={tmp_path / 'test.csv'}",
        "data.num_classes=3",
        "data.class_names=null",
        "data.num_workers=0",
        f"trainer.log_dir={tmp_path / 'logs'}",
    ]
    real = AtomicCheckpointIO.serialise
    gone = tmp_path / "images" / "case_6.png"

    def delete_after_the_first_last_ckpt(self, checkpoint, handle):
        real(self, checkpoint, handle)
        if Path(handle.name).name.startswith("last.ckpt"):
            gone.unlink(missing_ok=True)

    monkeypatch.setattr(AtomicCheckpointIO, "serialise", delete_after_the_first_last_ckpt)
    assert diffuser_trainer.main(args) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert "Traceback" not in err
    assert f"image unreadable during the run: {gone} (row 6 of {tmp_path / 'train.csv'}" in line, line
    assert "No such file or directory" in line and "--ckpt last" in line
    last = tmp_path / "logs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["epoch"] == 0


@pytest.mark.slow  # starts a DataLoader worker process
def test_an_image_unreadable_in_a_loader_worker_gives_the_same_line(tmp_path):
    write_image_lists(tmp_path, count=4, num_classes=2, num_train=4, size=(8, 8))
    split = SplitList(str(tmp_path / "train.csv"), [f"case_{k}.png" for k in range(4)], np.array([0, 1, 0, 1]))
    split = split.subset(np.array([1, 3]), "train.csv (held-out part)")
    images = ImageList(split, tmp_path / "images")
    (tmp_path / "images" / "case_3.png").write_bytes(b"\x89PNG truncated")
    loader = torch.utils.data.DataLoader(images, batch_size=1, num_workers=1, collate_fn=lambda b: b)
    with pytest.raises(ImageUnreadable) as caught:
        list(loader)
    line = ImageUnreadable.one_line(caught.value)
    assert line.startswith(f"image unreadable during the run: {tmp_path / 'images' / 'case_3.png'} (row 3 of ")
    assert "\n" not in line and ImageUnreadable.one_line(ValueError("other")) is None


@pytest.mark.slow
def test_imagenet_weights_offline_refuse_the_fit_before_any_work(tmp_path, monkeypatch):
    """No network (a proxy nobody answers) and an empty torch cache: a fit asking for ImageNet weights ends with exit
    2 and one line saying where to put the file, before anything is written."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for key in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(key, "http://127.0.0.1:9")
    for key in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(key, raising=False)
    result = cli("fit", *TINY, "model.patch_encoder_weights=imagenet", f"trainer.log_dir={tmp_path / 'logs'}")
    dcg = cli("fit", *TINY, "dcg.backbone_weights=imagenet", f"trainer.log_dir={tmp_path / 'logs'}")
    for run, key in ((result, "model.patch_encoder_weights"), (dcg, "dcg.backbone_weights")):
        assert run.returncode == 2, run.stderr[-3000:]
        (line,) = error_lines(run.stderr)
        assert f"config key {key}: imagenet, but torchvision's ImageNet weights of resnet18" in line, line
        assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-") in line and "imagenet_fallback" in line
        assert "Traceback" not in run.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_imagenet_fallback_or_a_cached_file_lets_the_run_go_on(tmp_path, monkeypatch, caplog):
    import urllib.error

    import diffmic.backbones as backbones

    def offline(name, tag="DEFAULT"):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(backbones, "imagenet_file", offline)
    cfg = load_config(None, ["dcg.backbone_weights=imagenet", "model.patch_encoder_weights=imagenet"])
    with pytest.raises(ConfigError, match=r"^config key dcg\.backbone_weights: imagenet, but .* resnet18"):
        check_imagenet_weights(cfg, ["dcg.backbone_weights", "model.patch_encoder_weights"])
    check_imagenet_weights(cfg, [])  # keys the command does not read are not looked at
    cfg = load_config(None, ["model.patch_encoder_weights=imagenet", "imagenet_fallback=true"])
    with caplog.at_level(logging.WARNING):
        check_imagenet_weights(cfg, ["model.patch_encoder_weights"])
    assert "imagenet_fallback is true: that trunk trains from random weights" in caplog.text
    monkeypatch.undo()
    # a file already in torch's cache is used without any network
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = __import__("torchvision").models.get_model_weights("resnet18")["IMAGENET1K_V1"].url
    cached = backbones.imagenet_cache_path(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"stands for the weights")
    check_imagenet_weights(load_config(None, ["dcg.backbone_weights=imagenet"]), ["dcg.backbone_weights"])
    with pytest.raises(ConfigError, match=r"^config key imagenet_fallback: expected bool"):
        load_config(None, ["imagenet_fallback=sometimes"])


# ------------------------------------------------------------------------------------------------ signals


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_the_final_validation_and_test_ends_with_one_line(tmp_path, signum, code):
    log = tmp_path / "fit.log"
    process = start_fit([f"trainer.log_dir={tmp_path}", *TINY], log)
    deadline = time.monotonic() + 600
    while "training finished: validating and testing" not in log.read_text() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert process.poll() is None, log.read_text()[-2000:]
    os.kill(process.pid, signum)
    assert process.wait(timeout=300) == code, log.read_text()[-3000:]
    text = log.read_text()
    (line,) = error_lines(text)
    assert "Traceback" not in text, text[-3000:]
    name = signal.Signals(signum).name
    run = tmp_path / "demo" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    what = "the final validation and test of the fit (training done: a resume runs them)"
    assert f"{what} interrupted by {name}: {last} holds the 2 finished epoch(s); resume with: python" in line, line
    assert not (run / "metrics.json").exists() and not leftovers(tmp_path)
    assert read_checkpoint(last)["epoch"] == 1 and read_checkpoint(run / "checkpoints" / "best.ckpt")
    if signum == signal.SIGTERM:  # the command it names runs what is left: the final validation and test
        resume = line.split("resume with: ", 1)[1].split()
        ok(cli(*resume[2:]))
        assert set(json.loads((run / "metrics.json").read_text())) >= {"val", "test"}
