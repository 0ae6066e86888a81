"""The accuracy benchmark script runs end to end (one seed, a few batches) and writes its report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import write_image_lists

from benchmarks import accuracy, common, prior_fit

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "medmnist" / "breastmnist.npz").is_file(), reason=f"{SHARED} is absent")
def test_accuracy_benchmark_smoke(tmp_path, capfd):
    argv = [
        "--config",
        str(ROOT / "configs" / "bench_breastmnist.yml"),
        "--seeds",
        "0",
        "--methods",
        "resnet18",
        "dcg",
        "diffmic",
        "diffmic_v1",
        "diffmic-no_guided_map",
        "diffmic-no_roi_branch",
        "--ddim-steps",
        "2",
        "--eval-samples",
        "4",
        "--out-dir",
        str(tmp_path),
        "--name",
        "smoke",
        f"data.root={SHARED / 'medmnist'}",
        f"trainer.log_dir={tmp_path / 'logs'}",
        "dcg.epochs=1",
        "trainer.max_epochs=1",
        "trainer.val_every=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "model.feature_dim=16",
        "v1.feature_dim=16",
        "v1.sampling_steps=5",
        "v1.warmup_epochs=0",
    ]
    assert accuracy.main(argv) == 0
    report = json.loads((tmp_path / "smoke.json").read_text())
    trained = ["resnet18", "dcg", "diffmic", "diffmic_v1", "diffmic-no_guided_map", "diffmic-no_roi_branch"]
    # the diffmic checkpoint re-evaluated with other sampling settings: no training of its own
    evaluated = ["diffmic-ddim_2", "diffmic-samples_4"]
    assert [r["method"] for r in report["runs"]] == trained + evaluated
    for method in trained + evaluated:
        entry = report["summary"][method]
        run = next(r for r in report["runs"] if r["method"] == method)
        # one seed: the mean is that run's accuracy, a whole number of the 156 test images
        assert entry["acc"]["mean"] == run["test"]["acc"] and entry["acc"]["std"] == 0.0
        assert run["test"]["acc"] * 156 == pytest.approx(round(run["test"]["acc"] * 156), abs=1e-9)
        assert entry["train_s"] > 0 if method in trained else math.isnan(entry["train_s"])
        # recall of each named class (both occur in the test split): their mean is the macro recall
        per_class = {k: v for k, v in run["test"].items() if k.startswith("recall/")}
        assert len(per_class) == 2 and all(entry[k]["mean"] == v for k, v in per_class.items())
        assert sum(per_class.values()) / 2 == pytest.approx(run["test"]["recall"])
    # the ablations are guided by the seed's DCG, trained once by the dcg method
    assert sorted(p.name for p in (tmp_path / "logs").rglob("*.pt")) == ["dcg.pt"]
    text = (tmp_path / "smoke.md").read_text()
    assert (
        "| diffmic |" in text
        and "| diffmic-no_roi_branch |" in text
        and "| diffmic-samples_4 |" in text
        and "Test recall per class" in text
        and "Command:" in text
        and "Machine:" in text
    )

    # --resume keeps the recorded runs and runs only the missing ones, guided by the seed's recorded DCG
    dcg_file = next((tmp_path / "logs").rglob("dcg.pt"))
    dcg_written = dcg_file.stat().st_mtime_ns
    tail = argv[argv.index("--out-dir") :]
    resume = ["--config", argv[1], "--seeds", "0", "--methods", "dcg", "diffmic-no_focal_weight", "--resume", *tail]
    assert accuracy.main([*resume, "--ddim-steps", "2"]) == 0
    resumed = json.loads((tmp_path / "smoke.json").read_text())
    assert json.dumps(resumed["runs"][: len(report["runs"])]) == json.dumps(report["runs"])  # NaN-safe
    assert [r["method"] for r in resumed["runs"][len(report["runs"]) :]] == ["diffmic-no_focal_weight"]
    added, dcg = resumed["runs"][-1], report["runs"][1]
    assert dcg_file.stat().st_mtime_ns == dcg_written  # not pre-trained again: its recorded time is counted
    assert added["train_s"] == pytest.approx(added["denoiser_s"] + dcg["train_s"])
    assert len(resumed["resumed_with"]) == 1 and "Resumed with:" in (tmp_path / "smoke.md").read_text()
    # a report of another config is not continued
    capfd.readouterr()
    assert accuracy.main([*resume, "optim.lr=1e-4"]) == 2
    assert "written with another config (differs in optim.lr)" in capfd.readouterr().err

    # a later call re-evaluates the trained diffmic checkpoint of each seed without training anything
    again = [a if a != "smoke" else "again" for a in argv[argv.index("--out-dir") :]]
    assert accuracy.main(["--config", argv[1], "--seeds", "0", "--methods", "--eval-samples", "2", *again]) == 0
    report = json.loads((tmp_path / "again.json").read_text())
    assert [r["method"] for r in report["runs"]] == ["diffmic-samples_2"]
    assert math.isnan(report["runs"][0]["train_s"]) and set(report["runs"][0]["test"]) >= {"acc", "f1", "auc", "kappa"}

    # the fit of the seed's DCG prior on its own training images and on the validation split
    overrides = argv[argv.index("--name") + 2 :]
    assert prior_fit.main(["--config", argv[1], "--seeds", "0", "--out-dir", str(tmp_path), *overrides]) == 0
    rows = json.loads((tmp_path / "breastmnist_prior_fit.json").read_text())["rows"]
    assert [(r["seed"], r["split"], r["images"]) for r in rows] == [(0, "train", 546), (0, "val", 78)]
    for r in rows:  # gamma = 1: w = 1 + alpha (1 - p), so the means obey the same line
        assert r["acc"] * r["images"] == pytest.approx(round(r["acc"] * r["images"]), abs=1e-9)
        assert r["focal_weight"] == pytest.approx(1 + 10.0 * (1 - r["p_true"]), rel=1e-4)
        # two classes: a wrong prior has p(true) < 0.5 and a right one > 0.5, so every wrong image weighs more than
        # every right one, and the wrong images' share of the weight is at least their share of the images
        assert (r["wrong_weight_share"] == 0.0) == (r["acc"] == 1.0)
        assert r["wrong_weight_share"] >= (1 - r["acc"]) - 1e-9
    assert "| mean | train |" in (tmp_path / "breastmnist_prior_fit.md").read_text()
    # without a trained DCG it says which file is missing
    capfd.readouterr()
    assert prior_fit.main(["--config", argv[1], "--seeds", "5", "--out-dir", str(tmp_path), *overrides]) == 2
    assert f"no DCG file {tmp_path / 'logs' / 'bench_breastmnist' / 'seed_5' / 'dcg.pt'}" in capfd.readouterr().err


@pytest.mark.slow
def test_accuracy_benchmark_needs_the_same_epochs_for_every_method(tmp_path, capfd):
    argv = [
        "--config",
        str(ROOT / "configs" / "bench_breastmnist.yml"),
        "--out-dir",
        str(tmp_path),
        f"trainer.log_dir={tmp_path / 'logs'}",
        "dcg.epochs=3",
        "trainer.max_epochs=4",
    ]
    assert accuracy.main(argv) == 2
    assert "dcg.epochs (3) and trainer.max_epochs (4) must agree" in capfd.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_method_cost_benchmark_smoke(tmp_path):
    """Both methods' samplers, with the encoders once and as the authors' code runs them, on the demo's small
    models: the two ways give the same outputs, and re-running the encoders costs more FLOPs."""
    from benchmarks import method_cost

    demo = str(ROOT / "configs" / "demo.yml")
    argv = ["--v2-config", demo, "--v1-config", demo, "--v1-steps", "4", "--repeats", "1", "--batch-size", "2"]
    assert method_cost.main([*argv, "--out-dir", str(tmp_path), "model.feature_dim=16", "v1.feature_dim=16"]) == 0
    report = json.loads((tmp_path / "method_cost_cpu.json").read_text())
    assert all(report["every_step_output_equals_encoders_once"].values())
    variants = list(report["variants"].values())
    assert len(variants) == 4 and (tmp_path / "method_cost_cpu.md").is_file()
    for once, every in ((variants[0], variants[1]), (variants[2], variants[3])):
        assert every["gflop_per_image"] > once["gflop_per_image"] > 0


@pytest.mark.slow
def test_accuracy_benchmark_with_a_carved_validation_split(tmp_path):
    """Without data.val_list the validation set is carved per seed (as `fit` carves it): each seed's DCG must train on
    its seed's split, or its DiffMIC run refuses the DCG file as trained on other images (as it did for seed 1)."""
    write_image_lists(tmp_path, count=48, num_classes=2, num_train=36, size=(40, 40))
    (tmp_path / "bench.yml").write_text(
        f"name: carved\ndata:\n  dataset: list\n  root: {tmp_path / 'images'}\n  train_list: {tmp_path / 'train.csv'}\n"
        f"  test_list: {tmp_path / 'test.csv'}\n  val_fraction: 0.25\n  num_classes: 2\n  image_size: 64\n"
        "  batch_size: 8\n  num_workers: 0\n"
        "dcg: {num_rois: 3, epochs: 1, batch_size: 8}\nmodel: {image_encoder: vit_t, feature_dim: 16}\n"
        "diffusion: {timesteps: 20}\ntrainer: {max_epochs: 1, val_every: 1}\n"
    )
    common = ["--out-dir", str(tmp_path), "--name", "carved", f"trainer.log_dir={tmp_path / 'logs'}"]
    argv = ["--config", str(tmp_path / "bench.yml"), "--seeds", "0", "1", "--methods", "dcg", "diffmic", *common]
    assert accuracy.main(argv) == 0
    report = json.loads((tmp_path / "carved.json").read_text())
    assert [(r["method"], r["seed"]) for r in report["runs"]] == [
        ("dcg", 0),
        ("diffmic", 0),
        ("dcg", 1),
        ("diffmic", 1),
    ]
    # the DCG of each seed evaluated on its own seed's validation images
    overrides = common[4:]
    assert prior_fit.main(["--config", argv[1], "--seeds", "0", "1", "--out-dir", str(tmp_path), *overrides]) == 0
    rows = json.loads((tmp_path / "carved_prior_fit.json").read_text())["rows"]
    assert [(r["seed"], r["split"], r["images"]) for r in rows] == [
        (s, p, n) for s in (0, 1) for p, n in (("train", 27), ("val", 9))
    ]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "medmnist" / "breastmnist.npz").is_file(), reason=f"{SHARED} is absent")
