"""Checkpoints a user can trust and share: weights-only loading (a payload never runs), damaged files refused by
name, the DCG stored once per run and found by checksum, checkpoint contents sized to their use, resumes checked
before anything is written, DCG files reused only for their own training, and predictions for unlabelled images."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, cli
from PIL import Image

import diffuser_trainer
from dataloader.synthetic import SyntheticPatterns
from diffmic.checkpoints import read_checkpoint
from diffmic.config import ConfigError, load_config
from diffmic.v2.system import DiffMICv2
from pretraining.dcg import build_dcg
from pretraining.dcg_file import load_dcg, save_dcg


class Payload:
    """Unpickling this object creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny demo fit: its log folder and the overrides that reach it."""
    logs = tmp_path_factory.mktemp("logs")
    args = [f"trainer.log_dir={logs}", *TINY]
    result = cli("fit", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return logs, args


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# --------------------------------------------------------------------------- unsafe and damaged files


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["test", "--ckpt", "{bad}"],
        ["validate", "--ckpt", "{bad}"],
        ["predict", "--ckpt", "{bad}"],
        ["fit", "--ckpt", "{bad}"],
        ["fit", "dcg.ckpt={bad}"],
    ],
)
def test_a_malicious_checkpoint_never_runs(tmp_path, capsys, command):
    marker, bad = tmp_path / "payload_ran", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "payload": Payload(marker)}, bad)
    logs = tmp_path / "logs"
    args = [word.format(bad=bad) for word in command] + [f"trainer.log_dir={logs}", *TINY]
    assert diffuser_trainer.main(args) == 2
    assert not marker.exists(), "unpickling ran the payload"
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and "holds a pickled io.open" in lines[0], lines
    assert not logs.exists(), "nothing may be written"


@pytest.mark.slow
@pytest.mark.parametrize("which", ["checkpoint", "dcg"])
def test_a_truncated_file_is_refused_by_name(run, tmp_path, capsys, which):
    logs, args = run
    source = logs / "demo" / ("dcg.pt" if which == "dcg" else "version_0/checkpoints/best.ckpt")
    damaged = tmp_path / source.name
    damaged.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    before = files_under(logs)
    extra = ["dcg.ckpt=" + str(damaged)] if which == "dcg" else ["--ckpt", str(damaged)]
    assert diffuser_trainer.main(["fit" if which == "dcg" else "test", *extra, *args, "seed=7"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{damaged} is truncated or damaged" in lines[0], lines
    assert files_under(logs) == before


# --------------------------------------------------------------------------- what a checkpoint holds


@pytest.mark.slow
def test_checkpoint_contents_fit_their_use(run):
    logs, _ = run
    folder = logs / "demo"
    best = read_checkpoint(folder / "version_0/checkpoints/best.ckpt")
    last = read_checkpoint(folder / "version_0/checkpoints/last.ckpt")
    dcg_keys = [k for k in {**best["state_dict"], **last["state_dict"]} if k.startswith("dcg.")]
    assert not dcg_keys, "the frozen DCG is stored once, in dcg.pt"
    assert "optimizer_states" not in best and "lr_schedulers" not in best, "best.ckpt holds what evaluation needs"
    assert last["optimizer_states"] and last["lr_schedulers"] and last["loops"], "last.ckpt holds a resume"
    for checkpoint in (best, last):
        assert checkpoint["dcg_file"]["relative"] == "../dcg.pt"
        assert checkpoint["dcg_file"]["path"] == str((folder / "dcg.pt").resolve())
    assert best["hyper_parameters"]["cfg"]["name"] == "demo"
    # the DCG pre-training leaves no checkpoint of its own: dcg.pt is the one copy
    assert not list((folder / "dcg").rglob("*.ckpt"))
    weights = sum(v.numel() * v.element_size() for v in best["state_dict"].values())
    assert (folder / "version_0/checkpoints/best.ckpt").stat().st_size < 1.1 * weights + 2e6


@pytest.mark.slow
def test_load_from_checkpoint_gives_the_trained_model(run):
    logs, _ = run
    path = logs / "demo" / "version_0" / "checkpoints" / "best.ckpt"
    system = DiffMICv2.load_from_checkpoint(path)
    assert not system.training and not system.dcg.training
    saved = read_checkpoint(path)["state_dict"]
    state = system.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    dcg = read_checkpoint(logs / "demo" / "dcg.pt")["state_dict"]
    assert all(torch.equal(state[f"dcg.{k}"], v) for k, v in dcg.items())


@pytest.mark.slow
def test_a_run_folder_moved_elsewhere_finds_its_dcg_and_a_changed_dcg_is_refused(run, tmp_path, capsys):
    logs, args = run
    moved = tmp_path / "moved"
    shutil.copytree(logs / "demo", moved / "demo", ignore=shutil.ignore_patterns("version_1*", "version_2*"))
    best = moved / "demo" / "version_0" / "checkpoints" / "best.ckpt"
    system = DiffMICv2.load_from_checkpoint(best)  # the recorded path still exists: same weights either way
    original = dict(system.dcg_file)
    # the recorded path gone (another machine): the copy beside the run folder is found by its checksum
    reference = read_checkpoint(best)["dcg_file"]
    checkpoint = read_checkpoint(best)
    checkpoint["dcg_file"] = {**reference, "path": str(tmp_path / "elsewhere" / "dcg.pt")}
    torch.save(checkpoint, best)
    found = DiffMICv2.load_from_checkpoint(best)
    assert found.dcg_file == {"path": str((moved / "demo" / "dcg.pt").resolve()), "sha256": original["sha256"]}
    # a DCG file that is not the one the checkpoint was trained with is refused, naming where it looked
    dcg = read_checkpoint(moved / "demo" / "dcg.pt")
    dcg["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in dcg["state_dict"].items()}
    torch.save(dcg, moved / "demo" / "dcg.pt")
    with pytest.raises(ConfigError, match=r"hold another DCG"):
        DiffMICv2.load_from_checkpoint(best, dcg_path=moved / "demo" / "dcg.pt")


# --------------------------------------------------------------------------- resume and DCG reuse


@pytest.mark.slow
def test_a_resume_that_does_not_fit_writes_nothing(run, capsys):
    logs, args = run
    config = logs / "demo" / "version_0" / "config.yaml"
    before, files = config.read_text(), files_under(logs)
    assert diffuser_trainer.main(["fit", "--ckpt", "last", *args, "model.feature_dim=32"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line or "Traceback" in line]
    assert len(lines) == 1 and "last.ckpt does not fit the config's model" in lines[0], lines
    assert config.read_text() == before and files_under(logs) == files


@pytest.mark.slow
def test_a_dcg_file_of_another_training_is_refused_unless_allowed(run, capsys):
    logs, args = run
    files = files_under(logs)
    assert diffuser_trainer.main(["fit", *args, "seed=8"]) == 2  # demo.yml's seed is 7: another split and seed
    lines = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(lines) == 1 and "was trained from another training split" in lines[0] and "seed 7" in lines[0]
    assert "dcg.require_same_training=false" in lines[0]
    assert files_under(logs) == files


def test_dcg_file_records_its_training(tmp_path):
    cfg = load_config(None, [*TINY, "data.class_names=null", "data.num_classes=3"])
    train = SyntheticPatterns(12, 3, 64, 16, seed=0)
    dcg = build_dcg(cfg)
    save_dcg(dcg, cfg, train, tmp_path / "dcg.pt")
    saved = read_checkpoint(tmp_path / "dcg.pt")["trained_from"]
    assert saved["training_images"] == 12 and saved["seed"] == cfg["seed"] and saved["epochs"] == 1
    load_dcg(build_dcg(cfg), cfg, tmp_path / "dcg.pt", train)  # its own training: accepted
    other = SyntheticPatterns(12, 3, 64, 16, seed=1)
    with pytest.raises(ConfigError, match="another training split"):
        load_dcg(build_dcg(cfg), cfg, tmp_path / "dcg.pt", other)
    with pytest.raises(ConfigError, match=r"epochs 1 \(this run: 5\)"):
        load_dcg(build_dcg(cfg), {**cfg, "dcg": {**cfg["dcg"], "epochs": 5}}, tmp_path / "dcg.pt", train)
    relaxed = {**cfg, "dcg": {**cfg["dcg"], "require_same_training": False}}
    load_dcg(build_dcg(cfg), relaxed, tmp_path / "dcg.pt", other)
    # the settings that shape the DCG are checked whatever the override
    with pytest.raises(ConfigError, match="num_rois"):
        load_dcg(build_dcg(cfg), {**relaxed, "dcg": {**relaxed["dcg"], "num_rois": 2}}, tmp_path / "dcg.pt")


# --------------------------------------------------------------------------- unlabelled images


def names_of(rows: dict) -> list[str]:
    """The score, prediction and spread columns of a predictions table."""
    return [k for k in next(iter(rows.values())) if k.startswith("score_") or k in ("pred", "spread")]


@pytest.mark.slow
def test_predict_on_a_folder_of_unlabelled_images(run, tmp_path):
    logs, args = run
    images = tmp_path / "new_cases"
    (images / "ward_b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "ward_b/c.png"):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(images / name)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "pred.csv"
    result = cli("predict", "--ckpt", "best", "--input", str(images), "--out", str(out), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["image"]: row for row in csv.DictReader(out.open())}
    assert set(rows) == {"a.png", "b.jpg", "broken.png", "ward_b/c.png"}
    names = ["h_stripes", "v_stripes", "checker", "ring"]
    assert list(next(iter(rows.values()))) == [
        "image",
        *[f"score_{n}" for n in names],
        "pred",
        "pred_name",
        "spread",
        *[f"prob_{n}" for n in names],
        "max_prob",
        "entropy",
        "agreement",
        "sample_spread",
        "status",
    ]
    for name in ("a.png", "b.jpg", "ward_b/c.png"):
        scores = [float(rows[name][f"score_{n}"]) for n in names]
        assert rows[name]["status"] == "ok" and int(rows[name]["pred"]) == scores.index(max(scores))
    assert rows["broken.png"]["status"].startswith("unreadable: cannot read image") and rows["broken.png"]["pred"] == ""
    assert rows["broken.png"]["prob_ring"] == rows["broken.png"]["entropy"] == ""
    assert "1 image(s) could not be read" in result.stderr
    # a list with only a path column (relative to its own folder here): every listed image a row, a missing one too
    (images / "cases.csv").write_text("path\na.png\nward_b/c.png\nmissing.png\n")
    listed = tmp_path / "listed.csv"
    result = cli("predict", "--ckpt", "best", "--input", str(images / "cases.csv"), "--out", str(listed), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    listed_rows = {row["image"]: row for row in csv.DictReader(listed.open())}
    assert list(listed_rows) == ["a.png", "ward_b/c.png", "missing.png"]
    assert {k: listed_rows["a.png"][k] for k in names_of(rows)} == {k: rows["a.png"][k] for k in names_of(rows)}
    assert listed_rows["missing.png"]["status"].startswith("unreadable: cannot read image")
    # a fitted temperature: from a validation pass over the data set's validation split, in the same datamodule as the
    # new images; it scales the probabilities, not the scores
    fitted = tmp_path / "fitted.csv"
    result = cli(
        "predict", "--ckpt", "best", "--input", str(images), "--out", str(fitted), *args, "evaluation.temperature=fit"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fitted on the validation split (32 images)" in result.stderr
    fitted_rows = {row["image"]: row for row in csv.DictReader(fitted.open())}
    assert [fitted_rows["a.png"][f"score_{n}"] for n in names] == [rows["a.png"][f"score_{n}"] for n in names]
    assert [fitted_rows["a.png"][f"prob_{n}"] for n in names] != [rows["a.png"][f"prob_{n}"] for n in names]


@pytest.mark.slow
def test_the_temperature_is_fitted_on_validation_only(run, tmp_path):
    """`test` with evaluation.temperature fit: another test split (the demo's test images come from their own seed,
    so changing their number changes the test split alone) leaves T as it was, and T scales the test metrics."""
    logs, args = run
    outputs = {}
    for name, extra in (("a", []), ("b", ["data.synthetic.num_test=16"])):
        out = tmp_path / f"{name}.json"
        result = cli("test", "--ckpt", "best", *args, "evaluation.temperature=fit", *extra, "--out", str(out))
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[name] = json.loads(out.read_text())
    a, b = outputs["a"], outputs["b"]
    assert a["temperature"] == b["temperature"] != 1.0
    assert a["test"]["calib/temperature"] == a["temperature"]
    assert a["test"]["calib/nll"] != b["test"]["calib/nll"]  # the test splits differ; only T is shared


@pytest.mark.slow
def test_predict_with_a_fitted_temperature_and_several_samples(run, tmp_path):
    """evaluation.temperature fit: the temperature comes from a validation pass (the test split fits nothing) and
    scales the probabilities, not the scores; with 3 samples the sample columns are defined."""
    logs, args = run
    common = ["predict", "--ckpt", "best", *args, "diffusion.eval_samples=3"]
    ok_plain = cli(*common, "--out", str(tmp_path / "plain.csv"))
    assert ok_plain.returncode == 0, ok_plain.stderr[-2000:]
    fitted = cli(*common, "evaluation.temperature=fit", "--out", str(tmp_path / "fitted.csv"))
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    assert "fitted on the validation split (32 images)" in fitted.stderr
    plain = list(csv.DictReader((tmp_path / "plain.csv").open()))
    scaled = list(csv.DictReader((tmp_path / "fitted.csv").open()))
    names = ["h_stripes", "v_stripes", "checker", "ring"]
    assert [r[f"score_{n}"] for r in plain for n in names] == [r[f"score_{n}"] for r in scaled for n in names]
    assert [r["prob_ring"] for r in plain] != [r["prob_ring"] for r in scaled]
    for row in scaled:
        assert sum(float(row[f"prob_{n}"]) for n in names) == pytest.approx(1.0, abs=1e-5)
        assert round(float(row["agreement"]) * 3, 4) in (0.0, 1.0, 2.0, 3.0) and float(row["sample_spread"]) >= 0
    # without the data set's lists there is no validation split to fit on: exit 2 before any work
    images = tmp_path / "new"
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(images / "a.png")
    refused = cli(
        *common, "--input", str(images), "data.dataset=list", "evaluation.temperature=fit", "--out", str(tmp_path / "x")
    )
    assert refused.returncode == 2 and "evaluation.temperature" in refused.stderr
    assert not (tmp_path / "x").exists()
