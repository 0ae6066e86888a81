"""The accuracy benchmark script runs end to end (one seed, a few batches) and writes its report."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "medmnist" / "breastmnist.npz").is_file(), reason=f"{SHARED} is absent")
def test_accuracy_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy
    argv = ["--config", str(ROOT / "configs" / "bench_breastmnist.yml"), "--seeds", "0", "--methods", "resnet18",
            "dcg", "diffmic", "diffmic-cross_fit", "diffmic-no_guided_map", "diffmic-no_roi_branch", "--ddim-steps", "2",
            "--eval-samples", "4",
            "--out-dir", str(tmp_path), "--name", "smoke", f"data.root={SHARED / 'medmnist'}", f"trainer.log_dir={tmp_path / 'logs'}",
            "dcg.epochs=1", "trainer.max_epochs=1", "trainer.val_every=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "model.feature_dim=16"]
    assert accuracy.main(argv) == 0
    report = json.loads((tmp_path / "smoke.json").read_text())
    trained = ["resnet18", "dcg", "diffmic", "diffmic-cross_fit", "diffmic-no_guided_map", "diffmic-no_roi_branch"]
    # the cross-fitted DCGs' own prediction (trained inside diffmic-cross_fit) and the diffmic checkpoint
    # re-evaluated with other sampling settings: no training of their own
    evaluated = ["diffmic-ddim_2", "diffmic-samples_4"]
    assert [r["method"] for r in report["runs"]] == trained[:4] + ["dcg-cross_fit"] + trained[4:] + evaluated
    for method in trained + evaluated + ["dcg-cross_fit"]:
        entry = report["summary"][method]
        assert 0.0 <= entry["acc"]["mean"] <= 1.0
        assert entry["train_s"] > 0 if method in trained else math.isnan(entry["train_s"])
    cross_fit_dcg = Path(report["runs"][3]["checkpoint"]).parents[2] / "dcg.pt"
    assert len(torch.load(cross_fit_dcg, weights_only=True)["members"]) == 2
    text = (tmp_path / "smoke.md").read_text()
    assert "| diffmic |" in text and "| diffmic-no_roi_branch |" in text and "| diffmic-samples_4 |" in text and "Command:" in text and "Machine:" in text
    assert "| dcg-cross_fit |" in text

    # a later call re-evaluates the trained diffmic checkpoint of each seed without training anything
    again = [a if a != "smoke" else "again" for a in argv[argv.index("--out-dir"):]]
    assert accuracy.main(["--config", argv[1], "--seeds", "0", "--methods", "--eval-samples", "2", *again]) == 0
    report = json.loads((tmp_path / "again.json").read_text())
    assert [r["method"] for r in report["runs"]] == ["diffmic-samples_2"]
    assert 0.0 <= report["runs"][0]["test"]["acc"] <= 1.0

    # the fit of the seed's DCG prior on its own training images and on the validation split
    import prior_fit
    overrides = argv[argv.index("--name") + 2:]
    assert prior_fit.main(["--config", argv[1], "--seeds", "0", "--out-dir", str(tmp_path), *overrides]) == 0
    rows = json.loads((tmp_path / "breastmnist_prior_fit.json").read_text())["rows"]
    assert [(r["seed"], r["split"], r["images"]) for r in rows] == [(0, "train", 546), (0, "val", 78)]
    for r in rows:  # gamma = 1: w = 1 + alpha (1 - p), so the means obey the same line
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["p_true"] <= 1.0
        assert r["focal_weight"] == pytest.approx(1 + 10.0 * (1 - r["p_true"]), rel=1e-4)
        assert (r["wrong_weight_share"] == 0.0) == (r["acc"] == 1.0) and 0.0 <= r["wrong_weight_share"] <= 1.0
    assert "| mean | train |" in (tmp_path / "breastmnist_prior_fit.md").read_text()
    # the out-of-fold priors of diffmic-cross_fit's DCGs on training images
    assert prior_fit.main(["--config", argv[1], "--seeds", "0", "--cross-fit", "--out-dir", str(tmp_path), *overrides]) == 0
    rows = json.loads((tmp_path / "breastmnist_cross_fit_prior_fit.json").read_text())["rows"]
    assert [(r["seed"], r["split"], r["images"]) for r in rows] == [(0, "train", 546), (0, "val", 78)]
    for r in rows:  # the variant trains without the focal weight; the diagnosis reports SPEC's (alpha 10)
        assert r["focal_weight"] == pytest.approx(1 + 10.0 * (1 - r["p_true"]), rel=1e-4)
    # without a trained DCG it says which file is missing
    assert prior_fit.main(["--config", argv[1], "--seeds", "5", "--out-dir", str(tmp_path), *overrides]) == 2


def test_accuracy_benchmark_needs_the_same_epochs_for_every_method(tmp_path, capfd):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy
    argv = ["--config", str(ROOT / "configs" / "bench_breastmnist.yml"), "--out-dir", str(tmp_path),
            f"trainer.log_dir={tmp_path / 'logs'}", "dcg.epochs=3", "trainer.max_epochs=4"]
    assert accuracy.main(argv) == 2
    assert "dcg.epochs (3) and trainer.max_epochs (4) must agree" in capfd.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written