def test_learning_curves_smoke(tmp_path, capfd):
    from PIL import Image

    from benchmarks import learning_curves

    argv = [
        "--config",
        str(ROOT / "configs" / "bench_breastmnist.yml"),
        "--epochs",
        "3",
        "--seeds",
        "0",
        "--out-dir",
        str(tmp_path),
        "--name",
        "smoke_long",
        f"data.root={SHARED / 'medmnist'}",
        f"trainer.log_dir={tmp_path / 'logs'}",
        "dcg.epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "model.feature_dim=16",
    ]
    assert learning_curves.main(argv) == 0
    report = json.loads((tmp_path / "smoke_long.json").read_text())
    assert [r["method"] for r in report["runs"]] == ["dcg", "diffmic", "resnet18"]
    for run in report["runs"][1:]:
        # validated every epoch of the longer training; tested at the epoch best.ckpt kept (highest val F1, later
        # on a tie), whose validation metrics are the ones re-measured from that checkpoint
        assert [h["epoch"] for h in run["val_history"]] == [0, 1, 2]
        f1 = [h["f1"] for h in run["val_history"]]
        assert run["best_epoch"] == max(e for e, v in enumerate(f1) if v == max(f1))
        assert run["val"]["f1"] == pytest.approx(max(f1), abs=1e-6)
    # the DCG is trained dcg.epochs (1), the others --epochs; the curve of the fixed DCG is its own value each epoch
    dcg = report["summary"]["dcg"]["curves"]["f1"]["mean"]
    assert dcg == [report["runs"][0]["val"]["f1"]] * 3
    assert report["summary"]["diffmic"]["curves"]["acc"]["mean"] == [h["acc"] for h in report["runs"][1]["val_history"]]
    with Image.open(tmp_path / "smoke_long.png") as image:
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 300
    text = (tmp_path / "smoke_long.md").read_text()
    assert "![learning curves](smoke_long.png)" in text and "| 3 |" in text and "passes its DCG" in text
    # per-class test recall of each method, read from its test metrics (one seed: no spread)
    recalls = {k: v for k, v in report["runs"][1]["test"].items() if k.startswith("recall/")}
    assert len(recalls) == 2
    assert "| diffmic | " + " | ".join(f"{v:.3f} ± 0.000" for v in recalls.values()) + " |" in text
    # another seed added with --resume: the first seed's runs are kept, its DCG file untouched
    dcg_file = tmp_path / "logs" / "bench_breastmnist" / "seed_0" / "dcg.pt"
    stamp = dcg_file.stat().st_mtime_ns
    assert learning_curves.main([*argv[:5], "0", "1", *argv[6:], "--resume", "--methods", "dcg"]) == 0
    report = json.loads((tmp_path / "smoke_long.json").read_text())
    assert [(r["method"], r["seed"]) for r in report["runs"]] == [
        ("dcg", 0),
        ("diffmic", 0),
        ("resnet18", 0),
        ("dcg", 1),
    ]
    assert dcg_file.stat().st_mtime_ns == stamp
    # a kept DCG row of a seed still to finish is evaluated again from the file that guides its runs (a row written
    # on another machine may describe another DCG): here a row tampered with as such a one would differ
    seed_1 = report["runs"][3]
    report["runs"][3] = {**seed_1, "val": {**seed_1["val"], "f1": -1.0}}
    (tmp_path / "smoke_long.json").write_text(json.dumps(report))
    assert learning_curves.main([*argv[:5], "1", *argv[6:], "--resume", "--methods", "dcg", "diffmic"]) == 0
    report = json.loads((tmp_path / "smoke_long.json").read_text())
    assert [(r["method"], r["seed"]) for r in report["runs"]][3:] == [("dcg", 1), ("diffmic", 1)]
    assert report["runs"][3]["val"] == pytest.approx(seed_1["val"], nan_ok=True)
    # a DCG file left by the accuracy benchmark for the same training is reused, not trained again
    capfd.readouterr()
    assert learning_curves.main([*argv[:9], "other", *argv[10:], "--methods", "dcg"]) == 0
    assert "reusing the DCG file" in capfd.readouterr().err and dcg_file.stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "medmnist" / "breastmnist.npz").is_file(), reason=f"{SHARED} is absent")
