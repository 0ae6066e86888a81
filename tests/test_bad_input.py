"""Bad input is refused before training starts: exit code 2, one log line naming the file, the row
or the key, and nothing written."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import diffuser_trainer

LABELS = [0, 1, 2, 0, 1, 2, 0, 1]


def make_case(tmp: Path) -> dict[str, Path]:
    """8 PNG images, a train and a test list of 3 classes."""
    (tmp / "images").mkdir()
    rng = np.random.default_rng(0)
    for k in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp / "images" / f"img_{k}.png")
    write(tmp / "train.csv", [f"img_{k}.png" for k in range(6)], LABELS[:6])
    write(tmp / "test.csv", ["img_6.png", "img_7.png"], LABELS[6:])
    return {"root": tmp / "images", "train": tmp / "train.csv", "test": tmp / "test.csv"}


def write(path: Path, names: list[str], labels: list) -> None:
    pd.DataFrame({"path": names, "label": labels}).to_csv(path, index=False)


def missing_images(case):
    write(case["train"], [f"gone_{k}.png" for k in range(7)] + ["img_0.png"], [0, 1, 2, 0, 1, 2, 0, 1])
    return (
        [],
        "7 of 8 image(s) of {train} not found under {root}: "
        "gone_0.png, gone_1.png, gone_2.png, gone_3.png, gone_4.png ...",
    )


def truncated(case):
    victim = case["root"] / "img_2.png"
    victim.write_bytes(victim.read_bytes()[:-300])
    return [], "{train}: 1 of 6 image(s) cannot be used: 1 truncated ({root}/img_2.png)"


def not_an_image(case):
    (case["root"] / "img_7.png").write_text("this is a text file")
    return [], "{test}: 1 of 2 image(s) cannot be used: 1 not an image ({root}/img_7.png)"


def label_out_of_range(case):
    write(case["train"], [f"img_{k}.png" for k in range(6)], [0, 1, 2, 7, 1, 2])
    return [], "{train}, row 3: label 7 is outside 0..2 (data.num_classes = 3; 1 such rows)"


def multi_hot_wrong_length(case):
    write(case["train"], [f"img_{k}.png" for k in range(6)], ["1 0 0", "0 1", "0 0 1", "1 0 0", "0 1 0", "0 0 1"])
    write(case["test"], ["img_6.png", "img_7.png"], ["1 0 0", "0 1 0"])
    return ["data.task=multilabel"], "{train}, row 1: multi-hot label of length 2, expected data.num_classes = 3"


def class_count_disagrees(case):
    return [
        "data.num_classes=4"
    ], "config key data.num_classes: 4, but the labels of the train, val and test splits use only 3"


def list_does_not_exist(case):
    case["train"].unlink()
    return [], "config key data.train_list: path does not exist: {train}"


def empty_list(case):
    case["train"].write_text("path,label\n")
    return [], "split list {train} is empty"


def pickle_with_code(case):
    class Payload:
        def __reduce__(self):
            return (print, ("never",))

    case["train"] = case["train"].with_suffix(".pkl")
    case["train"].write_bytes(pickle.dumps([{"img_root": "img_0.png", "label": Payload()}]))
    return [], "split list {train}: not a plain pickle"


@pytest.mark.parametrize(
    "spoil",
    [
        missing_images,
        truncated,
        not_an_image,
        label_out_of_range,
        multi_hot_wrong_length,
        class_count_disagrees,
        list_does_not_exist,
        empty_list,
        pickle_with_code,
    ],
)
def test_bad_input_exits_2_naming_the_problem(tmp_path, capsys, spoil):
    case = make_case(tmp_path)
    extra, expected = spoil(case)
    logs = tmp_path / "logs"
    args = [
        "fit",
        "data.dataset=list",
        "data.num_classes=3",
        "data.class_names=null",
        f"data.root={case['root']}",
        f"data.train_list={case['train']}",
        f"data.val_list={case['test']}",
        f"data.test_list={case['test']}",
        f"trainer.log_dir={logs}",
        *extra,
    ]
    assert diffuser_trainer.main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert expected.format(**case) in errors[0]
    assert not logs.exists(), "nothing may be written before the input is known to be good"


def test_medmnist_offline_error_names_file_folder_and_address(tmp_path, capsys):
    args = [
        "fit",
        "--config",
        str(Path(__file__).resolve().parents[1] / "configs" / "breastmnist.yml"),
        f"data.root={tmp_path / 'medmnist'}",
        "data.download=false",
        f"trainer.log_dir={tmp_path / 'logs'}",
    ]
    assert diffuser_trainer.main(args) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert "breastmnist.npz" in line and str(tmp_path / "medmnist") in line and "zenodo.org" in line
