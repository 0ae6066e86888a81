"""Tests for pretraining/dcg.py: top-t pooling, greedy ROI proposal, cropping, gated attention MIL
and the DCG forward (SPEC section 2), with either trunk (dcg.backbone: resnet18, or the authors' v1 resnet50), and the
DCG file's record of its trunk."""

import numpy as np
import pytest
import torch

from dataloader.synthetic import SyntheticPatterns
from diffmic.checkpoints import read_checkpoint
from diffmic.config import ConfigError, load_config
from pretraining.dcg import (
    DCG,
    GatedAttentionMIL,
    build_dcg,
    cells_to_pixels,
    crop_patches,
    propose_rois,
    roi_window,
    top_t_pool,
)
from pretraining.dcg_file import load_dcg, save_dcg
from pretraining.train_dcg import DCGSystem, dcg_optimizer


def greedy_reference(cam: torch.Tensor, num_rois: int, window: int) -> list[list[tuple[int, int]]]:
    """SPEC 2.3 written as plain loops: min-max normalise each class map, sum over classes, then K times
    take the window x window box with the largest average (first one in row-major order on ties),
    record its upper-left cell and zero the box."""
    values = cam.tolist()
    out = []
    for per_class in values:
        h, w = len(per_class[0]), len(per_class[0][0])
        score = [[0.0] * w for _ in range(h)]
        for plane in per_class:
            flat = [v for row in plane for v in row]
            lo, hi = min(flat), max(flat)
            for i in range(h):
                for j in range(w):
                    score[i][j] += (plane[i][j] - lo) / (hi - lo)
        picks = []
        for _ in range(num_rois):
            best, where = -1.0, None
            for r in range(h - window + 1):
                for c in range(w - window + 1):
                    total = 0.0
                    for di in range(window):
                        for dj in range(window):
                            total += score[r + di][c + dj]
                    if total / window**2 > best:
                        best, where = total / window**2, (r, c)
            picks.append(where)
            for di in range(window):
                for dj in range(window):
                    score[where[0] + di][where[1] + dj] = 0.0
        out.append(picks)
    return out


def as_list(cells: torch.Tensor) -> list[list[tuple[int, int]]]:
    return [[tuple(p) for p in per] for per in cells.tolist()]


# --------------------------------------------------------------------------- top-t pooling, window


def test_top_t_pool_hand_values():
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 5.0], [0.0, 2.0]]]])  # (1, 2, 2, 2)
    torch.testing.assert_close(top_t_pool(s, 1.0), torch.tensor([[2.5, 1.5]]))  # mean over positions
    torch.testing.assert_close(top_t_pool(s, 0.5), torch.tensor([[3.5, 3.5]]))  # mean of (4, 3) and (5, 2)
    torch.testing.assert_close(top_t_pool(s, 0.25), torch.tensor([[4.0, 5.0]]))  # max


def test_top_t_pool_shape_and_grad():
    s = torch.randn(3, 4, 7, 7, requires_grad=True)
    y = top_t_pool(s, 1.0)
    assert y.shape == (3, 4)
    y.sum().backward()
    torch.testing.assert_close(s.grad, torch.full_like(s, 1 / 49))


@pytest.mark.parametrize(
    "roi, cam, image, expected", [(32, 7, 224, 1), (112, 7, 224, 4), (32, 2, 64, 1), (64, 7, 224, 2), (8, 7, 224, 1)]
)
def test_roi_window(roi, cam, image, expected):
    assert roi_window(roi, cam, image) == expected


# --------------------------------------------------------------------------- ROI proposal


def hand_cam() -> torch.Tensor:
    """(2, 7, 7): class 0 min 0 max 10, class 1 min -3 max 5. Normalised sum:
    (6,0) 0.1 + 1.0 = 1.1, (1,2) 1.0, (4,4) 0.4 + 0.25 = 0.65, (3,3) 0.375, (0,6) 0.2, rest 0."""
    cam = torch.zeros(2, 7, 7)
    cam[0, 1, 2], cam[0, 4, 4], cam[0, 0, 6], cam[0, 6, 0] = 10.0, 4.0, 2.0, 1.0
    cam[1] = -3.0
    cam[1, 6, 0], cam[1, 4, 4], cam[1, 3, 3] = 5.0, -1.0, 0.0
    return cam


