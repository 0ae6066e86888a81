"""Values checked before any work: finite floats, optimiser and schedule ranges, Lightning's trainer
values (judged by Lightning itself, writing nothing), and the kind and readability of input paths."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

from diffmic.config import PROJECT_ROOT, ConfigError, check_paths, check_trainer, load_config

NO_GPU = not (torch.cuda.is_available() or torch.backends.mps.is_available())


def float_keys() -> list[str]:
    """Every float key of default.yml, found here independently of config.py."""

    def walk(tree: dict, prefix: str = "") -> list[str]:
        keys = []
        for key, value in tree.items():
            if isinstance(value, dict):
                keys += walk(value, f"{prefix}{key}.")
            elif isinstance(value, float):
                keys.append(f"{prefix}{key}")
        return keys

    return walk(yaml.safe_load((PROJECT_ROOT / "configs" / "default.yml").read_text()))


def test_default_yml_has_float_keys():
    assert {"optim.lr", "dcg.lr", "diffusion.beta_end", "trainer.limit_val_batches"} <= set(float_keys())


@pytest.mark.parametrize("key", float_keys())
@pytest.mark.parametrize("value", [".nan", "nan", ".inf", "-.inf", "inf", "1e999"])
def test_every_float_key_refuses_nan_and_infinity(key, value):
    with pytest.raises(ConfigError, match=rf"^config key {re.escape(key)}: -?(nan|inf) is not a finite number"):
        load_config(None, [f"{key}={value}"])


def test_nan_in_a_yaml_file_and_in_a_list_is_refused(tmp_path):
    path = tmp_path / "cfg.yml"
    path.write_text("optim:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"^config key optim\.lr: nan is not a finite number"):
        load_config(path)
    with pytest.raises(
        ConfigError, match=r"^config key optim\.betas: \[nan, 0\.9\] holds a value that is not a finite"
    ):
        load_config(None, ["optim.betas=[.nan, 0.9]"])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["optim.lr=-1"], r"config key optim\.lr: must be > 0, got -1\.0"),
        (["optim.lr=0"], r"config key optim\.lr: must be > 0, got 0\.0"),
        (["dcg.lr=-2e-4"], r"config key dcg\.lr: must be > 0, got -0\.0002"),
        (["optim.eps=0"], r"config key optim\.eps: must be > 0, got 0\.0"),
        (["optim.weight_decay=-0.1"], r"config key optim\.weight_decay: must be >= 0, got -0\.1"),
        (["optim.betas=[1.0, 0.999]"], r"config key optim\.betas: must be a list of 2 numbers in \[0, 1\)"),
        (["optim.betas=[-0.1, 0.999]"], r"config key optim\.betas: must be a list of 2 numbers in \[0, 1\)"),
        (["optim.betas=[0.9]"], r"config key optim\.betas: must be a list of 2 numbers in \[0, 1\) .*got \[0\.9\]"),
        (["optim.betas=[a, b]"], r"config key optim\.betas: must be a list of 2 numbers in \[0, 1\)"),
        (["optim.betas=[true, 0.9]"], r"config key optim\.betas: must be a list of 2 numbers in \[0, 1\)"),
        (["diffusion.beta_start=0"], r"config key diffusion\.beta_start: must be in \(0, 1\), got 0\.0"),
        (["diffusion.beta_start=-1e-4"], r"config key diffusion\.beta_start: must be in \(0, 1\)"),
        (["diffusion.beta_end=1e-5"], r"config key diffusion\.beta_end: must be in \[diffusion\.beta_start, 1\)"),
        (["diffusion.beta_end=1.0"], r"config key diffusion\.beta_end: must be in \[diffusion\.beta_start, 1\)"),
        (["diffusion.focal_alpha=-1"], r"config key diffusion\.focal_alpha: must be >= 0"),
        (["diffusion.focal_gamma=-0.5"], r"config key diffusion\.focal_gamma: must be >= 0"),
        (["diffusion.timesteps=0"], r"config key diffusion\.timesteps: must be at least 1, got 0"),
        (["data.num_workers=-1"], r"config key data\.num_workers: must be auto or a number >= 0 .*got -1$"),
        (["trainer.log_every_n_steps=0"], r"config key trainer\.log_every_n_steps: must be at least 1, got 0"),
        (["seed=-1"], r"config key seed: must be in 0\.\.4294967295"),
        (["seed=4294967296"], r"config key seed: must be in 0\.\.4294967295"),
        (["data.batch_size=1"], r"config key data\.batch_size: must be at least 2 .*got 1$"),
        (["data.rotation_degrees=-10"], r"config key data\.rotation_degrees: must be >= 0"),
        (["data.image_size=0"], r"config key data\.image_size: must be a positive multiple of 32 .*got 0$"),
        (["trainer.num_nodes=0"], r"config key trainer\.num_nodes: must be at least 1, got 0"),
        (["trainer.dist_timeout_s=0"], r"config key trainer\.dist_timeout_s: must be > 0 seconds, got 0"),
        (["trainer.dist_timeout_s=-5.5"], r"config key trainer\.dist_timeout_s: must be > 0 seconds, got -5\.5"),
    ],
)
def test_bad_ranges_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match="^" + pattern):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["data.synthetic.num_train=1"], r"config key data\.synthetic\.num_train: must be at least 2"),
        (["data.synthetic.num_test=0"], r"config key data\.synthetic\.num_test: must be at least 1"),
        (["data.synthetic.pattern_size=64"], r"config key data\.synthetic\.pattern_size: must be in 1\.\.data\.image"),
        (["data.synthetic.pattern_size=0"], r"config key data\.synthetic\.pattern_size: must be in 1\.\.data\.image"),
        (
            ["data.num_classes=9", "data.class_names=null"],
            r"config key data\.num_classes: the synthetic demo set has 8",
        ),
    ],
)
def test_bad_synthetic_sizes_are_refused_before_any_image_is_made(overrides, pattern, monkeypatch):
    """The demo set's sizes are rows of config.RULES (when data.dataset is synthetic), its class count the data
    layer's: both are checked before the generator runs."""
    from dataloader import datamodule

    monkeypatch.setattr(datamodule, "SyntheticPatterns", lambda *a, **k: pytest.fail("images made"))
    with pytest.raises(ConfigError, match="^" + pattern):
        datamodule.build_datasets(load_config(None, overrides))