def test_uncertainty_benchmark_smoke(tmp_path):
    from PIL import Image

    from benchmarks import plots, uncertainty

    argv = [
        "--config",
        str(ROOT / "configs" / "bench_breastmnist.yml"),
        "--seeds",
        "0",
        "--out-dir",
        str(tmp_path),
        "--name",
        "uncertainty_smoke",
        f"data.root={SHARED / 'medmnist'}",
        f"trainer.log_dir={tmp_path / 'logs'}",
        "dcg.epochs=1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "model.feature_dim=16",
        "diffusion.sampling_steps=2",
    ]
    assert uncertainty.main(argv) == 0
    report = json.loads((tmp_path / "uncertainty_smoke.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["resnet18", "dcg", "diffmic_s1", "diffmic_s16"]
    for run in report["runs"]:
        # the temperature is fitted on validation and reported with the test metrics it scaled
        assert run["test_scaled"]["calib/temperature"] == run["temperature"] and run["test"]["calib/temperature"] == 1
        assert 0 <= run["test"]["calib/ece"] <= 1 and run["test"]["calib/nll"] > 0
        assert run["test"]["calib/ece"] == pytest.approx(run["reliability"]["raw"]["ece"], abs=1e-6)
        aurc = run["test_scaled"]["selective/aurc/max_prob"]
        assert aurc >= run["test_scaled"]["selective/aurc_optimal"] - 1e-12
        assert run["test_scaled"]["selective/eaurc/max_prob"] == pytest.approx(
            aurc - run["test_scaled"]["selective/aurc_optimal"]
        )
    s1, s16 = report["runs"][2], report["runs"][3]
    # one sample cannot disagree with itself: undefined, not zero; 16 can
    assert math.isnan(s1["test"]["selective/aurc/agreement"]) and math.isfinite(s16["test"]["selective/aurc/agreement"])
    assert "val_votes" in s16 and "val_votes" not in report["runs"][0]
    text = (tmp_path / "uncertainty_smoke.md").read_text()
    assert "| diffmic_s16 | agreement |" in text and "share of cell votes" in text and "Command:" in text
    for kind in ("reliability", "risk_coverage"):
        with Image.open(tmp_path / f"uncertainty_smoke_{kind}.png") as image:
            assert image.format == "PNG" and image.size[0] > 1000
    # the plots are drawn again from the report alone
    (tmp_path / "uncertainty_smoke_reliability.png").unlink()
    assert plots.regenerate(tmp_path) == [tmp_path / "uncertainty_smoke.json"]
    assert (tmp_path / "uncertainty_smoke_reliability.png").is_file()
    # a second benchmark on the same run folders evaluates the trained models again without training any
    before = sorted(p for p in (tmp_path / "logs").rglob("*.ckpt"))
    assert uncertainty.main([*argv[:7], "again", *argv[8:]]) == 0
    assert sorted(p for p in (tmp_path / "logs").rglob("*.ckpt")) == before
    again = json.loads((tmp_path / "again.json").read_text())
    assert len(again["runs"]) == len(report["runs"])
    for first, second in zip(report["runs"], again["runs"], strict=True):
        assert second["test"] == pytest.approx(first["test"], nan_ok=True)


def test_resuming_a_report_tolerates_keys_added_since_but_not_changed_values(tmp_path):
    from diffmic.config import ConfigError

    base = {"name": "b", "dcg": {"epochs": 4}, "trainer": {"max_epochs": 4}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"config": base, "runs": [{"method": "dcg"}], "seeds": [0], "methods": ["dcg"]}))
    grown = {"name": "b", "dcg": {"epochs": 4, "backbone": "resnet18"}, "trainer": {"max_epochs": 4}, "explain": {}}
    report = common.resumed_report(path, {"config": grown, "seeds": [1], "methods": ["dcg"], "command": "c"})
    assert report["runs"] == [{"method": "dcg"}] and report["seeds"] == [0, 1]
    assert report["keys_added_on_resume"] == {"dcg.backbone": "resnet18", "explain": {}}
    changed = {**grown, "dcg": {"epochs": 5, "backbone": "resnet18"}}
    with pytest.raises(ConfigError, match=r"differs in dcg\.epochs\)"):
        common.resumed_report(path, {"config": changed, "seeds": [1], "methods": ["dcg"], "command": "c"})
    # the uncertainty benchmark's reports list no methods: resumed as they are
    path.write_text(json.dumps({"config": base, "runs": [{"label": "dcg"}], "seeds": [0]}))
    report = common.resumed_report(path, {"config": base, "seeds": [0, 1], "command": "c"})
    assert "methods" not in report and report["seeds"] == [0, 1] and report["resumed_with"] == ["c"]


def test_provenance_lists_each_resuming_command_once_with_its_count():
    report = {"command": "first", "resumed_with": ["a", "b", "a"], "machine": "m", "config": {"k": 1}}
    text = "\n".join(common.provenance_lines(report))
    assert "Resumed with (2 times): `a`" in text and "Resumed with: `b`" in text
    assert text.index("`a`") < text.index("`b`")  # in the order first used
