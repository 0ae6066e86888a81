"""The command line end to end: the demo as a user runs it, evaluation from saved checkpoints,
resuming, predict's CSV, and config errors (exit code 2, one line, nothing written)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from helpers import TINY, cli, ok, write_image_lists
from PIL import Image

SCORES = ("max_prob", "entropy", "agreement", "sample_spread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    args = [f"trainer.log_dir={logs}", *TINY]
    ok(cli("fit", *args))
    return logs, args


@pytest.mark.slow
def test_fit_writes_run_directory(tiny_run):
    logs, _ = tiny_run
    run = logs / "demo" / "version_0"
    assert (logs / "demo" / "dcg.pt").is_file(), "fit must pre-train and save the DCG when it is missing"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard events missing"
    assert (run / "config.yaml").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"checkpoint", "val", "test", "selection"}
    per_class = {f"recall/{name}" for name in ("h_stripes", "v_stripes", "checker", "ring")}  # demo.yml's names
    accuracy_type = {"acc", "balanced_acc", "precision", "recall", "f1", "auc", "kappa"} | per_class
    assert {k for k in metrics["test"] if not k.startswith(("calib/", "selective/"))} == accuracy_type
    # calibration, and selective prediction by every confidence score (the sample scores NaN: eval_samples 1)
    selective = {f"selective/{m}/{s}" for m in ("aurc", "eaurc", "acc@0.9", "acc@0.8", "acc@0.7") for s in SCORES}
    calibration = {"calib/temperature", "calib/ece", "calib/brier", "calib/nll", "selective/aurc_optimal"}
    assert set(metrics["test"]) - accuracy_type == calibration | selective
    assert metrics["temperature"] == 1.0 and metrics["test"]["calib/temperature"] == 1.0
    assert all(math.isnan(metrics["test"][f"selective/aurc/{s}"]) for s in ("agreement", "sample_spread"))
    assert 0 <= metrics["test"]["calib/ece"] <= 1 and 0 <= metrics["test"]["calib/brier"] <= 2
    for name in ("reliability_test.png", "risk_coverage_test.png"):
        with Image.open(run / name) as image:
            assert image.format == "PNG" and image.size[0] >= 400
    # the learning curve: one validation per epoch (val_every 1, max_epochs 2), the best of them the selected one
    history = metrics["val_history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert set(history[0]) == {"epoch"} | set(metrics["val"])
    assert metrics["selection"]["best_score"] == pytest.approx(max(h["f1"] for h in history), abs=1e-6)


@pytest.mark.slow
def test_tensorboard_has_metrics_and_confusion_matrix(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs, _ = tiny_run
    events = EventAccumulator(str(logs / "demo" / "version_0"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss_epoch", "val/f1", "val/auc", "val/kappa", "test/acc"} <= scalars
    assert any(tag.startswith("lr") for tag in scalars)
    assert {"val/confusion_matrix", "val/reliability", "val/risk_coverage", "test/reliability"} <= set(
        events.Tags()["images"]
    )
    assert {"val/calib/ece", "test/calib/nll", "test/selective/aurc/max_prob"} <= scalars


@pytest.mark.slow
def test_validate_and_test_reproduce_fit_metrics(tiny_run, tmp_path):
    logs, args = tiny_run
    fit = json.loads((logs / "demo" / "version_0" / "metrics.json").read_text())
    ok(cli("validate", "--ckpt", "best", "--out", str(tmp_path / "val.json"), *args))
    ok(
        cli(
            "test",
            "--ckpt",
            str(logs / "demo" / "version_0" / "checkpoints" / "best.ckpt"),
            "--out",
            str(tmp_path / "test.json"),
            *args,
        )
    )
    val = json.loads((tmp_path / "val.json").read_text())["val"]
    test = json.loads((tmp_path / "test.json").read_text())["test"]
    assert val == pytest.approx(fit["val"], abs=1e-9, nan_ok=True)
    assert test == pytest.approx(fit["test"], abs=1e-9, nan_ok=True)
    assert val["f1"] == pytest.approx(fit["selection"]["best_score"], abs=1e-6)


@pytest.mark.slow
def test_predict_writes_one_row_per_image(tiny_run, tmp_path):
    _, args = tiny_run
    ok(cli("predict", "--ckpt", "best", "--out", str(tmp_path / "pred.csv"), *args))
    rows = list(csv.DictReader((tmp_path / "pred.csv").open()))
    assert len(rows) == 24
    names = ["h_stripes", "v_stripes", "checker", "ring"]
    head = ["image", "label"] + [f"score_{n}" for n in names] + ["pred", "pred_name", "spread"]
    head += [f"prob_{n}" for n in names] + ["max_prob", "entropy", "agreement", "sample_spread"]
    assert list(rows[0]) == head
    for row in rows:
        scores = [float(row[f"score_{n}"]) for n in names]
        assert int(row["pred"]) == scores.index(max(scores)) and row["pred_name"] == names[int(row["pred"])]
        probs = [float(row[f"prob_{n}"]) for n in names]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and min(probs) >= 0
        assert probs.index(max(probs)) == int(row["pred"]) and float(row["max_prob"]) == max(probs)
        entropy = -sum(p * math.log(p) for p in probs if p > 0)
        assert float(row["entropy"]) == pytest.approx(entropy, abs=1e-5)
        # one sample per image (the demo's eval_samples 1): undefined, written as nan, never 0
        assert row["agreement"] == "nan" and row["sample_spread"] == "nan"
        # every DDIM step clips x0 to [-1, 1], so the cells, their mean and their standard deviation stay within it
        assert all(-1.0 <= s <= 1.0 for s in scores) and 0.0 <= float(row["spread"]) <= 1.0
    # the spread is each image's own (computed exactly in tests/test_diffmic_v2.py), not a constant column
    assert len({row["spread"] for row in rows}) > 1
    assert sorted(row["image"] for row in rows) == sorted(f"synthetic_9_{k:05d}" for k in range(24))


@pytest.mark.slow
def test_resume_from_last_continues_the_same_version(tiny_run):
    logs, args = tiny_run
    ok(cli("fit", "--ckpt", "last", *args, "trainer.max_epochs=3"))
    import torch

    last = torch.load(logs / "demo" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 2, "resuming from epoch 2 with max_epochs 3 must train exactly one more epoch"
    assert not (logs / "demo" / "version_1" / "checkpoints").exists()
    # the learning curve continues from the checkpoint's: the two epochs before the resume, then the third
    metrics = json.loads((logs / "demo" / "version_0" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["val_history"]] == [0, 1, 2]
    assert [h["epoch"] for h in last["val_history"]] == [0, 1, 2]


CONFIG_ERRORS = [
    (["optim.lrr=0.1"], "optim.lrr"),
    (["trainer.max_epochs=many"], "trainer.max_epochs"),
    (["model.image_encoder=vit_h"], "model.image_encoder"),
    (["model.efficientsam_weights=/nonexistent/efficient_sam_vits.pt"], "/nonexistent/efficient_sam_vits.pt"),
    (["--config", "/nonexistent/config.yml"], "/nonexistent/config.yml"),
    (["data.dataset=list"], "data.root"),
    (["dcg.num_rois=9"], "dcg.num_rois"),
    (["validate", "--ckpt", "best"], "best.ckpt"),
    (["model.patch_encoder=resnet50", "model.patch_encoder_weights=dcg"], "model.patch_encoder_weights"),
    (["dcg.cross_fit_folds=2"], "unknown config key dcg.cross_fit_folds"),
    (["diffusion.eval_samples=0"], "diffusion.eval_samples"),
    (["trainer.strategy=banana"], "trainer.strategy"),
    (["trainer.sync_batchnorm=sometimes"], "trainer.sync_batchnorm"),
]


@pytest.mark.parametrize("args, needle", CONFIG_ERRORS)
def test_config_error_returns_2_with_one_line(tmp_path, capsys, args, needle):
    import diffuser_trainer

    logs = tmp_path / "logs"
    assert diffuser_trainer.main([*args, f"trainer.log_dir={logs}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert not logs.exists(), "a config error must not write anything"


@pytest.mark.slow
@pytest.mark.parametrize("key", ["model.efficientsam_weights", "model.patch_encoder_weights"])
def test_unreadable_weights_file_exits_2_naming_key_and_file(tiny_run, tmp_path, key):
    """The model layer refuses the file with a plain error; the command line names the config key."""
    logs, args = tiny_run
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a checkpoint")
    versions = sorted(p.name for p in (logs / "demo").iterdir())
    result = cli("fit", *args, f"{key}={bad}")
    lines = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1 and f"config key {key}: {bad}: not a readable" in lines[0], result.stderr[-2000:]
    assert sorted(p.name for p in (logs / "demo").iterdir()) == versions, "no new run folder"


@pytest.mark.slow
def test_config_error_exit_code_of_the_process(tmp_path):
    result = cli("optim.lrr=0.1", f"trainer.log_dir={tmp_path / 'logs'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].endswith("unknown config key optim.lrr"), result.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_train_dcg_script_alone(tmp_path):
    """Run as the README shows it, from another directory: the installed project needs no path set-up."""
    ok(
        cli(
            f"trainer.log_dir={tmp_path}",
            *TINY,
            "dcg.ckpt=" + str(tmp_path / "dcg_alone.pt"),
            script="pretraining/train_dcg.py",
            cwd=tmp_path,
        )
    )
    assert (tmp_path / "dcg_alone.pt").is_file()


@pytest.mark.slow
def test_fit_and_test_on_own_csv_lists(tmp_path):
    """The README's own-data recipe: an image folder, CSV lists, a config of a few keys."""
    write_image_lists(tmp_path, count=30, num_classes=3, num_train=24, size=(48, 80))
    (tmp_path / "mine.yml").write_text(
        "name: mine\ndata:\n  dataset: list\n  num_classes: 3\n  image_size: 64\n  batch_size: 8\n  num_workers: 0\n"
        "dcg: {num_rois: 3, epochs: 1, batch_size: 8}\nmodel: {image_encoder: vit_t, feature_dim: 16}\n"
        "trainer: {max_epochs: 1, val_every: 1}\n"
    )
    # paths typed on the command line are relative to the shell's directory
    common = [
        "--config",
        "mine.yml",
        "data.root=images",
        "data.train_list=train.csv",
        "data.test_list=test.csv",
        "trainer.log_dir=logs",
    ]
    ok(cli("fit", *common, cwd=tmp_path))
    ok(cli("test", "--ckpt", "best", "--out", "test.json", *common, cwd=tmp_path))
    evaluated = json.loads((tmp_path / "test.json").read_text())
    fitted = json.loads((tmp_path / "logs" / "mine" / "version_0" / "metrics.json").read_text())
    assert Path(evaluated["checkpoint"]) == (tmp_path / "logs" / "mine" / "version_0" / "checkpoints" / "best.ckpt")
    # the 6 listed test images, evaluated twice (a class absent from them has a NaN recall in both)
    assert evaluated["test"] == pytest.approx(fitted["test"], abs=1e-9, nan_ok=True)
