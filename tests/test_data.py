"""Data: split lists (CSV, the authors' pickles read safely), image modes, validation carving,
the synthetic demo set and the transforms."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dataloader.datamodule import build_datasets, carve_validation
from dataloader.lists import ImageList, SplitList, load_rgb, read_list
from dataloader.synthetic import SyntheticPatterns
from dataloader.transforms import ModelInput, build_transform, item
from diffmic.config import ConfigError, load_config


def make_images(folder, count: int, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(count):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"img_{k}.png")


def test_csv_list_with_ids_without_extension(tmp_path):
    make_images(tmp_path / "images", 4)
    pd.DataFrame({"image_id": [f"img_{k}" for k in range(4)], "label": [0, 1, 2, 1]}).to_csv(
        tmp_path / "l.csv", index=False
    )
    split = read_list(tmp_path / "l.csv", 3)
    data = ImageList(split, tmp_path / "images", transform=None)
    assert len(data) == 4 and data.paths[0].name == "img_0.png" and list(data.labels) == [0, 1, 2, 1]


def test_authors_pickle_loads(tmp_path):
    entries = [{"img_root": f"img_{k}.png", "label": k % 2} for k in range(3)]
    (tmp_path / "train.pkl").write_bytes(pickle.dumps(entries))
    split = read_list(tmp_path / "train.pkl", 2)
    assert split.paths == ["img_0.png", "img_1.png", "img_2.png"] and split.labels.tolist() == [0, 1, 0]


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([{"img_root": "a.png", "label": Payload()}]))
    with pytest.raises(ConfigError, match="evil.pkl.*only plain"):
        read_list(tmp_path / "evil.pkl", 2)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, needle",
    [
        ("path,label\n", r"l\.csv is empty"),
        ("path,grade\na.png,1\n", r"l\.csv: needs a label column .*found path, grade"),
        ("path,label\na.png,x\n", r"l\.csv, row 0: label 'x' is not an integer class"),
    ],
)
def test_bad_lists_name_the_problem(tmp_path, content, needle):
    (tmp_path / "l.csv").write_text(content)
    with pytest.raises(ConfigError, match=needle):
        read_list(tmp_path / "l.csv", 2)


def test_missing_images_and_bad_labels(tmp_path):
    make_images(tmp_path / "images", 2)
    split = SplitList("train.csv", ["img_0.png", "nope_1.png", "nope_2.png"], np.array([0, 1, 1]))
    with pytest.raises(ConfigError, match="2 of 3 image.*train.csv.*nope_1.png, nope_2.png"):
        ImageList(split, tmp_path / "images")
    pd.DataFrame({"path": ["img_0.png", "img_1.png"], "label": [0, 5]}).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(ConfigError, match="train.csv, row 1: label 5 is outside 0..1"):
        read_list(tmp_path / "train.csv", 2)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "I;16"])
def test_images_become_rgb(tmp_path, mode):
    array = np.arange(20 * 10, dtype=np.uint16 if mode == "I;16" else np.uint8).reshape(10, 20)
    if mode == "I;16":
        array = array * 300
        image = Image.fromarray(array)
    elif mode == "L":
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    else:
        image = Image.fromarray(np.stack([array.astype(np.uint8)] * len(mode), -1), mode=mode)
    image.save(tmp_path / "x.png")
    rgb = load_rgb(tmp_path / "x.png")
    assert rgb.mode == "RGB" and rgb.size == (20, 10)
    channel = np.asarray(rgb)[..., 0]
    # 16-bit is rescaled to the full 8-bit range (not clipped to white); 8-bit is unchanged
    assert channel.max() == (255 if mode == "I;16" else 199) and channel.min() == 0


def test_truncated_image_raises(tmp_path):
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="cut.jpg"):
        load_rgb(tmp_path / "cut.jpg")


def test_carved_validation_is_stratified_and_seeded():
    split = SplitList("l.csv", [f"{k}.png" for k in range(100)], np.array([0] * 80 + [1] * 20))
    train, val = carve_validation(split, 0.1, seed=3)
    again, val_again = carve_validation(split, 0.1, seed=3)
    assert len(val) == 10 and sorted(val.labels.tolist()) == [0] * 8 + [1] * 2
    assert val.paths == val_again.paths and not set(val.paths) & set(train.paths) and len(train) == 90


def test_list_dataset_from_config(tmp_path):
    make_images(tmp_path / "images", 12)
    rows = pd.DataFrame({"path": [f"img_{k}.png" for k in range(12)], "label": [k % 3 for k in range(12)]})
    rows[:9].to_csv(tmp_path / "train.csv", index=False)
    rows[9:].to_csv(tmp_path / "test.csv", index=False)
    cfg = load_config(
        None,
        [
            "data.dataset=list",
            f"data.root={tmp_path / 'images'}",
            "data.num_classes=3",
            f"data.train_list={tmp_path / 'train.csv'}",
            f"data.test_list={tmp_path / 'test.csv'}",
            "data.val_fraction=0.34",
            "data.class_names=null",
        ],
    )
    sets = build_datasets(cfg)
    assert (len(sets["train"]), len(sets["val"]), len(sets["test"])) == (5, 4, 3)  # val: ceil(9 * 0.34)
    sample = sets["train"][0]
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.uint8  # normalised on the device


def test_synthetic_set_is_deterministic_and_balanced():
    a = SyntheticPatterns(40, 4, 64, 16, seed=1)
    b = SyntheticPatterns(40, 4, 64, 16, seed=1)
    c = SyntheticPatterns(40, 4, 64, 16, seed=2)
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    assert np.bincount(a.labels).tolist() == [10, 10, 10, 10]


MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
WHITE, BLACK = (1 - MEAN) / STD, (0 - MEAN) / STD  # ImageNet-normalised white and black pixels


def framed_image() -> Image.Image:
    """30 x 50 (h x w), white with 10 black columns at each side: its central 30 x 30 square is all white."""
    array = np.full((30, 50, 3), 255, np.uint8)
    array[:, :10] = array[:, 40:] = 0
    return Image.fromarray(array)


def model_input(transform, image: Image.Image) -> torch.Tensor:
    """One image as the models read it: the transform's 8 bits, then the device half's normalisation."""
    return ModelInput()({key: value[None] for key, value in item(transform, image).items()})["image"][0]


def test_transforms_normalise_and_crop_square():
    cfg = load_config(None, ["data.image_size=64"])
    image = framed_image()
    for train in (True, False):
        out = model_input(build_transform(cfg, train), image)
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    out = model_input(build_transform(cfg, False), image)
    # the centre square is cut before resizing: the black side columns are gone, every pixel is white
    torch.testing.assert_close(out, WHITE[:, None, None].expand(3, 64, 64))


FINDINGS = ["a", "b", "c"]


def test_multilabel_csv_with_one_column_per_finding(tmp_path):
    pd.DataFrame({"image": ["x.png", "y.png"], "a": [1, 0], "b": [0, 0], "c": [1, 1]}).to_csv(
        tmp_path / "l.csv", index=False
    )
    split = read_list(tmp_path / "l.csv", 3, multilabel=True, class_names=FINDINGS)
    assert split.labels.dtype == np.float32 and split.labels.tolist() == [[1, 0, 1], [0, 0, 1]]


def test_multilabel_label_column_of_bits(tmp_path):
    pd.DataFrame({"path": ["x.png", "y.png"], "label": ["1 0 1", "0|1|0"]}).to_csv(tmp_path / "l.csv", index=False)
    split = read_list(tmp_path / "l.csv", 3, multilabel=True)
    assert split.labels.tolist() == [[1, 0, 1], [0, 1, 0]]


def test_authors_chest_pickle_drops_the_no_finding_bit(tmp_path, caplog):
    # the last bit is 1 exactly when none of the 3 findings is: it is the no-finding bit
    entries = [
        {"img_root": "x.png", "label": [1, 0, 0, 0]},
        {"img_root": "y.png", "label": [0, 0, 0, 1]},
        {"img_root": "z.png", "label": [0, 1, 1, 0]},
    ]
    (tmp_path / "chest.pkl").write_bytes(pickle.dumps(entries))
    with caplog.at_level("INFO", logger="dataloader.lists"):
        split = read_list(tmp_path / "chest.pkl", 3, multilabel=True)
    assert split.labels.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert "chest.pkl: dropped the appended no-finding bit of 3 rows" in caplog.text
    # the same trailing column is not a no-finding bit once it is 1 beside a finding: refused, not cut off
    entries[2]["label"] = [0, 1, 1, 1]
    (tmp_path / "chest.pkl").write_bytes(pickle.dumps(entries))
    with pytest.raises(ConfigError, match=r"chest.pkl, row 2: label \[0, 1, 1, 1\] has 4 bits .* last bit is 1"):
        read_list(tmp_path / "chest.pkl", 3, multilabel=True)


@pytest.mark.parametrize(
    "label, needle",
    [
        ([1, 0], "row 1: multi-hot label of length 2, expected data.num_classes = 3"),
        ([1, 0, 0, 0, 0], r"row 1: multi-hot label of length 5, .* the row holds \[1, 0, 0, 0, 0\]"),
        ([0, 0, 0, 1], "row 1: multi-hot label of length 4 .* but row 0 has 3 bits"),
        ([1, 0, 2], "row 1: label .* other than 0 and 1"),
        (1, "row 1: label 1 is not a multi-hot row"),
    ],
)
def test_bad_multi_hot_rows_name_file_and_row(tmp_path, label, needle):
    entries = [{"img_root": "x.png", "label": [1, 0, 0]}, {"img_root": "y.png", "label": label}]
    (tmp_path / "chest.pkl").write_bytes(pickle.dumps(entries))
    with pytest.raises(ConfigError, match=f"chest.pkl, {needle}"):
        read_list(tmp_path / "chest.pkl", 3, multilabel=True)


def test_multilabel_csv_without_finding_columns_is_refused(tmp_path):
    pd.DataFrame({"image": ["x.png"], "a": [1]}).to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(ConfigError, match="one 0/1 column per entry of data.class_names"):
        read_list(tmp_path / "l.csv", 3, multilabel=True, class_names=FINDINGS)


def test_multilabel_carve_is_seeded_without_stratification():
    labels = np.random.default_rng(0).integers(0, 2, (50, 3)).astype(np.float32)
    split = SplitList("l.csv", [f"{k}.png" for k in range(50)], labels)
    train, val = carve_validation(split, 0.2, seed=1)
    assert len(val) == 10 and val.labels.shape == (10, 3) and val.paths == carve_validation(split, 0.2, 1)[1].paths
    assert len(train) == 40 and not set(val.paths) & set(train.paths)
    # each image keeps its own multi-hot row
    row = {p: tuple(r) for p, r in zip(split.paths, labels.tolist(), strict=True)}
    assert all(
        row[p] == tuple(r) for part in (train, val) for p, r in zip(part.paths, part.labels.tolist(), strict=True)
    )


def _list_config(tmp_path, train_labels, test_labels, extra=()):
    make_images(tmp_path / "images", len(train_labels) + len(test_labels))
    names = [f"img_{k}.png" for k in range(len(train_labels) + len(test_labels))]
    pd.DataFrame({"path": names[: len(train_labels)], "label": train_labels}).to_csv(
        tmp_path / "train.csv", index=False
    )
    pd.DataFrame({"path": names[len(train_labels) :], "label": test_labels}).to_csv(tmp_path / "test.csv", index=False)
    return load_config(
        None,
        [
            "data.dataset=list",
            f"data.root={tmp_path / 'images'}",
            f"data.train_list={tmp_path / 'train.csv'}",
            f"data.test_list={tmp_path / 'test.csv'}",
            f"data.val_list={tmp_path / 'test.csv'}",
            "data.class_names=null",
            *extra,
        ],
    )


def test_class_count_that_disagrees_with_the_labels(tmp_path):
    cfg = _list_config(tmp_path, [0, 1, 2, 0], [1, 2], ["data.num_classes=5"])
    with pytest.raises(ConfigError, match="data.num_classes: 5, but .* only 3 classes"):
        build_datasets(cfg)


def test_class_absent_from_training_is_a_warning(tmp_path, caplog):
    cfg = _list_config(tmp_path, [0, 1, 0, 1], [1, 2], ["data.num_classes=3"])
    with caplog.at_level("WARNING"):
        sets = build_datasets(cfg)
    assert len(sets["test"]) == 2 and "classes [2] of the val split never occur in training" in caplog.text


def test_truncated_image_is_refused_before_training(tmp_path):
    cfg = _list_config(tmp_path, [0, 1, 0, 1], [1, 0], ["data.num_classes=2"])
    victim = tmp_path / "images" / "img_1.png"
    victim.write_bytes(victim.read_bytes()[:-200])
    with pytest.raises(ConfigError, match="truncated.*img_1.png"):
        build_datasets(cfg)
    cfg["data"]["verify_images"] = "off"
    train = build_datasets(cfg)["train"]
    assert len(train) == 4  # the check can be switched off; loading then raises
    (index,) = [k for k, p in enumerate(train.paths) if p.name == "img_1.png"]
    with pytest.raises(OSError, match="img_1.png"):
        train[index]


def test_chest_transform():
    cfg = load_config(None, ["data.image_size=64", "data.transform=chest", "data.rotation_degrees=20"])
    image = framed_image()
    assert model_input(build_transform(cfg, True), image).shape == (3, 64, 64)
    out = model_input(build_transform(cfg, False), image)
    assert out.shape == (3, 64, 64)
    # resize, no square crop: the whole width is squeezed in, so the black side columns stay at the edges
    torch.testing.assert_close(out[:, :, 0], BLACK[:, None].expand(3, 64))
    torch.testing.assert_close(out[:, :, -1], BLACK[:, None].expand(3, 64))
    torch.testing.assert_close(out[:, :, 32], WHITE[:, None].expand(3, 64))
