"""Split lists in the authors' own formats: the chest lists' appended no-finding bit (dropped only
when it is one) and image paths of the authors' machine (./dataset/isic2018/images/...), found by
file name under data.root."""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import dataloader.lists as lists
from dataloader.datamodule import build_datasets
from dataloader.lists import ImageList, NameIndex, SplitList, read_list
from diffmic.config import ConfigError, load_config

LOGGER = "dataloader.lists"
C = 14  # ChestX-ray14 findings; the authors' rows carry a 15th no-finding bit


def chest_row(findings: Sequence[int] = (), no_finding: int | None = None) -> list[int]:
    """15 ints: the given findings set, then the no-finding bit (by default the correct one)."""
    row = [0] * C
    for k in findings:
        row[k] = 1
    return row + [int(not findings) if no_finding is None else no_finding]


def write_chest_pickle(tmp_path: Path, labels: list) -> Path:
    entries = [{"img_root": f"images/{k:08d}_000.png", "label": label} for k, label in enumerate(labels)]
    path = tmp_path / "chest_train.pkl"
    path.write_bytes(pickle.dumps(entries))
    return path


# --- the appended no-finding bit --------------------------------------------------------------


def test_authors_chest_pickle_with_its_no_finding_bit_gives_14_findings(tmp_path, caplog):
    labels = [chest_row([0]), chest_row([]), chest_row([3, 13]), chest_row([])]
    with caplog.at_level(logging.INFO, logger=LOGGER):
        split = read_list(write_chest_pickle(tmp_path, labels), C, multilabel=True)
    assert split.labels.shape == (4, C) and split.labels.dtype == np.float32
    expected = np.zeros((4, C), np.float32)
    expected[0, 0] = expected[2, 3] = expected[2, 13] = 1
    np.testing.assert_array_equal(split.labels, expected)
    assert "chest_train.pkl: dropped the appended no-finding bit of 4 rows" in caplog.text


def test_no_finding_bit_set_together_with_a_finding_is_refused(tmp_path):
    # row 2 would lose its 15th positive if the column were simply cut off
    labels = [chest_row([0]), chest_row([]), chest_row([5], no_finding=1), chest_row([2], no_finding=1)]
    with pytest.raises(ConfigError) as err:
        read_list(write_chest_pickle(tmp_path, labels), C, multilabel=True)
    message = str(err.value)
    assert "chest_train.pkl, row 2: label [0, 0, 0, 0, 0, 1," in message
    assert "last bit is 1 together with 1 finding(s)" in message
    assert "1 exactly when none of the first 14 bits is 1" in message and "data.num_classes = 15" in message


def test_no_finding_bit_zero_in_a_row_without_findings_is_refused(tmp_path):
    labels = [chest_row([1]), chest_row([], no_finding=0), chest_row([])]
    with pytest.raises(ConfigError, match=r"chest_train.pkl, row 1: .* last bit is 0 although none of the findings"):
        read_list(write_chest_pickle(tmp_path, labels), C, multilabel=True)


def test_a_list_of_15th_columns_that_are_never_set_is_refused(tmp_path):
    # a 15th column of zeros is not a no-finding bit as soon as one row has no finding
    labels = [chest_row([1], no_finding=0), chest_row([4], no_finding=0), chest_row([], no_finding=0)]
    with pytest.raises(ConfigError, match=r"chest_train.pkl, row 2: "):
        read_list(write_chest_pickle(tmp_path, labels), C, multilabel=True)


@pytest.mark.parametrize("width", [C - 1, C + 2, 0])
def test_other_widths_are_refused_naming_the_row(tmp_path, width):
    labels = [chest_row([0]), chest_row([]), [0] * width]
    with pytest.raises(ConfigError) as err:
        read_list(write_chest_pickle(tmp_path, labels), C, multilabel=True)
    message = str(err.value)
    assert f"chest_train.pkl, row 2: multi-hot label of length {width}, expected data.num_classes = 14" in message
    assert f"the row holds {[0] * width!r}" in message


@pytest.mark.parametrize("first, other", [(C + 1, C), (C, C + 1)])
def test_a_list_mixing_both_widths_is_refused_at_the_first_row_of_the_other(tmp_path, first, other):
    rows = {C: [1] + [0] * (C - 1), C + 1: chest_row([1])}
    labels = [rows[first], rows[first], rows[other], rows[first], rows[other]]
    with pytest.raises(ConfigError, match=rf"chest_train.pkl, row 2: multi-hot label of length {other} .* row 0 has "):
        read_list(write_chest_pickle(tmp_path, labels), C, multilabel=True)


def test_csv_label_column_of_c_plus_1_bits_follows_the_same_rule(tmp_path, caplog):
    good = [" ".join(map(str, chest_row([2]))), "|".join(map(str, chest_row([])))]
    pd.DataFrame({"path": ["a.png", "b.png"], "label": good}).to_csv(tmp_path / "l.csv", index=False)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        split = read_list(tmp_path / "l.csv", C, multilabel=True)
    assert split.labels.shape == (2, C) and split.labels.sum() == 1 and split.labels[0, 2] == 1
    assert "l.csv: dropped the appended no-finding bit of 2 rows" in caplog.text

    bad = [*good, " ".join(map(str, chest_row([7], no_finding=1)))]
    pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "label": bad}).to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(ConfigError, match=r"l.csv, row 2: label '0 0 .*' has 15 bits .* together with 1 finding"):
        read_list(tmp_path / "l.csv", C, multilabel=True)


