"""Tests for model.py: time-conditioned 1x1 convolutions, the condition weights, the ConditionalModel
denoiser and its gradient flow in a training-like step (SPEC sections 4 and 5)."""

import logging

import pytest
import torch

from diffmic.utils import adam
from diffmic.v2.model import ConditionalConv2d, ConditionalModel, PatchEncoder, build_denoiser
from diffmic.v2.pipeline import DDIMScheduler, diffusion_focal_loss, focal_weight, guided_prior_map, heterologous_noise

C, K, FEAT = 3, 3, 16


# --------------------------------------------------------------------------- ConditionalConv2d


def test_conditional_conv_per_cell_hand():
    torch.manual_seed(0)
    num_t = 10
    cc = ConditionalConv2d(2, 3, num_t)
    x = torch.randn(2, 2, 3, 3)
    t = torch.randint(0, num_t + 1, (2, 3, 3))
    t[0, 0, 0], t[1, 2, 1] = 0, num_t
    out = cc(x, t)
    assert out.shape == (2, 3, 3, 3)
    w, bias, emb = cc.conv.weight[:, :, 0, 0], cc.conv.bias, cc.embed.weight
    for b in range(2):
        for i in range(3):
            for j in range(3):
                for o in range(3):
                    conv = sum(w[o, c] * x[b, c, i, j] for c in range(2)) + bias[o]
                    expected = conv * emb[int(t[b, i, j]), o]
                    assert out[b, o, i, j].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    # two cells with the same input but different t differ only through the embedding row
    x_same = torch.ones(1, 2, 1, 2)
    t_two = torch.tensor([[[3, 7]]])
    y = cc(x_same, t_two)
    torch.testing.assert_close(y[0, :, 0, 0] / emb[3], y[0, :, 0, 1] / emb[7])


def test_conditional_conv_embedding_init():
    torch.manual_seed(0)
    cc = ConditionalConv2d(4, 32, 1000)
    e = cc.embed.weight.detach()
    assert e.shape == (1001, 32)  # T + 1 rows: t in 0..T
    assert float(e.min()) >= 0.0 and float(e.max()) < 1.0
    assert 0.45 < float(e.mean()) < 0.55 and float(e.std()) > 0.25  # uniform [0, 1), not a constant
    x = torch.randn(1, 4, 2, 2)
    assert torch.isfinite(cc(x, torch.full((1, 2, 2), 1000))).all()
    with pytest.raises(IndexError):
        cc(x, torch.full((1, 2, 2), 1001))


def test_conditional_conv_gradients():
    torch.manual_seed(0)
    cc = ConditionalConv2d(2, 4, 5)
    t = torch.tensor([[[0, 5], [2, 2]]])
    cc(torch.randn(1, 2, 2, 2), t).sum().backward()
    assert cc.conv.weight.grad.abs().sum() > 0
    used = cc.embed.weight.grad.abs().sum(1)
    assert (used[[0, 2, 5]] > 0).all() and (used[[1, 3, 4]] == 0).all()  # only the rows of the cells' t


# --------------------------------------------------------------------------- PatchEncoder


def test_patch_encoder_shape():
    torch.manual_seed(0)
    enc = PatchEncoder("resnet18", 8).eval()
    patches = torch.randn(2, 4, 32, 32)
    out = enc(patches)
    assert out.shape == (2, 8, 4) and torch.isfinite(out).all()
    # token k of sample b depends on patch (b, k) only
    changed = patches.clone()
    changed[1, 2] += 1.0
    diff = (enc(changed) - out).abs().sum(1)  # (B, K)
    assert diff[1, 2] > 0
    assert diff[0].max() == 0 and diff[1, [0, 1, 3]].max() == 0


# --------------------------------------------------------------------------- ConditionalModel


def inputs(b: int, grid: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, 64, 64, generator=g)
    patches = torch.randn(b, grid, 32, 32, generator=g)
    y_in = torch.randn(b, 2 * C, grid, grid, generator=g)
    t = torch.randint(0, 1001, (b, grid, grid), generator=g)
    return image, patches, y_in, t