def test_propose_rois_window1_hand():
    cam = hand_cam()
    batch = torch.stack([cam, cam.flip(1, 2)])  # second image: the same CAM rotated by 180 degrees
    cells = propose_rois(batch, num_rois=4, window=1)
    assert cells.shape == (2, 4, 2) and cells.dtype == torch.long
    assert as_list(cells)[0] == [(6, 0), (1, 2), (4, 4), (3, 3)]
    assert as_list(cells)[1] == [(0, 6), (5, 4), (2, 2), (3, 3)]
    assert as_list(cells) == greedy_reference(batch, 4, 1)


def test_propose_rois_minmax_normalisation():
    batch = hand_cam()[None]
    scaled = batch.clone()
    scaled[:, 0] *= 100.0
    scaled[:, 1] += 50.0
    # without per-class normalisation the choice would change: raw sums rank (1, 2) first
    raw = scaled.sum(1).flatten(1).argmax(1)
    assert divmod(int(raw), 7) == (1, 2)
    assert torch.equal(propose_rois(scaled, 4, 1), propose_rois(batch, 4, 1))
    assert torch.equal(propose_rois(scaled, 3, 2), propose_rois(batch, 3, 2))


def test_propose_rois_window2_hand_overlapping():
    s = torch.zeros(1, 1, 7, 7)
    s[0, 0, 2:4, 2:4] = 9.0
    s[0, 0, 3, 4] = s[0, 0, 4, 3] = s[0, 0, 4, 4] = 6.0
    s[0, 0, 6, 0] = 10.0
    cells = propose_rois(s, num_rois=3, window=2)
    # (2,2): avg 0.9; zero rows 2-3, cols 2-3; (3,3) (overlapping the zeroed box): (0 + .6*3)/4 = .45;
    # then the box holding the isolated max (6,0): upper-left (5,0), avg 0.25
    assert as_list(cells) == [[(2, 2), (3, 3), (5, 0)]]
    assert as_list(cells) == greedy_reference(s, 3, 2)


def test_propose_rois_window4_hand():
    s = torch.zeros(1, 1, 7, 7)
    s[0, 0, 5:, 5:] = 1.0
    s[0, 0, 0, 6] = 0.5
    cells = propose_rois(s, num_rois=2, window=4)
    assert as_list(cells) == [[(3, 3), (0, 3)]]


@pytest.mark.parametrize("size, num_rois, window", [(7, 6, 1), (7, 6, 2), (7, 4, 4), (7, 3, 3), (2, 3, 1)])
def test_propose_rois_matches_greedy_reference(size, num_rois, window):
    g = torch.Generator().manual_seed(size * 100 + num_rois * 10 + window)
    cam = torch.randn(4, 3, size, size, generator=g, dtype=torch.float64)
    cells = propose_rois(cam, num_rois, window)
    assert cells.shape == (4, num_rois, 2)
    assert as_list(cells) == greedy_reference(cam, num_rois, window)
    # also in float32, as the DCG calls it
    assert as_list(propose_rois(cam.float(), num_rois, window)) == greedy_reference(cam, num_rois, window)


def test_propose_rois_no_cross_talk():
    g = torch.Generator().manual_seed(11)
    cam = torch.randn(3, 2, 7, 7, generator=g)
    for window, k in [(1, 6), (2, 5), (4, 3)]:
        together = propose_rois(cam, k, window)
        for b in range(3):
            assert torch.equal(together[b], propose_rois(cam[b : b + 1], k, window)[0])


# --------------------------------------------------------------------------- cells -> pixels, crops