# --- image paths of the authors' machine ----------------------------------------------------

AUTHORS_PREFIX = "./dataset/isic2018/images/"


def make_jpegs(folder, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(names))
    for name in names:
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(folder / name, quality=90)


def isic_names(count: int, start: int = 1) -> list[str]:
    return [f"ISIC_{k:07d}.jpg" for k in range(start, start + count)]


def write_authors_pickle(path, img_roots: list[str], labels: list[int] | None = None) -> None:
    """Exactly the authors' format: Python's pickle of a list of {'img_root', 'label'} dicts."""
    labels = labels if labels is not None else [k % 7 for k in range(len(img_roots))]
    path.write_bytes(pickle.dumps([{"img_root": r, "label": y} for r, y in zip(img_roots, labels, strict=True)]))


def count_scans(monkeypatch) -> list:
    calls: list = []
    real = lists._index_images_by_name

    def counted(root):
        calls.append(root)
        return real(root)

    monkeypatch.setattr(lists, "_index_images_by_name", counted)
    return calls


def test_authors_isic_pickle_with_images_flat_under_data_root(tmp_path, caplog, monkeypatch):
    names = isic_names(5)
    make_jpegs(tmp_path / "images", names)
    listed = [AUTHORS_PREFIX + n for n in names]
    write_authors_pickle(tmp_path / "isic2018_train.pkl", listed, [3, 0, 1, 6, 3])
    scans = count_scans(monkeypatch)
    split = read_list(tmp_path / "isic2018_train.pkl", 7)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = ImageList(split, tmp_path / "images")
    assert [p.name for p in data.paths] == names and all(p.parent == tmp_path / "images" for p in data.paths)
    assert data.ids == listed and data.labels.tolist() == [3, 0, 1, 6, 3] and len(scans) == 1
    found = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]
    expected = (
        f"{tmp_path / 'isic2018_train.pkl'}: 5 of 5 image(s) found by file name under {tmp_path / 'images'} "
        "(their listed folders are not under data.root)"
    )
    assert found == [expected]  # said once, with the exact count
    assert data[4]["label"] == 3 and data[4]["image"].size == (16, 12)


def test_only_the_rows_that_do_not_resolve_are_counted(tmp_path, caplog):
    names = isic_names(4)
    make_jpegs(tmp_path / "images", names)
    listed = [names[0], AUTHORS_PREFIX + names[1], names[2][: -len(".jpg")], "images\\" + names[3]]
    write_authors_pickle(tmp_path / "isic2018_test.pkl", listed)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = ImageList(read_list(tmp_path / "isic2018_test.pkl", 7), tmp_path / "images")
    assert [p.name for p in data.paths] == names and data.ids == listed
    assert ": 2 of 4 image(s) found by file name under" in caplog.text  # the prefixed and the Windows path


def test_images_in_a_folder_tree_are_found_by_name(tmp_path):
    names = isic_names(6)
    make_jpegs(tmp_path / "root" / "part_1", names[:2])
    make_jpegs(tmp_path / "root" / "part_2" / "deeper", names[2:5])
    make_jpegs(tmp_path / "root", names[5:])
    listed = [AUTHORS_PREFIX + n for n in names[:5]] + [AUTHORS_PREFIX + names[5][: -len(".jpg")]]  # an id too
    write_authors_pickle(tmp_path / "train.pkl", listed)
    data = ImageList(read_list(tmp_path / "train.pkl", 7), tmp_path / "root")
    folders = [p.parent.relative_to(tmp_path / "root").as_posix() for p in data.paths]
    assert folders == ["part_1"] * 2 + ["part_2/deeper"] * 3 + ["."]
    assert [p.name for p in data.paths] == names


def test_symlinked_folders_are_followed_and_a_link_cycle_ends(tmp_path):
    make_jpegs(tmp_path / "elsewhere", isic_names(2))
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "root", target_is_directory=True)
    split = SplitList("l.pkl", [AUTHORS_PREFIX + n for n in isic_names(2)], np.array([0, 1]))
    data = ImageList(split, tmp_path / "root")  # one candidate per name, although the cycle reaches it twice
    assert data.paths == [tmp_path / "root" / "linked" / n for n in isic_names(2)]


def test_a_file_name_in_two_folders_is_refused_naming_both(tmp_path):
    make_jpegs(tmp_path / "root" / "a", isic_names(2))
    make_jpegs(tmp_path / "root" / "b", isic_names(1, start=2))  # ISIC_0000002.jpg twice
    write_authors_pickle(tmp_path / "train.pkl", [AUTHORS_PREFIX + n for n in isic_names(2)])
    with pytest.raises(ConfigError) as err:
        ImageList(read_list(tmp_path / "train.pkl", 7), tmp_path / "root")
    message = str(err.value)
    assert "train.pkl" in message and "'ISIC_0000002.jpg' matches 2 files" in message
    assert str(tmp_path / "root" / "a" / "ISIC_0000002.jpg") in message
    assert str(tmp_path / "root" / "b" / "ISIC_0000002.jpg") in message


