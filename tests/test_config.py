"""Config loading: merge over defaults, overrides, types, paths, errors that name the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from helpers import flatten

from diffmic.config import (
    PATH_KEYS,
    PROJECT_ROOT,
    ConfigError,
    check_paths,
    dcg_ckpt_path,
    load_config,
    parse_args_with_overrides,
)


def write(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(content))
    return path


def read_yaml(name: str) -> dict:
    return flatten(yaml.safe_load((PROJECT_ROOT / "configs" / name).read_text()))


def test_demo_is_the_default_and_merges_over_defaults():
    cfg = flatten(load_config())
    assert cfg["name"] == "demo" and cfg["data.dataset"] == "synthetic"
    default, demo = read_yaml("default.yml"), read_yaml("demo.yml")
    assert cfg.keys() == default.keys()
    for key, value in cfg.items():
        if key in PATH_KEYS and isinstance(value, str):
            continue  # made absolute: test_default_paths_do_not_depend_on_the_shell
        # demo.yml's own value where it sets the key, default.yml's everywhere else
        assert value == demo.get(key, default[key]), key
    assert set(default) - set(demo)  # some keys do come from default.yml only


def test_every_config_key_has_a_default(tmp_path):
    default = yaml.safe_load((PROJECT_ROOT / "configs" / "default.yml").read_text())
    paths = sorted((PROJECT_ROOT / "configs").glob("*.yml"))
    assert len(paths) > 1
    for path in paths:
        assert set(read_yaml(path.name)) <= set(flatten(default)), path.name
        load_config(path)
    # and load_config refuses a file with a key default.yml lacks, naming the key
    with pytest.raises(ConfigError, match=r"unknown config key data\.nonsense"):
        load_config(write(tmp_path, {"data": {"nonsense": 1}}))
    assert default["model"]["feature_dim"] == 6144 and default["dcg"]["num_rois"] == 6  # paper defaults


def test_overrides_parse_types():
    cfg = load_config(
        None,
        [
            "optim.lr=1e-3",
            "trainer.max_epochs=3",
            "data.vertical_flip=true",
            "optim.betas=[0.5, 0.9]",
            "trainer.devices=1",
            "data.class_names=null",
        ],
    )
    assert cfg["optim"]["lr"] == 1e-3 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["trainer"]["max_epochs"] == 3 and cfg["data"]["vertical_flip"] is True
    assert cfg["optim"]["betas"] == [0.5, 0.9] and cfg["trainer"]["devices"] == 1
    assert cfg["data"]["class_names"] is None


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.learning_rate=1", "unknown config key optim.learning_rate"),
        ("lr=1", "did you mean dcg.lr or encoder_pretraining.lr or optim.lr"),
        ("trainer.max_epochs=1.5", "trainer.max_epochs"),
        ("data.vertical_flip=1", "data.vertical_flip"),
        ("data.dataset=imagenet", "data.dataset"),
        ("data.image_size=100", "data.image_size"),
        ("data.class_names=[a, b]", "data.class_names"),
        ("diffusion.sampling_steps=0", "diffusion.sampling_steps"),
        ("no_equals_sign", "key.sub=value"),
        ("data.task=multi", "data.task"),
        ("data.medmnist_size=32", "data.medmnist_size"),
        ("data.verify_images=maybe", "data.verify_images"),
        ("data.dataset=medmnist", "data.flag"),
        ("data.task=multilabel", "data.task"),  # the demo set is multiclass
        ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches"),
        ("trainer.limit_val_batches=0", "trainer.limit_val_batches"),
        ("dcg.min_lr_ratio=1.5", "dcg.min_lr_ratio"),
        ("optim.min_lr_ratio=-0.1", "optim.min_lr_ratio"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_paths_in_yaml_are_relative_to_the_repository(tmp_path):
    cfg = load_config(write(tmp_path, {"data": {"root": "some/images"}}))
    assert cfg["data"]["root"] == str(PROJECT_ROOT / "some" / "images")


def test_default_paths_do_not_depend_on_the_shell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config()["trainer"]["log_dir"] == str(PROJECT_ROOT / "logs")


def test_paths_on_the_command_line_are_relative_to_the_shell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.root=images", "dcg.backbone_weights=imagenet"])
    assert cfg["data"]["root"] == str(tmp_path / "images")
    assert cfg["dcg"]["backbone_weights"] == "imagenet"  # a keyword, not a path


def test_missing_inputs_are_reported(tmp_path):
    cfg = load_config(None, [f"model.efficientsam_weights={tmp_path / 'nope.pt'}"])
    with pytest.raises(ConfigError, match="model.efficientsam_weights.*nope.pt"):
        check_paths(cfg, need_dcg=False)
    cfg = load_config(None, [f"dcg.ckpt={tmp_path / 'dcg.pt'}"])
    check_paths(cfg, need_dcg=False)  # fit pre-trains a missing DCG
    with pytest.raises(ConfigError, match="dcg.ckpt"):
        check_paths(cfg, need_dcg=True)


def test_default_dcg_path_is_inside_the_run_folder(tmp_path):
    cfg = load_config(None, [f"trainer.log_dir={tmp_path}"])
    assert dcg_ckpt_path(cfg) == tmp_path / "demo" / "dcg.pt"


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="broken.yml"):
        load_config(path)


def test_batch_limits_keep_their_type():
    cfg = load_config(None, ["trainer.limit_train_batches=3", "trainer.limit_val_batches=0.5"])
    assert cfg["trainer"]["limit_train_batches"] == 3 and isinstance(cfg["trainer"]["limit_train_batches"], int)
    assert cfg["trainer"]["limit_val_batches"] == 0.5


# classes of each task's data set: ISIC 2018 Task 3, APTOS DR grades, placental maturity grades,
# ChestX-ray14 findings, RetinaMNIST grades, BreastMNIST
@pytest.mark.parametrize(
    "name, num_classes",
    [("isic", 7), ("aptos", 5), ("placental", 4), ("chest", 14), ("retinamnist", 5), ("breastmnist", 2)],
)
def test_task_configs_load_with_the_papers_settings(name, num_classes):
    cfg = load_config(PROJECT_ROOT / "configs" / f"{name}.yml")
    assert cfg["name"] == name and cfg["data"]["image_size"] == 224 and cfg["model"]["feature_dim"] == 6144
    assert cfg["diffusion"]["timesteps"] == 1000 and cfg["diffusion"]["sampling_steps"] == 10
    assert cfg["optim"]["lr"] == 1e-3 and cfg["data"]["batch_size"] == 64
    assert cfg["data"]["num_classes"] == num_classes
    assert cfg["data"]["class_names"] is not None and len(cfg["data"]["class_names"]) == num_classes
    chest = name == "chest"
    assert cfg["data"]["task"] == ("multilabel" if chest else "multiclass")
    assert (cfg["dcg"]["num_rois"], cfg["dcg"]["roi_size"]) == ((4, 112) if chest else (6, 32))
    assert cfg["trainer"]["max_epochs"] == (100 if chest else 1000) and cfg["dcg"]["epochs"] == (20 if chest else 100)
    assert cfg["data"]["vertical_flip"] == (name in ("aptos", "retinamnist"))


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "c.yml", "--seeds", "3", "4", "trainer.log_dir=/tmp/x", "seed=5"],  # the usage line's order
        ["trainer.log_dir=/tmp/x", "--config", "c.yml", "seed=5", "--seeds", "3", "4"],
        ["--seeds", "3", "4", "trainer.log_dir=/tmp/x", "--config", "c.yml", "seed=5"],
    ],
)
def test_overrides_may_follow_an_option_that_takes_several_values(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*")
    args = parse_args_with_overrides(parser, argv)
    assert args.config == "c.yml" and args.seeds == [3, 4]
    assert args.overrides == ["trainer.log_dir=/tmp/x", "seed=5"]
    with pytest.raises(ConfigError, match="must look like key.sub=value"):  # a stray word still fails, by name
        load_config(None, parse_args_with_overrides(parser, ["--config", "c.yml", "stray"]).overrides)