@pytest.mark.parametrize("grid", [2, 3])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_shape(make_denoiser, grid, mode):
    model = make_denoiser(grid_size=grid).train(mode == "train")
    image, patches, y_in, t = inputs(2, grid)
    with torch.no_grad():
        out = model(image, patches, y_in, t)
        x_w = model.encode(image, patches)
    assert out.shape == (2, C, grid, grid)
    assert torch.isfinite(out).all()
    assert x_w.shape == (2, FEAT)
    assert model.token_logits.shape == (1, FEAT, grid + 1)
    if mode == "eval":  # forward = denoise(encode(.)) and the output depends on every input
        torch.testing.assert_close(out, model.denoise(x_w, y_in, t))
        with torch.no_grad():
            assert not torch.allclose(model(image, patches, y_in, (t + 1) % 1001), out)
            assert not torch.allclose(model(image, patches, y_in + 1, t), out)
            assert not torch.allclose(model(image.flip(0), patches, y_in, t), out)
            assert not torch.allclose(model(image, patches.flip(0), y_in, t), out)
            # in eval mode everything after the condition is per cell (1x1 convs): changing the t of
            # one cell changes that cell's output only
            t2 = t.clone()
            t2[1, 0, 1] = (t2[1, 0, 1] + 1) % 1001
            diff = (model(image, patches, y_in, t2) - out).abs().sum(1)  # (B, K, K)
            assert diff[1, 0, 1] > 0
            diff[1, 0, 1] = 0
            assert diff.max() == 0


@pytest.fixture
def captured(make_denoiser):
    """An eval denoiser with hooks capturing the tokens g (B, F) and l (B, F, K)."""
    model = make_denoiser().eval()
    seen = {}
    model.image_norm.register_forward_hook(lambda m, a, out: seen.__setitem__("g", out))
    model.patch_encoder.register_forward_hook(lambda m, a, out: seen.__setitem__("l", out))
    return model, seen


def test_condition_weights_softmax_over_tokens(captured):
    model, seen = captured
    image, patches, _, _ = inputs(2, K, seed=3)
    with torch.no_grad():
        # random theta: x_w[b, f] = sum_j softmax_j(theta[f, :]) tokens[b, f, j], by hand
        x_w = model.encode(image, patches)
        tokens = torch.cat([seen["g"][:, :, None], seen["l"]], dim=2)  # (B, F, K+1)
        theta = model.token_logits[0]
        w = theta.exp() / theta.exp().sum(dim=1, keepdim=True)
        torch.testing.assert_close(x_w, (tokens * w).sum(2))
        # all weight on token 0 -> g; on token 2 -> the second patch feature; theta = 0 -> mean
        model.token_logits.fill_(-30.0)
        model.token_logits[:, :, 0] = 30.0
        torch.testing.assert_close(model.encode(image, patches), seen["g"])
        model.token_logits.fill_(-30.0)
        model.token_logits[:, :, 2] = 30.0
        torch.testing.assert_close(model.encode(image, patches), seen["l"][:, :, 1])
        model.token_logits.zero_()
        torch.testing.assert_close(model.encode(image, patches), tokens.mean(2))


def test_condition_weights_sum_to_one(captured):
    # shifting every token by c (through the two BatchNorm biases) shifts x_w by exactly c iff the
    # weights over the K + 1 tokens sum to one, for every feature
    model, seen = captured
    image, patches, _, _ = inputs(2, K, seed=4)
    with torch.no_grad():
        model.token_logits.normal_(0.0, 3.0)
        before = model.encode(image, patches)
        model.image_norm.bias += 5.0
        model.patch_encoder.norm.bias += 5.0
        after = model.encode(image, patches)
    torch.testing.assert_close(after - before, torch.full_like(before, 5.0), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("y_in_channels", "y_in must be"),
        ("y_in_grid", "y_in must be"),
        ("t_per_sample", r"t must be \(B, K, K\)"),
        ("t_grid", r"t must be \(B, K, K\)"),
        ("patches", "need K = 3 patches"),
    ],
)
def test_shape_assertions(make_denoiser, bad, match):
    model = make_denoiser().eval()
    image, patches, y_in, t = inputs(2, K)
    if bad == "y_in_channels":
        y_in = y_in[:, :C]
    elif bad == "y_in_grid":
        y_in = torch.randn(2, 2 * C, 4, 4)
    elif bad == "t_per_sample":
        t = t[:, 0, 0]
    elif bad == "t_grid":
        t = torch.zeros(2, 2, 2, dtype=torch.long)
    else:
        patches = patches[:, :2]
    with torch.no_grad(), pytest.raises(AssertionError, match=match):
        model(image, patches, y_in, t)


