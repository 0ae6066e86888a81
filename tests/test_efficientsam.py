"""Tests for the EfficientSAM image encoder package (CPU only)."""

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffmic.config import ConfigError, choices_of, load_config
from EfficientSAM import ENCODERS, ImageEncoderViT, load_efficientsam_encoder

# SPEC facts of the EfficientSAM variants: token width, attention heads per block, number of blocks.
SPEC = {
    "vit_s": dict(width=384, heads=6, depth=12),
    "vit_t": dict(width=192, heads=3, depth=12),
}
WIDTH = {name: spec["width"] for name, spec in SPEC.items()}


def build(name: str) -> ImageEncoderViT:
    """A randomly initialised encoder of a registered variant, as the model layer builds it."""
    return ImageEncoderViT(**ENCODERS[name])


def official_shapes(name: str) -> dict:
    """Key -> shape of the official image encoder (neck excluded)."""
    d = WIDTH[name]
    shapes = {
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
        "pos_embed": (1, 197, d),
    }
    for i in range(SPEC[name]["depth"]):
        p = f"blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (d,),
                p + "norm1.bias": (d,),
                p + "attn.qkv.weight": (3 * d, d),
                p + "attn.qkv.bias": (3 * d,),
                p + "attn.proj.weight": (d, d),
                p + "attn.proj.bias": (d,),
                p + "norm2.weight": (d,),
                p + "norm2.bias": (d,),
                p + "mlp.fc1.weight": (4 * d, d),
                p + "mlp.fc1.bias": (4 * d,),
                p + "mlp.fc2.weight": (d, 4 * d),
                p + "mlp.fc2.bias": (d,),
            }
        )
    return shapes


def fake_encoder_state(name: str, seed: int = 0, pos_positions: int = 197) -> dict:
    """Random tensors with the official shapes (small values keep the forward sane)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in official_shapes(name).items():
        if k == "pos_embed":
            shape = (1, pos_positions, WIDTH[name])
        state[k] = torch.randn(shape, generator=g) * 0.05
    return state


def save_official(path: Path, enc_state: dict, wrap: bool = True) -> Path:
    """Save ``enc_state`` the way the official EfficientSAM checkpoint is laid out."""
    full = {"image_encoder." + k: v for k, v in enc_state.items()}
    d = enc_state["patch_embed.proj.weight"].shape[0]
    full["image_encoder.neck.0.weight"] = torch.randn(256, d, 1, 1)
    full["prompt_encoder.x"] = torch.randn(4)
    full["mask_decoder.y"] = torch.randn(4)
    torch.save({"model": full} if wrap else full, path)
    return path


@pytest.fixture(scope="module")
def vit_t() -> ImageEncoderViT:
    torch.manual_seed(0)
    return build("vit_t").eval()


@pytest.mark.parametrize("name", sorted(set(ENCODERS) | set(SPEC)))
def test_registered_variant_builds_the_spec_architecture(name):
    assert name in ENCODERS, f"SPEC variant {name} is not registered"
    assert name in SPEC, f"registered variant {name} has no SPEC facts in this test"
    spec = SPEC[name]
    torch.manual_seed(0)
    enc = build(name).eval()
    assert enc.embed_dim == spec["width"]
    assert len(enc.blocks) == spec["depth"]
    for i, blk in enumerate(enc.blocks):
        assert blk.attn.num_heads == spec["heads"], i
        assert blk.attn.num_heads * blk.attn.head_dim == spec["width"], i
    with torch.no_grad():
        y = enc(torch.randn(2, 3, 64, 96))
    assert y.shape == (2, spec["width"], 64 // 16, 96 // 16)


def test_config_accepts_exactly_the_registered_encoders():
    # The package has no name lookup of its own: config.py refuses an unknown name before the model
    # builds ImageEncoderViT(**ENCODERS[name]), so its choices are the registered variants.
    assert choices_of("model.image_encoder") == tuple(ENCODERS)
    for name in ENCODERS:
        assert load_config(None, [f"model.image_encoder={name}"])["model"]["image_encoder"] == name
    with pytest.raises(ConfigError, match=r"model\.image_encoder: 'vit_h' is not one of") as info:
        load_config(None, ["model.image_encoder=vit_h"])
    assert all(name in str(info.value) for name in ENCODERS)  # the valid names are listed


@pytest.mark.parametrize("name", sorted(SPEC))
def test_state_dict_is_official_layout(name):
    enc = build(name)
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert got == official_shapes(name)
    assert {k for k, _ in enc.named_parameters()} == set(official_shapes(name))


@pytest.mark.parametrize("size", [(224, 224), (64, 64), (96, 128)])
def test_output_shapes_vit_t(vit_t, size):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        y = vit_t(x)
    assert y.shape == (2, 192, size[0] // 16, size[1] // 16)
    assert torch.isfinite(y).all()


def test_output_shapes_vit_s():
    enc = build("vit_s").eval()
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 224, 224)).shape == (1, 384, 14, 14)
        y = enc(torch.randn(1, 3, 96, 128))
    assert y.shape == (1, 384, 6, 8)
    assert torch.isfinite(y).all()


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    enc = ImageEncoderViT(**ENCODERS["vit_t"])
    enc(torch.randn(2, 3, 64, 96)).square().mean().backward()
    for k, p in enc.named_parameters():
        assert p.grad is not None, k
        assert torch.isfinite(p.grad).all(), k
        # The class slot of pos_embed is unused by design; every other entry learns.
        g = p.grad[:, 1:] if k == "pos_embed" else p.grad
        assert g.abs().sum() > 0, k


def _manual_forward(enc: ImageEncoderViT, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Reference forward written independently: conv, add ``pos``, blocks, reshape."""
    feat = F.conv2d(x, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=16)
    b, d, h, w = feat.shape
    tokens = feat.flatten(2).transpose(1, 2) + pos
    for blk in enc.blocks:
        tokens = blk(tokens)
    return tokens.transpose(1, 2).reshape(b, d, h, w)


