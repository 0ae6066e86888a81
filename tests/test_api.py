"""The Python API (diffmic/api.py) in this process: a tiny fit returns what metrics.json holds, predict on a list of
image files returns one DataFrame row per file (the columns of predictions.csv), and a user's error is an exception,
not a SystemExit."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import TINY
from PIL import Image

from dataloader.unlabelled import unlabelled_images
from diffmic import api
from diffmic.config import ConfigError, OptionError, load_config

NAMES = ["h_stripes", "v_stripes", "checker", "ring"]  # demo.yml's classes
# one epoch of the tiny demo on the CPU: the plumbing, not the accuracy
ARGS = [*TINY, "trainer.max_epochs=1", "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    overrides = [*ARGS, f"trainer.log_dir={logs}"]
    return logs, overrides, api.fit(overrides=overrides)


@pytest.mark.slow  # the module's fit: a DCG pre-training and one epoch
def test_fit_returns_what_metrics_json_holds(fitted):
    logs, _, result = fitted
    run = logs / "demo" / "version_0"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "config.yaml").is_file()
    assert set(result) == {"checkpoint", "val", "selection", "temperature", "test", "val_history"}
    written = json.loads((run / "metrics.json").read_text())
    assert json.dumps(result, sort_keys=True) == json.dumps(written, sort_keys=True)  # NaN as NaN on both sides
    assert [h["epoch"] for h in result["val_history"]] == [0]


@pytest.mark.slow  # the module's fit: a DCG pre-training and one epoch
def test_validate_from_a_config_dict_reproduces_the_fit(fitted, tmp_path):
    logs, overrides, result = fitted
    cfg = load_config(None, overrides)
    out = tmp_path / "val.json"
    metrics = api.validate(cfg, ckpt="best", out=out)
    assert metrics["val"] == pytest.approx(result["val"], abs=1e-9, nan_ok=True)
    assert json.loads(out.read_text())["val"] == pytest.approx(metrics["val"], abs=1e-12, nan_ok=True)
    assert cfg == load_config(None, overrides), "the caller's config dict is left as it was"


@pytest.mark.slow  # the module's fit: a DCG pre-training and one epoch
def test_predict_on_a_list_of_image_files_gives_one_row_per_file(fitted, tmp_path, monkeypatch):
    logs, overrides, _ = fitted
    rng = np.random.default_rng(0)
    monkeypatch.chdir(tmp_path)  # relative paths are relative to the working directory
    files = []
    for k, size in enumerate([(64, 64), (50, 90), (80, 40)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / f"new_{k}.png")
        files.append(f"new_{k}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    images = [files[0], tmp_path / files[1], "broken.jpg", files[2]]
    frame = api.predict(overrides=overrides, ckpt="best", images=images, write_csv=False)
    head = ["image", *(f"score_{n}" for n in NAMES), "pred", "pred_name", "spread"]
    head += [*(f"prob_{n}" for n in NAMES), "max_prob", "entropy", "agreement", "sample_spread", "status"]
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == head
    assert frame["image"].tolist() == [str(i) for i in images], "one row per file, in order, named as given"
    assert frame["status"].tolist()[:2] == ["ok", "ok"] and frame["status"][2].startswith("unreadable:")
    readable = frame.drop(index=2)
    probs = readable[[f"prob_{n}" for n in NAMES]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5) and (readable["max_prob"] == probs.max(axis=1)).all()
    assert readable["pred_name"].tolist() == [NAMES[p] for p in readable["pred"].astype(int)]
    assert frame.loc[2, [f"score_{n}" for n in NAMES]].isna().all()
    assert not list(logs.glob("demo/version_*/predictions.csv")), "write_csv=False: no CSV"

    # the same call with the overrides as a mapping, writing the CSV: the file holds the frame's values to 6 decimals
    typed = {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in ARGS)}
    out = tmp_path / "pred.csv"
    again = api.predict(overrides={**typed, "trainer.log_dir": logs}, ckpt="best", images=images, out=out)
    pd.testing.assert_frame_equal(again, frame)
    written = pd.read_csv(out)
    numbers = [c for c in head if c not in ("image", "pred", "pred_name", "status")]
    assert np.allclose(written[numbers].to_numpy(float), frame[numbers].to_numpy(float), atol=5e-7, equal_nan=True)
    assert written["status"].tolist() == frame["status"].tolist()
    with pytest.raises(ConfigError, match="an empty list"):
        api.predict(overrides=overrides, ckpt="best", images=[])


def test_a_users_error_is_an_exception_not_an_exit(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    overrides = [*ARGS, f"trainer.log_dir={logs}"]
    with pytest.raises(ConfigError, match="unknown config key optim.lrr"):
        api.fit(overrides=[*overrides, "optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="ckpt is needed by predict"):
        api.predict(overrides=overrides)
    with pytest.raises(ConfigError, match="no best.ckpt"):
        api.test(overrides=overrides, ckpt="best")
    with pytest.raises(ConfigError, match="overrides go with a config file"):
        api.validate(load_config(None, overrides), overrides=["seed=1"], ckpt="best")
    with pytest.raises(ConfigError, match=re.escape("explain_max=0: give a number >= 1, with explain (a folder)")):
        api.predict(overrides=overrides, ckpt="best", explain=tmp_path / "figures", explain_max=0)
    # a config dict is checked as a loaded file is: a bad value, a bad type, an unknown key, a key it lacks filled in
    cfg = load_config(None, overrides)
    for section, key, value, message in [
        ("optim", "lr", -1.0, "optim.lr"),
        ("data", "batch_size", "eight", "data.batch_size"),
        ("optim", "lrr", 0.1, "optim.lrr"),
    ]:
        bad = copy.deepcopy(cfg)
        bad[section][key] = value
        with pytest.raises(ConfigError, match=message):
            api.fit(bad)
    partial = copy.deepcopy(cfg)
    del partial["evaluation"]["temperature"]
    assert api.resolve_config(partial) == cfg
    # a relative path is the working directory's, as an override's is; a key left out takes the repository's default
    relative = copy.deepcopy(cfg)
    relative["data"]["root"] = "images"
    del relative["trainer"]["log_dir"]
    monkeypatch.chdir(tmp_path)
    resolved = api.resolve_config(relative)
    assert resolved["data"]["root"] == str(tmp_path.resolve() / "images")
    assert resolved["trainer"]["log_dir"] == load_config(None, [])["trainer"]["log_dir"]
    assert not logs.exists(), "refused before any work: nothing written"


@pytest.mark.parametrize(
    "call, python, command_line",
    [
        (lambda tmp: api.check_command_options("test", ["a.png"], None, None), "images is for predict, not test", None),
        (
            lambda tmp: api.check_command_options("predict", None, tmp, 0),
            "explain_max=0: give a number >= 1, with explain (a folder)",
            "--explain-max 0: give a number >= 1, with --explain (a folder)",
        ),
        (
            lambda tmp: api.find_checkpoint(load_config(None, [f"trainer.log_dir={tmp}"]), "best"),
            "ckpt='best': no best.ckpt under",
            "--ckpt best: no best.ckpt under",
        ),
        (
            lambda tmp: api.find_checkpoint({}, tmp / "gone.ckpt"),
            "ckpt=",
            "--ckpt ",
        ),
        (lambda tmp: unlabelled_images(tmp, None, None, 32), "images='", "--input /"),
        (lambda tmp: unlabelled_images(tmp / "none", None, None, 32), "images='", "--input /"),
    ],
)
def test_an_option_error_names_the_keyword_in_python_and_the_flag_on_the_command_line(
    tmp_path, call, python, command_line
):
    with pytest.raises(OptionError) as caught:
        call(tmp_path)
    assert str(caught.value).startswith(python)
    assert str(caught.value.on_command_line()).startswith(command_line or "--input is for predict, not test")


def test_the_command_line_names_its_flags(tmp_path, capsys):
    import diffuser_trainer

    assert diffuser_trainer.main(["test", "--input", "x", *ARGS, f"trainer.log_dir={tmp_path / 'logs'}"]) == 2
    assert capsys.readouterr().err.strip().endswith("--input is for predict, not test")
    assert diffuser_trainer.main(["test", *ARGS, f"trainer.log_dir={tmp_path / 'logs'}"]) == 2
    assert "--ckpt is needed by test: a checkpoint path, best or last" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not in OptionError.FLAGS"):
        OptionError("ckpts", None, ": a typo in the code")


def test_an_option_error_pickles_and_quotes_its_value_on_the_command_line(tmp_path):
    import copy
    import pickle

    error = OptionError("images", tmp_path / "a b", ": no such folder or list")
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert (
            type(clone) is OptionError
            and str(clone) == str(error) == f"images='{tmp_path / 'a b'}': no such folder or list"
        )
    assert str(error.on_command_line()) == f"--input '{tmp_path / 'a b'}': no such folder or list"
    assert str(pickle.loads(pickle.dumps(error.on_command_line()))) == str(error.on_command_line())


def test_one_image_file_is_an_input_of_its_own(tmp_path, monkeypatch):
    """`predict --input scan.png`: the image alone, named as given, where it had been read as a CSV list."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(tmp_path / "scan.png")
    images = unlabelled_images("scan.png", None, None, 32)
    assert images.ids == ["scan.png"] and images.paths == [tmp_path / "scan.png"]
    (tmp_path / "folder.png").mkdir()  # a folder with an image's name is still a folder
    with pytest.raises(OptionError, match="no image files"):
        unlabelled_images("folder.png", None, None, 32)