def test_embedding_covers_zero_to_T(make_denoiser):
    model = make_denoiser().eval()
    for cc in (model.cc1, model.cc2, model.cc3):
        assert cc.embed.num_embeddings == 1001
    image, patches, y_in, _ = inputs(2, K)
    with torch.no_grad():
        x_w = model.encode(image, patches)
        for value in (0, 1000):
            assert torch.isfinite(model.denoise(x_w, y_in, torch.full((2, K, K), value))).all()
        with pytest.raises(IndexError):
            model.denoise(x_w, y_in, torch.full((2, K, K), 1001))


def test_training_step_gradient_flow(make_dcg, make_denoiser):
    dcg = make_dcg().eval().requires_grad_(False)
    model = make_denoiser().train()
    torch.manual_seed(0)
    image = torch.randn(2, 3, 64, 64)
    y0 = torch.nn.functional.one_hot(torch.tensor([0, 2]), C).float()
    guide = dcg(image)
    prior = guided_prior_map(guide.y_global, guide.y_local, K)
    assert not prior.requires_grad and not guide.patches.requires_grad
    y_t, eps, t = heterologous_noise(DDIMScheduler(), y0, K)
    eps_hat = model(image, guide.patches, torch.cat([prior, y_t], dim=1), t)
    loss = diffusion_focal_loss(eps_hat, eps, focal_weight(guide.y_fusion, y0, 10.0, 1.0))
    assert torch.isfinite(loss)
    loss.backward()

    # a bias right before a BatchNorm over the same axis is cancelled by it: its gradient is ~0
    cancelled = {"image_proj.bias", "patch_encoder.proj.bias"}
    for name, p in model.named_parameters():
        assert p.requires_grad, name
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name == "image_encoder.pos_embed":
            assert p.grad[:, 0].abs().max() == 0  # class-token slot: unused by design
            assert p.grad[:, 1:].abs().sum() > 0
        elif name in cancelled:
            assert p.grad.abs().max() < 1e-4, name
        else:
            assert p.grad.abs().sum() > 0, name
    for name, p in dcg.named_parameters():
        assert p.grad is None, name
    # the embeddings get gradient at the rows of the sampled per-cell timesteps only
    for cc in (model.cc1, model.cc2, model.cc3):
        rows = cc.embed.weight.grad.abs().sum(1).nonzero().flatten()
        assert set(rows.tolist()) == set(t.flatten().tolist())


def test_build_denoiser_from_config():
    cfg = {
        "data": {"num_classes": 4},
        "dcg": {"num_rois": 2},
        "model": {"feature_dim": 8, "image_encoder": "vit_t", "patch_encoder": "resnet18", "condition_init": "default"},
        "diffusion": {"timesteps": 50},
        "ablation": {"roi_branch": True},
    }
    model = build_denoiser(cfg)
    assert (model.num_classes, model.grid_size) == (4, 2)
    assert model.token_logits.shape == (1, 8, 3)
    assert model.cc1.embed.num_embeddings == 51 and model.cc1.conv.in_channels == 8
    assert model.image_encoder.embed_dim == 192 and model.out.out_channels == 4


