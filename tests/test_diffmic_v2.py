"""Tests for diffmic_v2.py: the prior map with its ablation switches, the training step and the evaluation
path (encoders once per image, S samples averaged) of the LightningModule."""

import pytest
import torch

import diffmic.v2.system as diffmic_v2
from diffmic.config import load_config
from diffmic.v2.pipeline import guided_prior_map
from diffmic.v2.system import DiffMICv2
from pretraining.dcg import DCGOutput

SMALL = ["model.feature_dim=16", "data.num_classes=3", "data.class_names=null"]


def small_system(*overrides: str) -> DiffMICv2:
    torch.manual_seed(0)
    return DiffMICv2(load_config(None, [*SMALL, *overrides]))


@pytest.mark.parametrize(("guided_map", "roi_branch"), [(True, True), (False, True), (True, False)])
def test_prior_and_its_ablations(guided_map, roi_branch):
    system = small_system(f"ablation.guided_map={guided_map}", f"ablation.roi_branch={roi_branch}")
    g, l = torch.randn(2, 3), torch.randn(2, 3)
    prior = system.prior(DCGOutput(None, g, l, None, None, None))
    k = system.denoiser.grid_size
    if not guided_map:  # no DCG prior at all
        expected = torch.zeros(2, 3, k, k)
    elif not roi_branch:  # y_global alone, on every cell
        expected = g[:, :, None, None].expand(2, 3, k, k)
    else:
        expected = guided_prior_map(g, l, k)
    torch.testing.assert_close(prior, expected, rtol=0, atol=0)
    assert system.denoiser.roi_tokens == roi_branch


def test_training_step_trains_the_denoiser_and_never_the_dcg():
    system = small_system("model.condition_init=default")  # identity init: no gradient reaches the encoders at first
    system.log = lambda *args, **kwargs: None
    system.train()
    assert not system.dcg.training, "the frozen DCG keeps its pre-trained BatchNorm statistics"
    batch = {"image": torch.randn(4, 3, 64, 64), "label": torch.tensor([0, 1, 2, 1]), "index": torch.arange(4)}
    loss = system.training_step(batch, 0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in system.dcg.parameters())
    assert system.denoiser.cc1.conv.weight.grad.abs().sum() > 0
    assert system.denoiser.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_evaluation_encodes_once_for_all_samples_and_averages_them(monkeypatch):
    system = small_system("diffusion.eval_samples=3").eval()
    counts = {"dcg": 0, "image": 0, "patch": 0, "body": 0}
    for name, module in (
        ("dcg", system.dcg),
        ("image", system.denoiser.image_encoder),
        ("patch", system.denoiser.patch_encoder),
        ("body", system.denoiser.cc1),
    ):
        module.register_forward_hook(lambda *args, name=name: counts.__setitem__(name, counts[name] + 1))
    image, index = torch.randn(2, 3, 64, 64), torch.tensor([5, 2])
    starts = torch.rand(2, 2, 3, 3)  # (B, y_global / y_local stand-ins, S, C)
    draws = []  # what the sampler asks of start_noise: each image's start vectors
    monkeypatch.setattr(diffmic_v2, "start_noise", lambda seed, idx, shape: draws.pop(0))
    draws.append(starts)
    with torch.no_grad():
        averaged = system.sample(image, index)
    steps = system.cfg["diffusion"]["sampling_steps"]
    assert counts == {"dcg": 1, "image": 1, "patch": 1, "body": steps}, "one batched body call per step"
    assert averaged.shape == (2, 3, 3, 3)
    # one sample per run from each of the same starts: the three-sample grid is their mean
    system.cfg["diffusion"]["eval_samples"] = 1
    singles = []
    for s in range(3):
        draws.append(starts[:, :, s : s + 1])
        with torch.no_grad():
            singles.append(system.sample(image, index))
    torch.testing.assert_close(averaged, torch.stack(singles).mean(0), rtol=0, atol=1e-5)
    assert not torch.allclose(singles[0], singles[1])


def test_evaluate_batch_scores_and_spread():
    system = small_system().eval()
    batch = {"image": torch.randn(3, 3, 64, 64), "label": torch.tensor([0, 1, 2]), "index": torch.arange(3)}
    out = system.evaluate_batch(batch)
    with torch.no_grad():
        grid = system.sample(batch["image"], batch["index"])
    torch.testing.assert_close(out["scores"], grid.mean(dim=(2, 3)))
    predicted = out["scores"].argmax(dim=1)
    expected_spread = torch.stack([grid[b, predicted[b]].flatten().std() for b in range(3)])
    torch.testing.assert_close(out["spread"], expected_spread)


@pytest.mark.slow
def test_the_dcg_stays_frozen_in_eval_mode_through_fit(tmp_path):
    """SPEC 5: the DCG is frozen and in eval mode while the denoiser trains. Lightning calls no train() when fit
    starts and restores submodule modes one by one after each validation, so this is checked through real fits."""
    import pytorch_lightning as pl

    from dataloader.datamodule import DiffMICDataModule
    from diffmic.utils import build_trainer

    tiny = [
        "data.synthetic.num_train=32",
        "data.synthetic.num_val=16",
        "data.synthetic.num_test=8",
        "data.batch_size=16",
        "trainer.max_epochs=2",
        "trainer.val_every=1",
        f"trainer.log_dir={tmp_path}",
    ]
    cfg = load_config(None, [*SMALL, *tiny])
    system = DiffMICv2(cfg)
    system.dcg_file = {"path": str(tmp_path / "dcg.pt"), "sha256": "0" * 64}  # checkpoints name a DCG file
    before = {k: v.clone() for k, v in system.dcg.state_dict().items()}
    modes = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            modes.append(any(m.training for m in module.dcg.modules()))

    trainer, _ = build_trainer(cfg, "frozen", 2, 1)
    trainer.callbacks.append(Spy())
    trainer.fit(system, datamodule=DiffMICDataModule(cfg))
    assert modes == [False] * 4, "the DCG ran in training mode (BatchNorm on batch statistics)"
    after = system.dcg.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the DCG's weights or BatchNorm statistics moved"