def test_224_uses_pos_embed_exactly(monkeypatch):
    torch.manual_seed(0)
    enc = ImageEncoderViT(embed_dim=192, depth=1, num_heads=3).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = _manual_forward(enc, x, enc.pos_embed[:, 1:])

        def no_interpolate(*args, **kwargs):
            raise AssertionError("224 input must not resample the position embedding")

        monkeypatch.setattr(F, "interpolate", no_interpolate)
        out = enc(x)
    torch.testing.assert_close(out, ref)


def test_other_size_resamples_pos_embed_bicubically():
    torch.manual_seed(0)
    enc = ImageEncoderViT(embed_dim=192, depth=1, num_heads=3).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        grid = enc.pos_embed[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
        pos = F.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False)
        pos = pos.flatten(2).transpose(1, 2)
        torch.testing.assert_close(enc(x), _manual_forward(enc, x, pos))


@pytest.mark.parametrize(
    "shape, msg",
    [((3, 64, 64), "4-D"), ((1, 1, 64, 64), "3 input channels"), ((1, 3, 64, 72), "multiples of 16")],
)
def test_input_preconditions(vit_t, shape, msg):
    with pytest.raises(AssertionError, match=msg):
        vit_t(torch.randn(*shape))


@pytest.mark.parametrize("wrap", [True, False])
def test_load_official_checkpoint(tmp_path, caplog, wrap):
    state = fake_encoder_state("vit_t", seed=1)
    path = save_official(tmp_path / "efficient_sam_vitt.pt", state, wrap=wrap)
    torch.manual_seed(0)
    enc = ImageEncoderViT(**ENCODERS["vit_t"]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = enc(x)
    with caplog.at_level(logging.INFO, logger="EfficientSAM"):
        load_efficientsam_encoder(enc, path)
    # one INFO record of the package's logger naming the file and how many tensors were loaded
    loaded_msgs = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("EfficientSAM") and r.levelno == logging.INFO and str(path) in r.getMessage()
    ]
    assert len(loaded_msgs) == 1 and f"Loaded {len(state)} " in loaded_msgs[0]
    loaded = enc.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    with torch.no_grad():
        after = enc(x)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_each_variant_loads_its_official_checkpoint_from_a_str_path(tmp_path, name):
    state = fake_encoder_state(name, seed=2)
    path = save_official(tmp_path / f"efficient_sam_{name.replace('_', '')}.pt", state)
    enc = build(name)
    load_efficientsam_encoder(enc, str(path))  # the config passes a str
    loaded = enc.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


def test_load_resamples_pos_embed_of_other_size(tmp_path):
    state = fake_encoder_state("vit_t", seed=3, pos_positions=1 + 8 * 8)
    path = save_official(tmp_path / "w8.pt", state)
    enc = ImageEncoderViT(**ENCODERS["vit_t"])
    load_efficientsam_encoder(enc, path)
    src = state["pos_embed"]
    grid = src[:, 1:].reshape(1, 8, 8, 192).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False)
    want = torch.cat([src[:, :1], want.flatten(2).transpose(1, 2)], dim=1)
    assert enc.pos_embed.shape == (1, 197, 192)
    torch.testing.assert_close(enc.pos_embed.detach(), want)
    assert torch.equal(enc.pos_embed[:, :1].detach(), src[:, :1])  # class slot kept


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "efficient_sam_vits.pt"
    with pytest.raises(FileNotFoundError, match="efficient_sam_vits.pt") as info:
        load_efficientsam_encoder(ImageEncoderViT(192, 1, 3), path)
    assert str(path) in str(info.value)


def test_vit_t_file_into_vit_s_is_rejected(tmp_path):
    path = save_official(tmp_path / "tiny.pt", fake_encoder_state("vit_t"))
    enc = build("vit_s")
    # the file's variant and the encoder's, each with its width, in that order
    match = r"looks like vit_t \(width 192\) but the encoder is vit_s \(width 384\)"
    with pytest.raises(ValueError, match=match) as info:
        load_efficientsam_encoder(enc, path)
    assert "tiny.pt" in str(info.value)


def test_same_width_other_depth_is_rejected(tmp_path):
    path = save_official(tmp_path / "deep.pt", fake_encoder_state("vit_t"))
    enc = ImageEncoderViT(embed_dim=192, depth=1, num_heads=3)
    with pytest.raises(ValueError, match=r"deep\.pt: encoder weights do not match the model") as info:
        load_efficientsam_encoder(enc, path)
    assert "blocks.1.attn.qkv.weight" in str(info.value)  # the surplus blocks are named


def test_file_without_image_encoder_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"mask_decoder.y": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match=r"other\.pt: no 'image_encoder\.\*' entries found"):
        load_efficientsam_encoder(ImageEncoderViT(192, 1, 3), path)
