"""Tests for explain.py and explain_figure.py on small random-weight models: the explanation is the model's own
sampling (the same grids and scores as evaluation, the DCG and encoders once), the ROI boxes are where the DCG
cropped, the figure shows the model's tensors and draws the boxes where they are, and the pointing game's hits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dataloader.synthetic import PALETTE, SyntheticPatterns, _texture, make_image, make_image_with_boxes
from diffmic.config import load_config
from diffmic.evaluation.figures import save
from diffmic.explain.explanation import cell_boxes, explain_batch, pointing_hits, roi_boxes
from diffmic.explain.figure import box_line_width, display_scale, explanation_figure
from diffmic.v1 import DiffMICv1
from diffmic.v1.card import CARDScheduler, card_sample
from diffmic.v2.pipeline import DDIMScheduler, ddim_sample, guided_prior_map
from diffmic.v2.system import DiffMICv2

SMALL = ["model.feature_dim=16", "data.num_classes=3", "data.class_names=null"]
NAMES = ["a", "b", "c"]


def small_v2(*overrides: str) -> DiffMICv2:
    torch.manual_seed(0)
    return DiffMICv2(load_config(None, [*SMALL, *overrides])).eval()


def synthetic_batch(count: int = 3, seed: int = 4) -> tuple[dict, SyntheticPatterns]:
    from dataloader.transforms import ModelInput, build_transform

    cfg = load_config(None, SMALL)
    data = SyntheticPatterns(count, 3, 64, 20, seed=seed, transform=build_transform(cfg, train=False))
    items = [data[i] for i in range(count)]
    batch = {
        "image": ModelInput()({"image": torch.stack([x["image"] for x in items])})["image"],
        "label": torch.tensor([x["label"] for x in items]),
        "index": torch.tensor([x["index"] for x in items]),
    }
    return batch, data


def find_image(fig, gid: str):
    found = [im for ax in fig.axes for im in ax.images if im.get_gid() == gid]
    assert len(found) == 1, f"one image artist {gid} expected, found {len(found)}"
    return found[0]


# ---------------------------------------------------------------------- the samplers' read-only step callback


@pytest.mark.parametrize("clip", [True, False])
def test_ddim_on_step_sees_every_step_and_changes_no_bit(make_denoiser, clip):
    denoiser = make_denoiser().eval()
    scheduler = DDIMScheduler(1000, clip_sample=clip)
    condition, prior = torch.randn(2, 16), torch.randn(2, 3, 3, 3)
    start = torch.rand(2, 2, 3, 3, 3) * 2  # (S, B, C, K, K)
    plain = ddim_sample(denoiser, scheduler, condition, prior, start, 10)
    seen = []
    recorded = ddim_sample(denoiser, scheduler, condition, prior, start, 10, lambda t, x0, y: seen.append((t, x0, y)))
    assert torch.equal(plain, recorded), "the callback must not change the sampled grids"
    assert [t for t, _, _ in seen] == list(range(900, -1, -100))
    assert torch.equal(seen[-1][2], plain), "the last step's grid is the result"
    # after the last step alpha_bar_prev = 1: the grid is the clean estimate itself
    assert torch.equal(seen[-1][1], plain)
    if clip:
        assert all(x0.abs().max() <= 1 for _, x0, _ in seen)


def test_card_on_step_changes_no_bit():
    torch.manual_seed(0)

    class Linear(torch.nn.Module):
        def denoise(self, x, y, y_hat, t):
            return 0.1 * y + 0.2 * y_hat + 0.01 * x[:, :3] + 1e-3 * t[:, None]

    scheduler = CARDScheduler(50)
    condition, y_hat, noise = torch.randn(2, 5), torch.softmax(torch.randn(2, 3), 1), torch.randn(20, 2, 2, 3)
    plain = card_sample(Linear(), scheduler, condition, y_hat, noise)
    seen = []
    recorded = card_sample(Linear(), scheduler, condition, y_hat, noise, lambda t, y: seen.append((t, y.clone())))
    assert torch.equal(plain, recorded)
    assert [t for t, _ in seen] == list(range(19, -1, -1)) and torch.equal(seen[-1][1], plain)


# ---------------------------------------------------------------------- the explanation is the model's own pass


def test_v2_explanation_is_evaluation_with_the_dcg_and_encoders_once():
    system = small_v2("diffusion.eval_samples=2")
    batch, _ = synthetic_batch()
    counts = {"dcg": 0, "image": 0, "patch": 0}
    for name, module in (
        ("dcg", system.dcg),
        ("image", system.denoiser.image_encoder),
        ("patch", system.denoiser.patch_encoder),
    ):
        module.register_forward_hook(lambda *args, name=name: counts.__setitem__(name, counts[name] + 1))
    expl = explain_batch(system, batch)
    assert counts == {"dcg": 1, "image": 1, "patch": 1}, "the DCG and the encoders run once, as in sampling"
    evaluated = system.evaluate_batch(batch)
    assert torch.equal(expl.scores, evaluated["scores"]), "the explanation's scores are evaluation's, bit for bit"
    assert torch.equal(expl.trajectory[:, -1], expl.scores), "the trajectory ends at the score"
    assert expl.trajectory.shape == (3, 10, 3) and expl.estimate.shape == (3, 10, 3)
    assert expl.timesteps == list(range(180, -1, -20))  # demo: T = 200, 10 steps
    with torch.no_grad():
        guide = system.dcg(batch["image"])
        grid = system.sample(batch["image"], batch["index"])
    assert torch.equal(expl.grid, grid)
    assert torch.equal(expl.prior, guided_prior_map(guide.y_global, guide.y_local, 3))
    assert torch.equal(expl.cam, guide.saliency) and torch.equal(expl.attention, guide.attention)
    assert expl.saliency(0, 1).shape == (64, 64)


def test_v1_explanation_is_evaluation_and_its_figure_says_there_is_no_grid():
    torch.manual_seed(0)
    cfg = load_config(None, [*SMALL, "model.method=diffmic_v1", "v1.feature_dim=16", "v1.sampling_steps=20"])
    system = DiffMICv1(cfg).eval()
    batch, _ = synthetic_batch(2)
    expl = explain_batch(system, batch)
    assert torch.equal(expl.scores, system.evaluate_batch(batch)["scores"])
    assert expl.grid is None and expl.prior is None and expl.trajectory.shape == (2, 20, 3)
    assert torch.allclose(expl.trajectory[:, -1], expl.scores)
    fig = explanation_figure(expl, 0, NAMES, "x")
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "no K x K grid" in texts
    assert not [im for ax in fig.axes for im in ax.images if str(im.get_gid()).startswith("grid")]
    find_image(fig, f"overlay:{int(expl.predicted()[0])}")


def test_roi_boxes_are_where_the_dcg_cropped():
    system = small_v2()
    batch, _ = synthetic_batch()
    expl = explain_batch(system, batch)
    with torch.no_grad():
        guide = system.dcg(batch["image"])
    assert torch.equal(expl.boxes, roi_boxes(guide.corners, 32))
    for b in range(3):
        for k, (top, left, bottom, right) in enumerate(expl.boxes[b].tolist()):
            assert bottom - top == right - left == 32
            crop = batch["image"][b, 0, top:bottom, left:right]  # the demo's boxes lie inside the 64 px image
            assert torch.equal(guide.patches[b, k], crop), "the box must be the window the DCG cropped"


def test_grid_and_prior_in_the_figure_are_the_models_tensors():
    system = small_v2()
    batch, _ = synthetic_batch()
    batch["label"][0] = (system.evaluate_batch(batch)["scores"][0].argmax() + 1) % 3  # a wrong prediction
    expl = explain_batch(system, batch)
    shown = expl.classes_to_show(0)
    assert [role for _, role in shown] == ["predicted", "true"]
    fig = explanation_figure(expl, 0, NAMES, "img")
    for c, _ in shown:
        np.testing.assert_array_equal(find_image(fig, f"grid:{c}").get_array(), expl.grid[0, c].numpy())
        np.testing.assert_array_equal(find_image(fig, f"prior:{c}").get_array(), expl.prior[0, c].numpy())
    # a right prediction explains one class
    batch["label"][0] = expl.predicted()[0]
    assert len(explain_batch(system, batch).classes_to_show(0)) == 1


def test_png_has_the_roi_boxes_on_their_edges(tmp_path):
    system = small_v2()
    batch, _ = synthetic_batch()
    expl = explain_batch(system, batch)
    c = int(expl.predicted()[0])
    fig = explanation_figure(expl, 0, NAMES, "img")
    path = save(fig, tmp_path / "img.png")
    png = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert png.shape[:2] == (fig.canvas.get_width_height()[1], fig.canvas.get_width_height()[0])
    shown = find_image(fig, f"overlay:{c}")
    scale, line = display_scale(64, 64), box_line_width(display_scale(64, 64))

    def pixel(row: float, col: float) -> np.ndarray:  # the centre of an overlay pixel -> the PNG's pixel there
        x, y = shown.axes.transData.transform((col, row))
        return png[int(png.shape[0] - y), int(x)]

    for top, left, bottom, right in expl.boxes[0].tolist():
        middle_row, middle_col = (top + bottom) / 2 * scale, (left + right) / 2 * scale
        edges = [(top * scale + line // 2, middle_col), (middle_row, left * scale + line // 2)]
        edges += [(bottom * scale - 1 - line // 2, middle_col), (middle_row, right * scale - 1 - line // 2)]
        for row, col in edges:
            assert (pixel(row, col) >= 235).all(), f"no white box edge at overlay ({row}, {col}): {pixel(row, col)}"
        assert not (pixel(middle_row, middle_col) >= 235).all(), "inside a box is the image, not the box colour"


def test_the_saliency_overlay_follows_the_texture():
    """Two images that differ only in where the class texture sits: their saliency, and the overlay drawn from it,
    differ. (Whether the saliency points at the texture is what benchmarks/explain_demo.py measures.)"""
    rng = np.random.default_rng(0)
    base, _, _ = make_image_with_boxes(rng, 0, 64, 20)
    mask = _texture(1, 20)[..., None]
    images = []
    for y, x in ((4, 4), (40, 40)):
        image = base.astype(np.float32) / 255
        image[y : y + 20, x : x + 20] = mask * PALETTE[1] + (1 - mask) * image[y : y + 20, x : x + 20]
        images.append(Image.fromarray((image * 255).astype(np.uint8)))
    from dataloader.transforms import ModelInput, build_transform

    system = small_v2()
    transform = build_transform(system.cfg, train=False)
    batch = {
        "image": ModelInput()({"image": torch.stack([transform(i) for i in images])})["image"],
        "label": torch.tensor([1, 1]),
        "index": torch.arange(2),
    }
    expl = explain_batch(system, batch)
    first, second = expl.saliency(0, 1), expl.saliency(1, 1)
    assert not torch.allclose(first, second)
    overlays = [
        find_image(explanation_figure(expl, b, NAMES, "x"), f"overlay:{int(expl.predicted()[b])}").get_array()
        for b in range(2)
    ]
    assert overlays[0].shape == overlays[1].shape and (overlays[0] != overlays[1]).any()


def test_multilabel_explains_every_present_or_predicted_finding():
    system = small_v2("data.task=multilabel", "data.dataset=list")
    batch, _ = synthetic_batch(2)
    scores = system.evaluate_batch(batch)["scores"]
    predicted = {int(c) for c in torch.nonzero(scores[0] >= 0.5).flatten()}
    absent = sorted(set(range(3)) - predicted)
    label = torch.zeros(2, 3)
    if absent:
        label[0, absent[0]] = 1  # a present finding the model does not predict
    batch["label"] = label
    expl = explain_batch(system, batch)
    shown = expl.classes_to_show(0)
    expected = predicted | ({absent[0]} if absent else set())
    assert {c for c, _ in shown} == (expected or {int(scores[0].argmax())})
    fig = explanation_figure(expl, 0, NAMES, "x")
    for c, _ in shown:
        find_image(fig, f"overlay:{c}")
        find_image(fig, f"grid:{c}")


# ---------------------------------------------------------------------- the demo set's evidence and the pointing game


def test_synthetic_boxes_mark_the_texture_and_leave_the_images_as_they_were():
    data = SyntheticPatterns(12, 4, 64, 20, seed=3)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert np.array_equal(make_image(rng_a, 2, 64, 20), make_image_with_boxes(rng_b, 2, 64, 20)[0])
    for image, label, (top, left, bottom, right) in zip(data.images, data.labels, data.texture_boxes, strict=True):
        assert bottom - top == right - left == 20
        on = _texture(int(label), 20) > 0.5
        pixels = image[top:bottom, left:right][on] / 255  # the texture's own pixels carry the class colour
        assert np.abs(pixels - PALETTE[label]).max() <= 0.1 + 1 / 255


def test_pointing_hits_against_a_hand_made_saliency():
    cam = torch.zeros(2, 2, 2, 2)
    cam[0, 1, 1, 0] = 5.0  # image 0, class 1 peaks in the lower-left cell (rows 32..63, columns 0..31)
    cam[1, 0, 0, 1] = 5.0  # image 1, class 0 in the upper-right cell
    evidence = torch.tensor([[40, 5, 60, 25], [40, 5, 60, 25]])  # centre (50, 15): the lower-left cell
    boxes = torch.tensor([[[32, 0, 64, 32], [0, 0, 32, 32]], [[0, 32, 32, 64], [32, 0, 64, 32]]])
    attention = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    hits = pointing_hits(cam, boxes, attention, torch.tensor([1, 0]), evidence, (64, 64))
    assert hits["saliency"].tolist() == [True, False]
    assert hits["roi_any"].tolist() == [True, True]
    assert hits["roi_top"].tolist() == [False, False]
    assert cell_boxes(torch.tensor([[1, 0]]), (2, 2), (64, 64)).tolist() == [[32, 0, 64, 32]]


@pytest.mark.slow
def test_explain_demo_benchmark_computes_its_numbers(tmp_path):
    """The benchmark's hit rates are those of a per-image reference computed here from the DCG file it trained."""
    import json

    from benchmarks import explain_demo
    from dataloader.datamodule import build_datasets
    from dataloader.transforms import ModelInput
    from pretraining.dcg import build_dcg
    from pretraining.dcg_file import load_dcg

    tiny = [
        "data.synthetic.num_train=48",
        "data.synthetic.num_val=16",
        "data.synthetic.num_test=24",
        "dcg.batch_size=16",
        "dcg.epochs=1",
        f"trainer.log_dir={tmp_path / 'logs'}",
    ]
    rc = explain_demo.main(["--random-inits", "2", "--name", "pg", "--out-dir", str(tmp_path), *tiny])
    assert rc == 0
    report = json.loads((tmp_path / "pg.json").read_text())
    assert "| trained |" in (tmp_path / "pg.md").read_text()
    cfg = load_config(None, tiny)
    test = build_datasets(cfg)["test"]
    dcg = build_dcg(cfg)
    load_dcg(dcg, cfg, tmp_path / "logs" / "demo" / "dcg.pt")
    dcg.eval()
    with torch.no_grad():  # in the benchmark's batches: the same forward numbers
        batches = [torch.stack([test[i]["image"] for i in range(s, min(s + 16, len(test)))]) for s in (0, 16)]
        outs = [dcg(ModelInput()({"image": images})["image"]) for images in batches]
    cams, fusion = torch.cat([o.saliency for o in outs]), torch.cat([o.y_fusion for o in outs])
    corners = torch.cat([o.corners for o in outs])
    saliency, roi_any = [], []
    for i in range(len(test)):  # one image at a time, in plain Python: the reference
        row, col = np.unravel_index(int(cams[i, int(fusion[i].argmax())].argmax()), (2, 2))
        top, left, bottom, right = test.texture_boxes[i]
        cy, cx = (top + bottom) / 2, (left + right) / 2
        saliency.append(row * 32 <= cy < row * 32 + 32 and col * 32 <= cx < col * 32 + 32)
        roi_any.append(any(r <= cy < r + 32 and q <= cx < q + 32 for r, q in corners[i].tolist()))
    assert report["trained"]["texture/saliency"] == pytest.approx(np.mean(saliency), abs=1e-9)
    assert report["trained"]["texture/roi_any"] == pytest.approx(np.mean(roi_any), abs=1e-9)
    assert len(report["random"]) == 2 and all(0 <= r["texture/saliency"] <= 1 for r in report["random"])


@pytest.mark.parametrize(
    "ids, expected",
    [
        (["a.png", "b.jpg"], ["a.png", "b.png"]),
        (["dir/x.png", "dir\\y.tif", "c d?.png"], ["dir__x.png", "dir__y.png", "c_d.png"]),
        # the second "a" takes its index; the third id is itself called a_1 and must not overwrite it
        (["a.png", "a.jpg", "a_1.png"], ["a.png", "a_1.png", "a_1_2.png"]),
        (["", "..."], ["image_0.png", "image_1.png"]),
    ],
)
def test_figure_names_never_repeat(ids, expected):
    from diffmic.explain.outputs import figure_names

    names = figure_names(ids)
    assert names == expected and len(set(names)) == len(names)