def test_evaluate_batch_probabilities_and_sample_uncertainty():
    """probs: the mean grid on the simplex (rows sum to 1, same argmax as the scores); agreement and sample_spread
    over the S samples of sample_grids; votes: the share of the S x K x K cells of each class."""
    system = small_system("diffusion.eval_samples=3", "diffusion.sampling_steps=2").eval()
    batch = {"image": torch.randn(4, 3, 64, 64), "label": torch.tensor([0, 1, 2, 0]), "index": torch.arange(4)}
    out = system.evaluate_batch(batch)
    with torch.no_grad():
        grids = system.sample_grids(batch["image"], batch["index"])  # (S, B, C, K, K)
    torch.testing.assert_close(out["scores"], grids.mean(dim=0).mean(dim=(2, 3)))
    torch.testing.assert_close(out["probs"].sum(dim=1), torch.ones(4))
    assert (out["probs"] >= 0).all() and torch.equal(out["probs"].argmax(1), out["scores"].argmax(1))
    per_sample = grids.mean(dim=(3, 4))
    predicted = out["scores"].argmax(dim=1)
    for b in range(4):
        votes = (per_sample[:, b].argmax(dim=1) == predicted[b]).float().mean()
        assert out["agreement"][b] == votes
        torch.testing.assert_close(out["sample_spread"][b], per_sample[:, b, predicted[b]].std())
        cells = grids[:, b].argmax(dim=1).flatten()  # the class of each of the S x K x K cells
        torch.testing.assert_close(out["votes"][b], torch.bincount(cells, minlength=3).float() / cells.numel())
    # one sample: the sample scores are undefined
    single = small_system("diffusion.sampling_steps=2").eval().evaluate_batch(batch)
    assert torch.isnan(single["agreement"]).all() and torch.isnan(single["sample_spread"]).all()


def test_multilabel_probabilities_are_per_finding():
    system = small_system(
        "data.dataset=list", "data.task=multilabel", "diffusion.eval_samples=2", "diffusion.sampling_steps=2"
    )
    system.eval()
    labels = torch.tensor([[1, 0, 1], [0, 0, 0]])
    out = system.evaluate_batch({"image": torch.randn(2, 3, 64, 64), "label": labels, "index": torch.arange(2)})
    torch.testing.assert_close(out["probs"], out["scores"].clamp(0, 1))
    assert out["agreement"].shape == (2,) and ((out["agreement"] >= 0) & (out["agreement"] <= 1)).all()


def test_the_authors_v1_resnet50_dcg_guides_diffmic_v2_and_seeds_its_patch_encoder():
    """dcg.backbone is used by both methods: DiffMIC-v2 guided by the ResNet-50 DCG trains and samples, and
    model.patch_encoder_weights=dcg copies that DCG's local trunk into a ResNet-50 patch encoder."""
    system = small_system(
        "dcg.backbone=resnet50", "model.patch_encoder=resnet50", "model.patch_encoder_weights=dcg", "dcg.num_rois=3"
    )
    assert system.dcg.backbone == "resnet50"
    before = system.denoiser.patch_encoder.trunk.state_dict()
    assert not torch.equal(before["features.0.weight"], system.dcg.local_trunk.state_dict()["features.0.weight"])
    system.load_initial_weights()
    local = system.dcg.local_trunk.state_dict()
    copied = system.denoiser.patch_encoder.trunk.state_dict()
    assert copied.keys() == local.keys() and all(torch.equal(v, local[k]) for k, v in copied.items())
    system.log = lambda *args, **kwargs: None
    system.train()
    batch = {"image": torch.randn(2, 3, 64, 64), "label": torch.tensor([0, 2]), "index": torch.arange(2)}
    loss = system.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None for p in system.dcg.parameters())
    system.eval()
    out = system.evaluate_batch(batch)
    assert out["scores"].shape == (2, 3) and torch.isfinite(out["scores"]).all()


def test_only_lightnings_eval_mode_warning_for_the_dcg_is_hidden():
    """The frozen DCG is in eval mode at every fit by design: Lightning's warning with exactly the count of its
    modules is hidden, a count with any other module in eval mode still shows."""
    import types
    import warnings
    from unittest import mock

    from pytorch_lightning.utilities.warnings import PossibleUserWarning

    system = small_system()
    dcg_modules = len(list(system.dcg.modules()))
    one_process = types.SimpleNamespace(world_size=1)
    with warnings.catch_warnings(record=True) as caught, mock.patch.object(DiffMICv2, "trainer", one_process):
        warnings.simplefilter("always")
        system.on_fit_start()
        for count in (dcg_modules, dcg_modules + 1):
            warnings.warn(
                f"Found {count} module(s) in eval mode at the start of training. This may lead to unexpected "
                "behavior during training.",
                PossibleUserWarning,
                stacklevel=1,
            )
    assert [str(w.message).split(" module")[0] for w in caught] == [f"Found {dcg_modules + 1}"]