@pytest.mark.parametrize(
    "override",
    [
        "optim.weight_decay=0",
        "optim.betas=[0, 0.5]",
        "diffusion.beta_start=0.02",  # equal to beta_end: a constant schedule
        "diffusion.focal_alpha=0",
        "diffusion.focal_gamma=0",
        "data.num_workers=0",
        "data.batch_size=2",
        "seed=0",
        "seed=4294967295",
        "trainer.log_every_n_steps=1",
    ],
)
def test_boundary_values_pass(override):
    load_config(None, [override])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["trainer.precision=bf16-mixed"], "bf16-mixed"),
        (["trainer.precision=32-true"], "32-true"),
        (["trainer.precision=64-true"], "64-true"),
        (["trainer.precision=32"], 32),  # Lightning's legacy forms keep their type
        (["trainer.precision=bf16"], "bf16"),
        (["trainer.devices=1"], 1),
        (["trainer.devices=auto"], "auto"),
        (["trainer.accelerator=cpu"], "cpu"),
        (["trainer.accelerator=auto"], "auto"),
        (["trainer.accelerator=cpu", "trainer.devices=2"], 2),  # DDP on 2 CPU processes, started only at fit
        (["trainer.accelerator=cpu", "trainer.devices='2'"], "2"),
    ],
)
def test_trainer_values_lightning_accepts_pass_and_keep_their_type(overrides, expected):
    cfg = load_config(None, overrides)
    key = overrides[-1].split("=")[0].split(".")[1]
    assert cfg["trainer"][key] == expected and type(cfg["trainer"][key]) is type(expected)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (
            ["trainer.precision=banana"],
            r"config key trainer\.precision: Lightning refuses 'banana' .*Precision 'banana'",
        ),
        (["trainer.precision=8"], r"config key trainer\.precision: Lightning refuses 8 "),
        (["trainer.devices=two"], r"config key trainer\.devices: Lightning refuses 'two' \(with trainer\.accelerator="),
        (["trainer.devices=0"], r"config key trainer\.devices: Lightning refuses 0 \(with trainer\.accelerator="),
        (["trainer.accelerator=cpu", "trainer.devices=0,1"], r"config key trainer\.devices: Lightning refuses '0,1' "),
        (["trainer.accelerator=cpu", "trainer.devices=-1"], r"config key trainer\.devices: Lightning refuses -1 "),
        (["trainer.devices=[a, b]"], r"config key trainer\.devices: a list must hold device indices"),
        (["trainer.devices=true"], r"config key trainer\.devices: expected int \(like the default 1\)"),
        (["trainer.accelerator=tpu"], r"config key trainer\.accelerator: 'tpu' is not one of"),
        # Lightning knows them, this project refuses them (tests/test_gpu_ready.py: every precision)
        (["trainer.precision=bf16-true"], r"config key trainer\.precision: 'bf16-true' keeps every weight"),
        (["trainer.precision=16-true"], r"config key trainer\.precision: '16-true' keeps every weight"),
    ],
)
def test_trainer_values_lightning_refuses_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match="^" + pattern) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not NO_GPU, reason="a GPU is visible here")
@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_gpu_accelerator_without_a_gpu_is_refused(accelerator):
    with pytest.raises(
        ConfigError,
        match=rf"^config key trainer\.accelerator: {accelerator}, but no GPU is visible on this machine .*"
        r"use trainer\.accelerator=cpu or auto$",
    ):
        load_config(None, [f"trainer.accelerator={accelerator}"])