def test_no_roi_branch_condition_is_the_image_feature(make_denoiser):
    """Ablation roi_branch False: x_w = g whatever the patches; the default mixes in the patch tokens."""
    model = make_denoiser(seed=1).eval()
    image = torch.randn(2, 3, 64, 64)
    patches, other = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model.encode(image, patches), model.encode(image, other))
        model.roi_tokens = False
        g = model.image_norm(model.image_proj(model.image_encoder(image)).mean(dim=(2, 3)))
        torch.testing.assert_close(model.encode(image, patches), g)
        torch.testing.assert_close(model.encode(image, other), g)


def test_identity_condition_init_passes_the_prior_through():
    """condition_init identity: x_w is exactly 1 at the start, and the encoders still receive gradient
    through the BatchNorm weights, which leave 0 after one step."""
    torch.manual_seed(0)
    model = ConditionalModel(
        num_classes=3, grid_size=3, feature_dim=16, num_timesteps=100, image_encoder="vit_t", condition_init="identity"
    )
    image, patches = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model.encode(image, patches), torch.ones(4, 16))
    y_in, t = torch.randn(4, 6, 3, 3), torch.randint(0, 100, (4, 3, 3))
    model(image, patches, y_in, t).pow(2).mean().backward()
    assert model.image_norm.weight.grad.abs().sum() > 0 and model.patch_encoder.norm.weight.grad.abs().sum() > 0
    with pytest.raises(AssertionError, match="condition_init"):
        ConditionalModel(3, 3, 16, 100, "vit_t", condition_init="zeros")


def test_load_image_encoder(make_denoiser, tmp_path, caplog):
    model = make_denoiser(seed=1)
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="diffmic.v2.model"):
        model.load_image_encoder(None)
    assert [r.name for r in caplog.records] == ["diffmic.v2.model"] and "random init" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in model.image_encoder.state_dict().items())
    # the model layer raises a plain error naming the file; the command line names the config key
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        model.load_image_encoder(str(tmp_path / "missing.pt"))
    # an official-layout checkpoint loads into the image encoder
    source = make_denoiser(seed=2).image_encoder.state_dict()
    path = tmp_path / "efficient_sam_vitt.pt"
    torch.save({"model": {"image_encoder." + k: v for k, v in source.items()}}, path)
    model.load_image_encoder(str(path))
    for k, v in model.image_encoder.state_dict().items():
        assert torch.equal(v, source[k]), k


def test_load_patch_encoder_from_the_dcg_or_a_file(make_denoiser, make_dcg, tmp_path):
    model, dcg = make_denoiser(seed=1), make_dcg(seed=3)
    model.load_patch_encoder("dcg", dcg.local_trunk)
    for k, v in model.patch_encoder.trunk.state_dict().items():
        assert torch.equal(v, dcg.local_trunk.state_dict()[k]), k
    # a file that is no ResNet-18 state dict is refused with a plain error naming the file
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt is not a resnet18 state dict"):
        model.load_patch_encoder(str(tmp_path / "other.pt"))


def test_imagenet_weights_unreachable_fall_back_to_random_init_loudly(monkeypatch, caplog):
    import urllib.error

    import torchvision

    from diffmic.backbones import Trunk

    trunk = Trunk("resnet18")
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    real = torchvision.models.get_model

    def offline(name, weights=None, **kwargs):
        if weights is not None:
            raise urllib.error.URLError("no network")
        return real(name, weights=None, **kwargs)

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with caplog.at_level("WARNING"):
        trunk.load_weights("imagenet", key="dcg.backbone_weights")
    assert "STARTING FROM RANDOM INIT" in caplog.text and "dcg.backbone_weights" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in trunk.state_dict().items())


def test_adam_helper_uses_the_fused_kernel_with_the_same_update():
    torch.manual_seed(0)
    fast, plain = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)
    plain.load_state_dict(fast.state_dict())
    opt_fast, opt_plain = adam(fast.parameters(), lr=1e-2), torch.optim.Adam(plain.parameters(), lr=1e-2)
    assert opt_fast.defaults["fused"]
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, opt in ((fast, opt_fast), (plain, opt_plain)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(fast.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
