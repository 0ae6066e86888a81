"""The explanations through the command line: predict --explain DIR writes a figure per image with the scores of the
CSV (and leaves the CSV as it was), TensorBoard gets val/explain/<i> at every validation of a fit without changing
any metric, and bad --explain folders exit with code 2 before any work."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, TINY, cli, ok
from PIL import Image


@pytest.fixture(scope="module")
def explained_run(tmp_path_factory):
    """A tiny demo fit with the demo's explain.val_images (2)."""
    logs = tmp_path_factory.mktemp("logs")
    args = [f"trainer.log_dir={logs}", *TINY]
    ok(cli("fit", *args))
    return logs, args


@pytest.mark.slow
def test_tensorboard_holds_val_explain_images_at_every_validation(explained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs, _ = explained_run
    events = EventAccumulator(str(logs / "demo" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    assert {"val/explain/0", "val/explain/1"} <= tags and "val/explain/2" not in tags  # demo.yml: 2 images
    assert "val/confusion_matrix" in tags
    for tag in ("val/explain/0", "val/explain/1"):
        images = events.Images(tag)
        assert [i.step for i in images] == [0, 1], "one figure per validation (two epochs, val_every 1)"
        picture = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
        assert picture.shape[0] > 200 and picture.shape[1] > 800 and picture.std() > 10


@pytest.mark.slow
def test_validation_figures_change_no_metric(explained_run, tmp_path):
    """The same fit without TensorBoard figures: the same validation metrics at every epoch and the same test."""
    logs, args = explained_run
    ok(cli("fit", f"trainer.log_dir={tmp_path}", *TINY, "explain.val_images=0"))
    quiet = json.loads((tmp_path / "demo" / "version_0" / "metrics.json").read_text())
    shown = json.loads((logs / "demo" / "version_0" / "metrics.json").read_text())
    assert quiet["val_history"] == shown["val_history"] and quiet["test"] == shown["test"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "demo" / "version_0"))
    events.Reload()
    assert not [t for t in events.Tags()["images"] if t.startswith("val/explain")], "explain.val_images=0 is off"


@pytest.mark.slow
def test_predict_explain_writes_figures_whose_scores_are_the_csvs(explained_run, tmp_path):
    logs, args = explained_run
    ok(cli("predict", "--ckpt", "best", "--out", str(tmp_path / "plain.csv"), *args))
    folder = tmp_path / "figures" / "new"  # made when the figures are written
    ok(cli("predict", "--ckpt", "best", "--out", str(tmp_path / "explained.csv"), *args, "--explain", str(folder),
           "--explain-max", "5"))  # fmt: skip
    assert (tmp_path / "plain.csv").read_bytes() == (tmp_path / "explained.csv").read_bytes(), "the CSV is unchanged"
    assert sorted(p.name for p in folder.iterdir()) == [f"synthetic_9_{k:05d}.png" for k in range(5)]
    assert Image.open(folder / "synthetic_9_00000.png").size[0] > 800

    # the explanation of the first images, as write_explanations computes it (the predict batches of 16 images),
    # reproduces the CSV's scores
    import pytorch_lightning as pl

    from dataloader.datamodule import build_datasets
    from diffmic.config import load_config
    from diffmic.explain.outputs import explain_items
    from diffmic.v2.system import DiffMICv2

    cfg = load_config(None, args)
    system = DiffMICv2.load_from_checkpoint(next((logs / "demo").glob("version_0/checkpoints/best.ckpt")))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    expl, errors = explain_items(
        system, trainer, build_datasets(cfg)["test"], list(range(16)), trainer.precision_plugin.predict_step_context
    )
    rows = list(csv.DictReader((tmp_path / "plain.csv").open()))[:16]
    names = cfg["data"]["class_names"]
    for b, row in enumerate(rows):
        assert [row[f"score_{n}"] for n in names] == [f"{s:.6f}" for s in expl.scores[b].tolist()]
    assert errors == [""] * 16


@pytest.mark.slow
def test_predict_explain_on_new_images_skips_the_unreadable_one(explained_run, tmp_path):
    logs, args = explained_run
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(images / "good.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    out, folder = tmp_path / "new.csv", tmp_path / "figures"
    ok(cli("predict", "--ckpt", "best", "--input", str(images), "--out", str(out), "--explain", str(folder), *args))
    rows = {row["image"]: row for row in csv.DictReader(out.open())}
    assert rows["good.png"]["status"] == "ok" and rows["broken.jpg"]["status"].startswith("unreadable:")
    assert sorted(p.name for p in folder.iterdir()) == ["good.png"], "no figure for the unreadable image"


def explain_error(tmp_path, capsys, *args: str) -> str:
    import diffuser_trainer

    logs = tmp_path / "logs"
    assert diffuser_trainer.main([*args, *TINY, f"trainer.log_dir={logs}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert not logs.exists(), "refused before any work: nothing written"
    return lines[0]


def test_explain_into_a_file_exits_2_before_any_work(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    line = explain_error(tmp_path, capsys, "predict", "--ckpt", "best", "--explain", str(taken))
    assert f"--explain {taken} is a file" in line
    line = explain_error(tmp_path, capsys, "predict", "--ckpt", "best", "--explain", str(taken / "below"))
    assert "is a file, so no folder can be made there" in line


def test_explain_where_nothing_can_be_written_exits_2(tmp_path, capsys):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "figures"
    else:  # root passes every permission check; /proc takes no new files, not even root's
        target = Path("/proc/figures")
    line = explain_error(tmp_path, capsys, "predict", "--ckpt", "best", "--explain", str(target))
    assert "cannot write in" in line and "give a folder you can write" in line


@pytest.mark.parametrize(
    "args, needle",
    [
        (["test", "--ckpt", "best", "--explain", "x"], "--explain is for predict, not test"),
        (
            ["predict", "--ckpt", "best", "--explain-max", "3"],
            "--explain-max 3: give a number >= 1, with --explain",
        ),
        (["predict", "--ckpt", "best", "--explain", "x", "--explain-max", "0"], "--explain-max 0"),
        (["explain.val_images=9"], "explain.val_images"),
    ],
)
def test_explain_option_errors(tmp_path, capsys, args, needle):
    assert needle in explain_error(tmp_path, capsys, *args)


@pytest.mark.slow
def test_the_explanation_sheet_stacks_the_first_test_images(explained_run, tmp_path):
    """benchmarks/explain_sheet.py: the figures of the first N images of a test list, one under another, and a note
    whose predictions are predict's on the whole list."""
    from helpers import write_image_lists

    from benchmarks import explain_sheet

    logs, args = explained_run
    write_image_lists(tmp_path, 12, 4, 6, (40, 48))
    lists = [
        "data.dataset=list",
        f"data.root={tmp_path / 'images'}",
        f"data.train_list={tmp_path / 'train.csv'}",
        f"data.test_list={tmp_path / 'test.csv'}",
        "data.val_fraction=0.5",
    ]
    ckpt = next(logs.glob("demo/version_*/checkpoints/best.ckpt"))
    out = tmp_path / "sheet.png"
    argv = ["--config", str(ROOT / "configs" / "demo.yml"), "--ckpt", str(ckpt), "--count", "3", "--out", str(out)]
    assert explain_sheet.main([*argv, *args, *lists]) == 0
    whole, figures = tmp_path / "whole.csv", tmp_path / "figures"
    ok(
        cli(
            "predict",
            "--ckpt",
            str(ckpt),
            "--out",
            str(whole),
            "--explain",
            str(figures),
            "--explain-max",
            "3",
            *args,
            *lists,
        )
    )
    first = list(csv.DictReader(whole.open()))[:3]
    note = out.with_suffix(".md").read_text()
    for row in first:  # the sheet's images are the list's first three, with predict's own predictions
        assert f"| {row['image']} | " in note and f"| {row['pred_name']} | {row['max_prob']} |" in note
    sizes = [Image.open(p).size for p in sorted(figures.glob("*.png"))]
    assert len(sizes) == 3
    with Image.open(out) as sheet:  # the three figures one under another
        assert sheet.format == "PNG" and sheet.size == (max(w for w, _ in sizes), sum(h for _, h in sizes))