def test_a_strategy_key_goes_through_lightning_too():
    """No config has trainer.strategy yet; when one does, check_trainer forwards it."""
    cfg = load_config(None, ["trainer.accelerator=cpu", "trainer.devices=2"])
    cfg["trainer"]["strategy"] = "ddp"
    check_trainer(cfg)
    cfg["trainer"]["strategy"] = "banana"
    with pytest.raises(
        ConfigError, match=r"^config key trainer\.strategy: Lightning refuses 'banana' \(with trainer\."
    ):
        check_trainer(cfg)


def _child_pids() -> set[str]:
    tasks = Path(f"/proc/{os.getpid()}/task")
    return {pid for task in tasks.iterdir() for pid in (task / "children").read_text().split()}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc")
def test_check_trainer_writes_nothing_starts_nothing_and_is_quiet(tmp_path, monkeypatch, caplog):
    cfg = load_config(None, ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=16-mixed"])
    monkeypatch.chdir(tmp_path)
    children, environ = _child_pids(), dict(os.environ)
    levels = {name: logging.getLogger(name).level for name in ("pytorch_lightning", "lightning_fabric")}
    with caplog.at_level(logging.INFO):
        start = time.perf_counter()
        check_trainer(cfg)  # DDP on 2 CPU processes, with a precision Lightning replaces on the CPU (warned)
        elapsed = time.perf_counter() - start
    assert list(tmp_path.iterdir()) == [], "check_trainer must not write anything"
    assert _child_pids() == children and multiprocessing.active_children() == []
    assert dict(os.environ) == environ
    assert not caplog.records, "the probe Trainer's device summary is for the run's own Trainer to print"
    assert {name: logging.getLogger(name).level for name in levels} == levels
    assert elapsed < 5.0  # a few milliseconds; generous for a loaded machine
    cfg["trainer"]["accelerator"] = "cpu"
    cfg["trainer"]["devices"] = "two"
    with pytest.raises(ConfigError):
        check_trainer(cfg)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, needle",
    [
        (["optim.lr=-1"], "config key optim.lr: must be > 0, got -1.0"),
        (["optim.lr=.nan"], "config key optim.lr: nan is not a finite number"),
        (["trainer.precision=banana"], "config key trainer.precision: Lightning refuses 'banana'"),
        (["trainer.devices=two"], "config key trainer.devices: Lightning refuses 'two'"),
    ],
)
@pytest.mark.slow
def test_command_line_exits_2_with_one_line_before_writing(tmp_path, capsys, args, needle):
    import diffuser_trainer

    logs = tmp_path / "logs"
    assert diffuser_trainer.main([*args, f"trainer.log_dir={logs}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not logs.exists()


# --- input paths: the right kind, and readable ---------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["model.efficientsam_weights", "model.patch_encoder_weights", "dcg.backbone_weights", "dcg.ckpt"]
)
def test_a_folder_where_a_weights_file_is_expected_is_refused(tmp_path, key):
    folder = tmp_path / "weights"
    folder.mkdir()
    cfg = load_config(None, [f"{key}={folder}"])
    with pytest.raises(ConfigError, match=rf"^config key {re.escape(key)}: expected a file, but .*weights is a folder"):
        check_paths(cfg, need_dcg=True)


def list_config(tmp_path: Path, **paths: Path) -> dict:
    root, lst = tmp_path / "images", tmp_path / "train.csv"
    root.mkdir(exist_ok=True)
    lst.write_text("path,label\n")
    values = {"data.root": root, "data.train_list": lst, "data.test_list": lst} | {
        k.replace("__", "."): v for k, v in paths.items()
    }
    return load_config(None, ["data.dataset=list", *(f"{k}={v}" for k, v in values.items())])


def test_readable_list_inputs_pass(tmp_path):
    check_paths(list_config(tmp_path), need_dcg=False)


@pytest.mark.parametrize("key", ["data.train_list", "data.val_list", "data.test_list"])
def test_a_folder_where_a_list_file_is_expected_is_refused(tmp_path, key):
    folder = tmp_path / "lists"
    folder.mkdir()
    cfg = list_config(tmp_path, **{key.replace(".", "__"): folder})
    with pytest.raises(ConfigError, match=rf"^config key {re.escape(key)}: expected a file, but .*lists is a folder"):
        check_paths(cfg, need_dcg=False)


@pytest.mark.parametrize("dataset", ["list", "medmnist"])
def test_a_file_where_the_data_root_folder_is_expected_is_refused(tmp_path, dataset):
    not_a_folder = tmp_path / "root.txt"
    not_a_folder.write_text("")
    cfg = list_config(tmp_path, data__root=not_a_folder)
    cfg["data"]["dataset"] = dataset
    with pytest.raises(ConfigError, match=r"^config key data\.root: expected a folder, but .*root\.txt is a file"):
        check_paths(cfg, need_dcg=False)


def test_a_missing_medmnist_root_is_left_to_the_download(tmp_path):
    cfg = load_config(None, ["data.dataset=medmnist", "data.flag=retinamnist", f"data.root={tmp_path / 'new'}"])
    check_paths(cfg, need_dcg=False)


def test_weights_files_are_not_loaded(tmp_path):
    junk = tmp_path / "weights.pt"
    junk.write_bytes(b"not a checkpoint")  # the model layer refuses it later, naming the key
    check_paths(load_config(None, [f"model.efficientsam_weights={junk}"]), need_dcg=False)


@pytest.mark.parametrize("key", ["data.train_list", "data.root"])
def test_an_unreadable_input_is_refused(tmp_path, key):
    cfg = list_config(tmp_path)
    path = Path(cfg["data"][key.split(".")[1]])
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: permissions do not stop reading")
        kind = "folder" if key == "data.root" else "file"
        with pytest.raises(ConfigError, match=rf"^config key {re.escape(key)}: {kind} .* is not readable"):
            check_paths(cfg, need_dcg=False)
    finally:
        path.chmod(0o755)


@pytest.mark.parametrize("key, kind", [("data.train_list", "file"), ("data.root", "folder")])
def test_an_input_the_system_denies_is_refused_even_as_root(tmp_path, monkeypatch, key, kind):
    """The same refusal with os.access answering as it does for an ordinary user (root reads anything)."""
    cfg = list_config(tmp_path)
    denied = cfg["data"][key.split(".")[1]]
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: str(p) != denied and real_access(p, mode))
    with pytest.raises(ConfigError, match=rf"^config key {re.escape(key)}: {kind} .* is not readable \(permission"):
        check_paths(cfg, need_dcg=False)


def test_num_nodes_and_the_timeout_reach_lightning(tmp_path):
    from datetime import timedelta

    from diffmic.utils import build_trainer

    cfg = load_config(
        None,
        [f"trainer.log_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=ddp"]
        + ["trainer.num_nodes=2", "trainer.dist_timeout_s=42.5"],
    )
    trainer, _ = build_trainer(cfg, "probe", 1, 1)
    assert trainer.num_nodes == 2 and trainer.world_size == 2
    assert trainer.strategy._timeout == timedelta(seconds=42.5)  # what init_process_group is given
    assert not any(tmp_path.iterdir()), "building a Trainer writes nothing"