def test_cells_to_pixels():
    cells = torch.tensor([[[3, 6], [0, 1]], [[6, 0], [5, 2]]])
    px = cells_to_pixels(cells, (7, 7), (224, 224))
    assert px.dtype == torch.long
    assert px.tolist() == [[[96, 192], [0, 32]], [[192, 0], [160, 64]]]
    # non-integer scale: round(3 / 7 * 100) = 43, round(1 / 7 * 100) = 14; rows and columns scale apart
    assert cells_to_pixels(torch.tensor([[[3, 1]]]), (7, 7), (100, 100)).tolist() == [[[43, 14]]]
    assert cells_to_pixels(torch.tensor([[[1, 1]]]), (2, 4), (64, 128)).tolist() == [[[32, 32]]]


def make_image(b: int = 2, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    image = torch.rand(b, 3, size, size, generator=g)
    image[0, 0] -= 2.0  # first-channel minima differ per image
    image[1, 0] -= 5.0
    image[:, 1] -= 20.0  # channel 1 holds the global minimum: it must not be used
    return image


def test_crop_patches_in_range():
    image = make_image()
    corners = torch.tensor([[[0, 0], [5, 9]], [[12, 3], [2, 12]]])
    r = 4
    patches = crop_patches(image, corners, r)
    assert patches.shape == (2, 2, r, r)
    for b in range(2):
        for k in range(2):
            y, x = corners[b, k].tolist()
            assert torch.equal(patches[b, k], image[b, 0, y : y + r, x : x + r])
            assert not torch.equal(patches[b, k], image[b, 1, y : y + r, x : x + r])


def test_crop_patches_outside_filled_with_first_channel_min():
    image = make_image()
    corners = torch.tensor([[[14, 13]], [[13, 15]]])  # near the bottom-right edge of a 16 x 16 image
    patches = crop_patches(image, corners, 4)
    for b, (y, x) in enumerate([(14, 13), (13, 15)]):
        fill = image[b, 0].min()
        expected = torch.full((4, 4), float(fill))
        inside = image[b, 0, y:, x:]
        expected[: inside.shape[0], : inside.shape[1]] = inside
        assert torch.equal(patches[b, 0], expected)
    # the fills differ between the two images (about -2 and -5), and are not the channel-1 minimum
    assert patches[0, 0, -1, -1] > -3 and patches[1, 0, -1, -1] < -4
    assert patches.min() > -10


# --------------------------------------------------------------------------- gated attention MIL


def test_gated_attention_mil_hand():
    torch.manual_seed(0)
    mil = GatedAttentionMIL(in_dim=8, num_classes=3, hidden=5)
    h = torch.randn(2, 4, 8)
    z, a, y = mil(h)
    assert z.shape == (2, 8) and a.shape == (2, 4) and y.shape == (2, 3)
    torch.testing.assert_close(a.sum(1), torch.ones(2))
    # a = softmax_K(w^T (sigmoid(U h) * tanh(V h))), by hand with the module's matrices
    U, V, w = mil.gate_u.weight, mil.gate_v.weight, mil.score_w.weight[0]
    s = torch.stack(
        [torch.stack([w @ (torch.sigmoid(U @ h[b, k]) * torch.tanh(V @ h[b, k])) for k in range(4)]) for b in range(2)]
    )
    expected_a = torch.exp(s) / torch.exp(s).sum(1, keepdim=True)
    torch.testing.assert_close(a, expected_a)
    expected_z = torch.stack([sum(expected_a[b, k] * h[b, k] for k in range(4)) for b in range(2)])
    torch.testing.assert_close(z, expected_z)
    torch.testing.assert_close(y, expected_z @ mil.classifier.weight.T)
    assert mil.classifier.bias is None and mil.gate_u.bias is None and mil.score_w.bias is None


def test_gated_attention_mil_permutation_and_uniform():
    torch.manual_seed(1)
    mil = GatedAttentionMIL(in_dim=6, num_classes=2)
    h = torch.randn(1, 5, 6)
    perm = torch.tensor([3, 0, 4, 1, 2])
    z, a, y = mil(h)
    zp, ap, yp = mil(h[:, perm])
    torch.testing.assert_close(ap, a[:, perm])
    torch.testing.assert_close(zp, z)
    torch.testing.assert_close(yp, y)
    same = h[:, :1].expand(1, 5, 6)
    z1, a1, _ = mil(same)
    torch.testing.assert_close(a1, torch.full((1, 5), 0.2))
    torch.testing.assert_close(z1, h[:, 0])


# --------------------------------------------------------------------------- DCG forward


@pytest.mark.parametrize(
    "image_size, num_rois, backbone", [(64, 3, "resnet18"), (224, 6, "resnet18"), (64, 3, "resnet50")]
)
def test_dcg_forward(make_dcg, image_size, num_rois, backbone):
    dcg = make_dcg(image_size=image_size, num_rois=num_rois, backbone=backbone).eval()
    cam = image_size // 32
    b, c = 2, 3
    image = torch.randn(b, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    out = dcg(image)
    assert out.y_fusion.shape == out.y_global.shape == out.y_local.shape == (b, c)
    assert out.patches.shape == (b, num_rois, 32, 32)
    assert out.attention.shape == (b, num_rois)
    assert out.saliency.shape == (b, c, cam, cam)
    for t in out:
        assert torch.isfinite(t).all()
    torch.testing.assert_close(out.y_fusion, (out.y_global + out.y_local) / 2)
    torch.testing.assert_close(out.y_global, out.saliency.mean(dim=(2, 3)))  # percent_t = 1.0
    torch.testing.assert_close(out.attention.sum(1), torch.ones(b))
    # patches: first-channel crops at the top-K cells of the normalised saliency (window 1), cell * 32 px
    s = out.saliency.detach().double().numpy()
    lo, hi = s.min(axis=(2, 3), keepdims=True), s.max(axis=(2, 3), keepdims=True)
    score = ((s - lo) / (hi - lo)).sum(1).reshape(b, -1)
    for bi in range(b):
        order = np.argsort(-score[bi], kind="stable")[:num_rois]
        for k, cell in enumerate(order):
            y, x = (cell // cam) * 32, (cell % cam) * 32
            assert torch.equal(out.patches[bi, k], image[bi, 0, y : y + 32, x : x + 32])


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_dcg_gradients_reach_both_trunks(make_dcg, backbone):
    dcg = make_dcg(backbone=backbone).train()
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = dcg(image)
    (out.y_fusion.sum() + out.y_local.pow(2).sum()).backward()
    for name, p in dcg.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for part in (dcg.global_trunk, dcg.local_trunk, dcg.saliency_conv, dcg.mil):
        first = next(part.parameters())
        assert first.grad.abs().sum() > 0


def test_dcg_rejects_bad_config():
    with pytest.raises(AssertionError, match="image_size 100 must be a multiple of 32"):
        DCG(num_classes=2, image_size=100, num_rois=3, roi_size=32)
    with pytest.raises(AssertionError, match=r"5 ROIs do not fit a 2\^2 CAM"):
        DCG(num_classes=2, image_size=64, num_rois=5, roi_size=32)  # a 2 x 2 CAM holds 4 ROIs
    with pytest.raises(AssertionError, match=r"0 ROIs do not fit a 2\^2 CAM"):
        DCG(num_classes=2, image_size=64, num_rois=0, roi_size=32)


def test_build_dcg_from_config():
    from diffmic.config import upgrade_config

    stored = {"data": {"num_classes": 4, "image_size": 224}, "dcg": {"num_rois": 4, "roi_size": 112, "percent_t": 0.5}}
    cfg = upgrade_config(stored, "a stored config")  # one stored before dcg.backbone: ResNet-18, the only trunk then
    dcg = build_dcg(cfg)
    assert (dcg.cam_size, dcg.num_rois, dcg.roi_size, dcg.percent_t, dcg.window) == (7, 4, 112, 0.5, 4)
    assert dcg.saliency_conv.out_channels == 4 and dcg.saliency_conv.bias is None
    assert dcg.backbone == "resnet18"
    cfg["dcg"]["backbone"] = "resnet50"
    assert build_dcg(cfg).backbone == "resnet50"


@pytest.mark.parametrize("backbone, width", [("resnet18", 512), ("resnet50", 2048)])
def test_dcg_widths_follow_the_trunk(make_dcg, backbone, width):
    """The authors' v1 DCG: torchvision ResNet-50 trunks in both branches (no avgpool, no fc), so the saliency conv,
    the MIL's U and V and its classifier read 2048 features; the MIL's hidden width stays 128."""
    import torchvision

    dcg = make_dcg(backbone=backbone)
    assert dcg.global_trunk.name == dcg.local_trunk.name == backbone
    model = torchvision.models.get_model(backbone)
    for trunk in (dcg.global_trunk, dcg.local_trunk):  # torchvision's network less its fc, tensor for tensor
        assert [v.shape for v in trunk.state_dict().values()] == [
            v.shape for k, v in model.state_dict().items() if not k.startswith("fc.")
        ]
    assert dcg.saliency_conv.in_channels == width
    assert dcg.mil.gate_u.in_features == dcg.mil.gate_v.in_features == dcg.mil.classifier.in_features == width
    assert dcg.mil.gate_u.out_features == dcg.mil.gate_v.out_features == dcg.mil.score_w.in_features == 128
    with torch.no_grad():
        assert dcg.global_trunk(torch.zeros(1, 3, 64, 64)).shape == (1, width, 2, 2)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_imagenet_weights_of_either_trunk(make_dcg, monkeypatch, caplog, backbone):
    """dcg.backbone_weights=imagenet loads torchvision's IMAGENET1K_V1 weights (the authors' pretrained=True; for
    ResNet-50 torchvision's default would be V2) into both trunks; offline, the same loud warning and random init."""
    import urllib.error

    import torchvision

    real, asked = torchvision.models.get_model, []

    def fake(name, weights=None, **kwargs):
        if weights is None:
            return real(name, weights=None, **kwargs)
        asked.append((name, weights))
        torch.manual_seed(123)  # stands for the downloaded weights
        return real(name, weights=None, **kwargs)

    monkeypatch.setattr(torchvision.models, "get_model", fake)
    dcg = make_dcg(backbone=backbone)
    dcg.load_backbone_weights("imagenet")
    assert asked == [(backbone, "IMAGENET1K_V1")] * 2
    torch.manual_seed(123)
    expected = real(backbone, weights=None).conv1.weight
    for trunk in (dcg.global_trunk, dcg.local_trunk):
        assert torch.equal(trunk.features[0].weight, expected)

    def offline(name, weights=None, **kwargs):
        if weights is not None:
            raise urllib.error.URLError("no network")
        return real(name, weights=None, **kwargs)

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    dcg = make_dcg(backbone=backbone)
    before = {k: v.clone() for k, v in dcg.state_dict().items()}
    with caplog.at_level("WARNING"):
        dcg.load_backbone_weights("imagenet")
    assert caplog.text.count("STARTING FROM RANDOM INIT") == 2 and "dcg.backbone_weights" in caplog.text
    assert backbone in caplog.text
    assert all(torch.equal(before[k], v) for k, v in dcg.state_dict().items())


def test_dcg_backbone_is_a_checked_choice():
    from diffmic.config import choices_of
    from pretraining.dcg import BACKBONES

    assert choices_of("dcg.backbone") == BACKBONES  # the config's choices are the model's registry
    with pytest.raises(ConfigError, match="config key dcg.backbone: 'resnet34' is not one of resnet18, resnet50"):
        load_config(None, ["dcg.backbone=resnet34"])
    # the demo's patch encoder copies the DCG's local trunk: with ResNet-50 trunks it must be a ResNet-50 too
    with pytest.raises(ConfigError, match="model.patch_encoder_weights: .* must be resnet50, not resnet18"):
        load_config(None, ["dcg.backbone=resnet50"])
    load_config(None, ["dcg.backbone=resnet50", "model.patch_encoder=resnet50"])
    load_config(None, ["dcg.backbone=resnet50", "model.method=diffmic_v1"])  # v1 has no patch encoder


@pytest.mark.parametrize(
    "name, backbone",
    [
        ("isic_v1", "resnet50"),
        ("aptos_v1", "resnet50"),
        ("isic", "resnet18"),
        ("aptos", "resnet18"),
        ("demo", "resnet18"),
    ],
)
def test_v1_configs_use_the_authors_v1_dcg_and_v2_configs_resnet18(name, backbone):
    from diffmic.config import PROJECT_ROOT

    assert load_config(PROJECT_ROOT / "configs" / f"{name}.yml")["dcg"]["backbone"] == backbone


def test_a_dcg_file_of_one_trunk_is_refused_for_the_other(tmp_path):
    """The DCG file records its trunk; another trunk is one ConfigError naming dcg.backbone (not a state-dict
    mismatch), and a file written before the record holds ResNet-18 trunks."""
    base = load_config(None, ["data.num_classes=3", "data.class_names=null", "model.method=diffmic_v1", "dcg.epochs=1"])
    train = SyntheticPatterns(12, 3, 64, 16, seed=0)

    def cfg_of(backbone: str) -> dict:
        return {**base, "dcg": {**base["dcg"], "backbone": backbone}}

    for saved, other in (("resnet50", "resnet18"), ("resnet18", "resnet50")):
        torch.manual_seed(0)
        path = tmp_path / f"{saved}.pt"
        save_dcg(build_dcg(cfg_of(saved)), cfg_of(saved), train, path)
        assert read_checkpoint(path)["meta"]["backbone"] == saved
        load_dcg(build_dcg(cfg_of(saved)), cfg_of(saved), path, train)
        with pytest.raises(ConfigError) as refused:
            load_dcg(build_dcg(cfg_of(other)), cfg_of(other), path, train)
        message = str(refused.value)
        assert message.startswith("config key dcg.backbone:") and "\n" not in message
        assert f"holds {saved} trunks" in message and f"set dcg.backbone={saved}" in message
        path.unlink()
    # an older file, without the record: ResNet-18
    path = tmp_path / "older.pt"
    save_dcg(build_dcg(cfg_of("resnet18")), cfg_of("resnet18"), train, path)
    content = read_checkpoint(path)
    del content["meta"]["backbone"]
    torch.save(content, path)
    load_dcg(build_dcg(cfg_of("resnet18")), cfg_of("resnet18"), path, train)
    with pytest.raises(ConfigError, match="config key dcg.backbone: .* holds resnet18 trunks"):
        load_dcg(build_dcg(cfg_of("resnet50")), cfg_of("resnet50"), path, train)


@pytest.mark.parametrize("ratio, last_lr", [(1.0, 1e-3), (0.01, 1e-5)])
def test_dcg_optimizer_anneals_to_min_lr_ratio(ratio, last_lr):
    """dcg.min_lr_ratio 1.0 (default) keeps Adam's lr constant; below 1 it is annealed by a cosine over
    dcg.epochs, reaching ratio * lr after the last epoch."""
    cfg = load_config(None, ["dcg.lr=1e-3", f"dcg.min_lr_ratio={ratio}", "dcg.epochs=4"])
    opt = dcg_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    optimizer, schedule = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    assert opt["lr_scheduler"]["interval"] == "epoch"
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(last_lr)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_dcg_system_probabilities_are_the_softmax_of_y_fusion():
    torch.manual_seed(0)
    system = DCGSystem(load_config(None, ["data.num_classes=3", "data.class_names=null"])).eval()
    with torch.no_grad():
        out = system.evaluate_batch({"image": torch.randn(2, 3, 64, 64)})
    torch.testing.assert_close(out["probs"], torch.softmax(out["scores"], dim=1))
