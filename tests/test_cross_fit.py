"""Cross-fitted DCG priors (dcg.cross_fit_folds): fold assignment, out-of-fold outputs, sampling shared
over members, the DCG file, pre-training on the right images, and a fit end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from config import ConfigError, load_config
from pipeline import DDIMScheduler, ddim_sample
from pretraining import train_dcg
from pretraining.cross_fit import CrossFitDCG, assign_folds, build_guide, guide_outputs
from pretraining.dcg import DCG


@pytest.mark.parametrize("k", [2, 3, 5])
def test_assign_folds_stratified_balanced_and_seeded(k):
    labels = np.array([0] * 23 + [1] * 9 + [2] * 14)
    np.random.default_rng(0).shuffle(labels)
    folds = assign_folds(labels, k, seed=4)
    assert folds.shape == labels.shape and set(folds.tolist()) == set(range(k))
    for c in range(3):  # every class dealt out evenly: fold counts differ by at most one
        counts = np.bincount(folds[labels == c], minlength=k)
        assert counts.max() - counts.min() <= 1, (c, counts)
    np.testing.assert_array_equal(folds, assign_folds(labels, k, seed=4))
    assert not np.array_equal(folds, assign_folds(labels, k, seed=5))


def test_assign_folds_multilabel_and_bad_input():
    labels = np.random.default_rng(1).integers(0, 2, size=(20, 4))
    folds = assign_folds(labels, 4, seed=0)
    assert np.bincount(folds).tolist() == [5, 5, 5, 5]
    with pytest.raises(AssertionError, match="at least 2 folds"):
        assign_folds(labels, 1, seed=0)
    with pytest.raises(AssertionError, match="cannot fill"):
        assign_folds(np.array([0, 1]), 3, seed=0)


@pytest.fixture
def cross_fit(make_dcg) -> CrossFitDCG:
    guide = CrossFitDCG([make_dcg(seed=0), make_dcg(seed=1)]).eval()
    guide.set_folds(torch.tensor([0, 1, 1, 0, 1, 0]))
    return guide


def test_out_of_fold_rows_come_from_the_member_that_left_them_out(cross_fit):
    image = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([5, 2, 0, 4])  # folds 0, 1, 0, 1
    with torch.no_grad():
        merged = cross_fit.out_of_fold(image, index)
        ref = [member(image) for member in cross_fit.members]
    for row, member in enumerate([0, 1, 0, 1]):
        for name, field in merged._asdict().items():
            torch.testing.assert_close(field[row], getattr(ref[member], name)[row], rtol=0, atol=1e-6, msg=name)
    assert not torch.allclose(ref[0].y_fusion, ref[1].y_fusion)  # the members differ, so the test can fail
    with torch.no_grad():  # a batch from one fold only
        one = cross_fit.out_of_fold(image[:1], index[:1])
    torch.testing.assert_close(one.y_global, ref[0].y_global[:1])
    with pytest.raises(AssertionError, match="outside the 6 training images"):
        cross_fit.out_of_fold(image, torch.tensor([0, 1, 2, 6]))


def test_forward_is_the_member_mean_and_guide_outputs(cross_fit, make_dcg):
    image = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, ref = cross_fit(image), [m(image) for m in cross_fit.members]
        torch.testing.assert_close(out.y_fusion, (ref[0].y_fusion + ref[1].y_fusion) / 2)
        torch.testing.assert_close(out.y_local, (ref[0].y_local + ref[1].y_local) / 2)
        torch.testing.assert_close(out.patches, ref[0].patches)
        assert len(guide_outputs(cross_fit, image)) == 2 and len(guide_outputs(make_dcg().eval(), image)) == 1


def test_ddim_sample_shares_samples_over_members(cross_fit, make_denoiser):
    """Sample s is guided by member s mod k: the mean grid equals the mean of single-member runs."""
    denoiser = make_denoiser().eval()
    g = torch.Generator().manual_seed(2)
    image, start = torch.randn(2, 3, 64, 64, generator=g), torch.rand(2, 4, 2, 3, generator=g)
    shared, _ = ddim_sample(cross_fit, denoiser, DDIMScheduler(), image, start, 4)
    singles = [ddim_sample(cross_fit.members[s % 2], denoiser, DDIMScheduler(), image, start[:, s], 4)[0]
               for s in range(4)]
    torch.testing.assert_close(shared, torch.stack(singles).mean(0), rtol=0, atol=1e-5)
    first_only, _ = ddim_sample(cross_fit.members[0], denoiser, DDIMScheduler(), image, start, 4)
    assert not torch.allclose(shared, first_only)
    with pytest.raises(AssertionError, match="shared out evenly"):
        ddim_sample(cross_fit, denoiser, DDIMScheduler(), image, start[:, :3], 4)


def demo_cfg(tmp_path: Path, *overrides: str) -> dict:
    return load_config(None, ["data.synthetic.num_train=40", "data.synthetic.num_val=16", "data.synthetic.num_test=16",
                              "data.batch_size=8", "dcg.batch_size=8", "dcg.epochs=1", "model.feature_dim=16",
                              "trainer.max_epochs=1", f"trainer.log_dir={tmp_path}", *overrides])


def test_dcg_file_round_trip_and_mismatches(tmp_path, cross_fit):
    cfg = demo_cfg(tmp_path, "dcg.cross_fit_folds=2", "diffusion.eval_samples=2", "dcg.num_rois=3")
    cfg["data"]["num_classes"] = 3  # the conftest DCGs
    path = tmp_path / "cf.pt"
    train_dcg.save_dcg(cross_fit, cfg, path)
    loaded = build_guide(cfg)
    train_dcg.load_dcg(loaded, cfg, path)
    assert torch.equal(loaded.fold_of, cross_fit.fold_of)
    for a, b in zip(loaded.members, cross_fit.members):
        torch.testing.assert_close(a.state_dict(), b.state_dict())
    other = build_guide(cfg)
    other.set_folds(torch.tensor([1, 0, 1, 0, 1, 0]))
    with pytest.raises(ConfigError, match="other folds"):
        train_dcg.load_dcg(other, cfg, path)
    single_cfg = json.loads(json.dumps(cfg))
    single_cfg["dcg"]["cross_fit_folds"] = 0
    with pytest.raises(ConfigError, match="cross_fit_folds"):
        train_dcg.load_dcg(build_guide(single_cfg), single_cfg, path)
    train_dcg.save_dcg(cross_fit.members[0], single_cfg, tmp_path / "one.pt")
    with pytest.raises(ConfigError, match="cross_fit_folds"):
        train_dcg.load_dcg(build_guide(cfg), cfg, tmp_path / "one.pt")
    assert isinstance(build_guide(single_cfg), DCG)


def test_pretrain_trains_each_member_without_its_fold(tmp_path, monkeypatch):
    cfg = demo_cfg(tmp_path, "dcg.cross_fit_folds=2", "diffusion.eval_samples=2")
    seen = []
    real = train_dcg.train_one_dcg

    def spy(cfg_, datasets, run_name):
        seen.append((run_name, sorted(datasets["train"].indices)))
        return real(cfg_, datasets, run_name)

    monkeypatch.setattr(train_dcg, "train_one_dcg", spy)
    path = train_dcg.pretrain_dcg(cfg)
    saved = torch.load(path, weights_only=True)
    folds = saved["fold_of"].numpy()
    assert len(saved["members"]) == 2 and len(folds) == 40
    assert [name for name, _ in seen] == ["demo/dcg_fold0", "demo/dcg_fold1"]
    for j, (_, rows) in enumerate(seen):
        assert rows == np.flatnonzero(folds != j).tolist()
    assert saved["meta"]["cross_fit_folds"] == 2


def test_fit_end_to_end_and_resume(tmp_path, capsys):
    import diffuser_trainer
    args = ["dcg.cross_fit_folds=2", "diffusion.eval_samples=2", "data.synthetic.num_train=40",
            "data.synthetic.num_val=16", "data.synthetic.num_test=16", "data.batch_size=8", "dcg.batch_size=8",
            "dcg.epochs=1", "model.feature_dim=16", "trainer.max_epochs=1", "trainer.val_every=1",
            f"trainer.log_dir={tmp_path}"]
    assert diffuser_trainer.main(["fit", *args]) == 0
    metrics = json.loads((tmp_path / "demo" / "version_0" / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["acc"] <= 1.0 and np.isfinite(metrics["test"]["auc"])
    assert (tmp_path / "demo" / "dcg_fold1").is_dir()
    # evaluation from the saved checkpoint (it holds the members; the folds are not needed) reproduces fit's test metrics
    out = tmp_path / "test.json"
    assert diffuser_trainer.main(["test", "--ckpt", "best", "--out", str(out), *args]) == 0
    assert json.loads(out.read_text())["test"] == pytest.approx(metrics["test"])
    # resuming re-derives the folds (they are not stored in the Lightning checkpoint)
    assert diffuser_trainer.main(["fit", "--ckpt", "last", *args, "trainer.max_epochs=2"]) == 0
    # the DCG file of this seed's folds does not fit another seed
    capsys.readouterr()
    assert diffuser_trainer.main(["fit", *args, "seed=8"]) == 2
    assert "cross-fitted on other folds" in capsys.readouterr().err