def test_a_list_that_resolves_directly_never_scans(tmp_path, monkeypatch):
    names = isic_names(3)
    make_jpegs(tmp_path / "images", names)

    def no_scan(root):
        raise AssertionError(f"scanned {root}")

    monkeypatch.setattr(lists, "_index_images_by_name", no_scan)
    listed = [names[0], names[1][: -len(".jpg")], str(tmp_path / "images" / names[2])]  # name, id, absolute
    write_authors_pickle(tmp_path / "train.pkl", listed)
    data = ImageList(read_list(tmp_path / "train.pkl", 7), tmp_path / "images")
    assert data.paths == [tmp_path / "images" / n for n in names] and data.ids == listed


def test_missing_images_keep_the_count_and_first_five(tmp_path):
    make_jpegs(tmp_path / "images", isic_names(1))
    listed = [AUTHORS_PREFIX + n for n in isic_names(8)]
    write_authors_pickle(tmp_path / "train.pkl", listed)
    expected = ", ".join(listed[1:6]) + " ..."
    with pytest.raises(ConfigError, match=re.escape(f"7 of 8 image(s) of {tmp_path / 'train.pkl'} not found under")):
        ImageList(read_list(tmp_path / "train.pkl", 7), tmp_path / "images")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        ImageList(read_list(tmp_path / "train.pkl", 7), tmp_path / "images")


def test_a_shared_index_is_kept_and_rebuilt_when_it_cannot_answer(tmp_path, monkeypatch):
    make_jpegs(tmp_path / "images", isic_names(3))
    scans = count_scans(monkeypatch)
    names = NameIndex(tmp_path / "images")
    first = SplitList("first.pkl", [AUTHORS_PREFIX + n for n in isic_names(2)], np.array([0, 1]))
    ImageList(first, tmp_path / "images", names=names)
    ImageList(first.subset(np.array([1]), "second.pkl"), tmp_path / "images", names=names)
    assert len(scans) == 1  # the second list reuses the first one's index
    make_jpegs(tmp_path / "images", isic_names(1, start=9))  # added after the index was built
    late = SplitList("late.pkl", [AUTHORS_PREFIX + isic_names(1, start=9)[0]], np.array([0]))
    assert ImageList(late, tmp_path / "images", names=names).paths == [tmp_path / "images" / "ISIC_0000009.jpg"]
    assert len(scans) == 2
    ImageList(first, tmp_path / "images")  # without a shared index a list scans the root itself
    assert len(scans) == 3


def test_an_index_for_another_root_is_refused(tmp_path):
    make_jpegs(tmp_path / "images", isic_names(1))
    split = SplitList("l.pkl", [AUTHORS_PREFIX + isic_names(1)[0]], np.array([0]))
    with pytest.raises(ValueError, match="NameIndex given is for"):
        ImageList(split, tmp_path / "images", names=NameIndex(tmp_path))
    with pytest.raises(ValueError, match="NameIndex given is for"):  # one folder spelt two ways: paths would mix them
        ImageList(split, tmp_path / "images", names=NameIndex(tmp_path / "images" / ".." / "images"))


def test_two_listed_folders_sharing_one_file_are_a_warning(tmp_path, caplog):
    make_jpegs(tmp_path / "images", isic_names(1))
    split = SplitList("l.pkl", ["a/ISIC_0000001.jpg", "b/ISIC_0000001.jpg"], np.array([0, 1]))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ImageList(split, tmp_path / "images")
    assert "l.pkl: 1 listed path(s) resolve by file name to a file another listed path also resolves to" in caplog.text


def test_a_run_on_the_authors_lists_scans_the_data_root_once(tmp_path, monkeypatch, caplog):
    names = isic_names(14)
    make_jpegs(tmp_path / "images", names)
    write_authors_pickle(tmp_path / "isic2018_train.pkl", [AUTHORS_PREFIX + n for n in names[:10]])
    write_authors_pickle(tmp_path / "isic2018_test.pkl", [AUTHORS_PREFIX + n for n in names[10:]])
    cfg = load_config(
        None,
        [
            "data.dataset=list",
            f"data.root={tmp_path / 'images'}",
            "data.num_classes=7",
            f"data.train_list={tmp_path / 'isic2018_train.pkl'}",
            f"data.test_list={tmp_path / 'isic2018_test.pkl'}",
            "data.val_fraction=0.3",
            "data.class_names=null",
        ],
    )
    scans = count_scans(monkeypatch)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        sets = build_datasets(cfg)
    assert (len(sets["train"]), len(sets["val"]), len(sets["test"])) == (7, 3, 4) and len(scans) == 1
    assert sorted(p.name for ds in sets.values() for p in ds.paths) == names
    assert ": 7 of 7 image(s) found by file name" in caplog.text and ": 4 of 4 image(s) found" in caplog.text
