"""Image checks before training: truncated files and non-images are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile

from dataloader.checks import verify_images
from diffmic.config import ConfigError

RNG = np.random.default_rng(0)
# Noise keeps the compressed data large, so a cut removes image data and not just the trailer.
FORMATS = {
    "jpeg_rgb": (".jpg", lambda: Image.fromarray(RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8))),
    "png_rgb": (".png", lambda: Image.fromarray(RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8))),
    "png_rgba": (".png", lambda: Image.fromarray(RNG.integers(0, 255, (48, 64, 4), dtype=np.uint8))),
    "png_l": (".png", lambda: Image.fromarray(RNG.integers(0, 255, (48, 64), dtype=np.uint8))),
    "png_i16": (".png", lambda: Image.fromarray(RNG.integers(0, 65535, (48, 64), dtype=np.uint16))),
    "bmp": (".bmp", lambda: Image.fromarray(RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8))),
}


def make(folder, kind: str, name: str = "img"):
    suffix, build = FORMATS[kind]
    path = folder / f"{name}{suffix}"
    build().save(path)
    return path


def truncate(path, keep: float = 0.7):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("kind", list(FORMATS))
def test_valid_images_pass(tmp_path, kind, full):
    path = make(tmp_path, kind)
    if kind == "png_i16":
        assert Image.open(path).mode == "I;16"
    verify_images([path], "train", full=full)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("kind", ["jpeg_rgb", "png_rgb", "png_i16", "bmp"])
def test_truncated_images_are_refused(tmp_path, kind, full):
    path = truncate(make(tmp_path, kind, "cut"))
    with pytest.raises(ConfigError) as err:
        verify_images([path], "train", full=full)
    # the kind and the file together, the first bad file with its folder
    assert f"1 truncated ({path})" in str(err.value)
    assert "1 of 1 image(s)" in str(err.value)


@pytest.mark.parametrize("full", [False, True])
def test_jpeg_with_trailing_bytes_after_eoi_passes(tmp_path, full):
    path = make(tmp_path, "jpeg_rgb")
    path.write_bytes(path.read_bytes() + b"\x00vendor-padding\x00" * 8)
    verify_images([path], "train", full=full)


@pytest.mark.parametrize("content", [b"this is not an image\n", b""])
def test_text_and_empty_files_are_not_images(tmp_path, content):
    path = tmp_path / "x.jpg"
    path.write_bytes(content)
    for full in (False, True):
        with pytest.raises(ConfigError, match=r"1 not an image \(.*x\.jpg\)"):
            verify_images([path], "val", full=full)


def test_message_names_at_most_five_of_many(tmp_path):
    bad = [truncate(make(tmp_path, "png_rgb", f"bad_{k}")) for k in range(7)]
    with pytest.raises(ConfigError) as err:
        verify_images(bad, "train")
    message = str(err.value)
    assert message.startswith("train: 7 of 7 image(s) cannot be used: 7 truncated (")
    assert "..." in message and "\n" not in message
    assert sum(p.name in message for p in bad) == 5
    assert str(bad[0]) in message  # the first one with its folder


def test_mixed_list_names_only_bad_files(tmp_path):
    good = [make(tmp_path, kind, f"good_{kind}") for kind in FORMATS]
    cut = truncate(make(tmp_path, "jpeg_rgb", "cut"))
    text = tmp_path / "notes.png"
    text.write_text("hello")
    paths = good[:3] + [cut] + good[3:] + [text]
    with pytest.raises(ConfigError) as err:
        verify_images(paths, "test", workers=3)
    message = str(err.value)
    assert "2 of 8 image(s)" in message and "1 truncated (" in message and "1 not an image (" in message
    assert cut.name in message and text.name in message
    assert not any(p.name in message for p in good)


def test_missing_file_is_reported_not_raised(tmp_path):
    with pytest.raises(ConfigError, match=r"train: 1 of 1 image\(s\) cannot be used: 1 unreadable \(.*gone\.png\)"):
        verify_images([tmp_path / "gone.png"], "train")


def test_full_mode_catches_damage_inside_a_file(tmp_path):
    # A hole in the middle of the data leaves the tail intact: only a full decode can see it.
    path = make(tmp_path, "png_rgb")
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))
    verify_images([path], "train")
    with pytest.raises(ConfigError, match=r"1 (corrupt|truncated) \(.*img\.png\)"):
        verify_images([path], "train", full=True)


@pytest.mark.parametrize("preset", [False, True])
def test_load_truncated_flag_is_left_as_found(tmp_path, monkeypatch, preset):
    # Another library may have set the flag: truncation must still be caught, the flag restored.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", preset)
    cut = truncate(make(tmp_path, "bmp", "cut"))
    with pytest.raises(ConfigError, match="truncated"):
        verify_images([cut], "train", full=True)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is preset
    verify_images([make(tmp_path, "png_rgb")], "train")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is preset
