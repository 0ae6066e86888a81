"""The config's checks as data (config.RULES: ranges, choices from the registries, extra types) and the one upgrade
of a config stored by an older version (config.upgrade_config, checkpoints.checkpoint_config)."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import flatten

from diffmic.checkpoints import checkpoint_config
from diffmic.config import (
    ABSENT_MEANT,
    LIGHTNING_KEYS,
    PATH_KEYS,
    PROJECT_ROOT,
    RULES,
    ConfigError,
    choices_of,
    load_config,
    read_run_config,
    upgrade_config,
)
from diffmic.faults import EXIT_CONFIG, exit_code

DEFAULTS = flatten(yaml.safe_load((PROJECT_ROOT / "configs" / "default.yml").read_text()))

# --- the table ----------------------------------------------------------------------------------------------------


def test_every_row_names_keys_of_default_yml():
    for key, rule in RULES.items():
        assert key in DEFAULTS, key
        for bound in (rule.low, rule.high):
            assert not isinstance(bound, str) or bound in DEFAULTS, (key, bound)
        assert rule.when is None or rule.when[0] in DEFAULTS, key
    assert all(f"trainer.{name}" in DEFAULTS for name in LIGHTNING_KEYS)


# keys of default.yml with no row, and why: their constraint is checked elsewhere, or there is none
UNRULED = {
    "name": "free text: the run folder's name",
    "trainer.strategy": "judged by Lightning (check_trainer)",
    "data.flag": "required for medmnist (a cross-key check); any MedMNIST flag the download knows",
    "data.class_names": "a list of data.num_classes names (a cross-key check)",
}


def test_every_constrained_key_has_a_row():
    """Every number, word and list of default.yml has a row (a number without a range is a check forgotten); only
    switches (a bool is all its type says), paths (check_paths) and the keys of UNRULED go without."""
    missing = [
        key
        for key, value in DEFAULTS.items()
        if not isinstance(value, bool) and key not in PATH_KEYS and key not in UNRULED and key not in RULES
    ]
    assert missing == []
    assert set(UNRULED) <= set(DEFAULTS)


def registries() -> dict[str, tuple]:
    from dataloader.medmnist import SIZES
    from diffmic.backbones import TRUNK_WIDTH
    from diffmic.methods import METHODS
    from diffmic.precision import FLOAT32_POLICIES
    from diffmic.v1.model import ENCODERS as V1_ENCODERS
    from diffmic.v2.model import CONDITION_INITS
    from EfficientSAM import ENCODERS
    from pretraining.dcg import BACKBONES

    return {
        "model.method": tuple(METHODS),
        "model.image_encoder": tuple(ENCODERS),
        "model.patch_encoder": tuple(TRUNK_WIDTH),
        "model.condition_init": CONDITION_INITS,
        "dcg.backbone": BACKBONES,
        "v1.encoder": V1_ENCODERS,
        "data.medmnist_size": SIZES,
        "trainer.float32_matmul_precision": FLOAT32_POLICIES,
    }


def test_choices_are_the_registries():
    """A choice row that names a registry takes exactly the names the registry lists, in its order."""
    named = registries()
    assert {key for key, rule in RULES.items() if isinstance(rule.choices, str)} == set(named)
    for key, names in named.items():
        assert choices_of(key) == tuple(names), key
    for key, rule in RULES.items():  # and the literal ones hold their default
        if rule.choices is not None:
            assert DEFAULTS[key] in choices_of(key), key


def bad_values(key: str) -> list[tuple[list[str], object]]:
    """([context overrides], a value the row refuses) for each side of `key`'s row, derived from the row's data."""
    rule, default = RULES[key], DEFAULTS[key]
    context = [f"{rule.when[0]}={rule.when[1]}"] if rule.when else []
    if rule.choices is not None:
        choices = choices_of(key)
        return [(context, max(choices) + 1 if isinstance(choices[0], int) else "bogus")]
    if rule.low is None and rule.high is None and rule.multiple is None:  # extra types only: a bool is never one
        return [(context, True)]
    cfg = flatten(load_config(None, context))
    whole = (isinstance(default, int) and not isinstance(default, bool)) or (
        isinstance(default, str) and int in rule.types
    )
    step = 1 if whole else 0.5
    cases = []
    if rule.low is not None:
        low = cfg[rule.low] if isinstance(rule.low, str) else rule.low
        cases.append(low if rule.open_low else low - step)
    if rule.high is not None:
        high = cfg[rule.high] if isinstance(rule.high, str) else rule.high
        cases.append(high if rule.open_high else high + step)
    if rule.multiple is not None:
        cases += [0, rule.multiple + 1]
    if not whole:
        cases = [float(v) for v in cases]
    if rule.items is not None:  # a list: a value out of range, and a list of another length
        cases = [[v, *[DEFAULTS[key][0]] * (rule.items - 1)] for v in cases] + [[DEFAULTS[key][0]] * (rule.items + 1)]
    if rule.or_count is not None:
        cases.append(rule.or_count - 1)
    cases += ["bogus"] if rule.keywords else []
    return [(context, value) for value in cases]


CASES = [(key, context, value) for key in RULES for context, value in bad_values(key)]


def test_every_row_has_bad_values():
    assert {key for key, _, _ in CASES} == set(RULES)
    for key, rule in RULES.items():  # both sides of a range
        assert sum(k == key for k, _, _ in CASES) >= 1 + (rule.low is not None and rule.high is not None), key


@pytest.mark.parametrize(("key", "context", "value"), CASES, ids=[f"{k}={v!r}" for k, _, v in CASES])
def test_a_bad_value_of_each_row_is_a_config_error_naming_the_key(key, context, value):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*context, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
    message = str(info.value)
    assert re.match(rf"config key {re.escape(key)}: ", message), message
    assert repr(value) in message and "\n" not in message, message  # the bad value, on one line
    assert exit_code(info.value, None, debug=False) == EXIT_CONFIG == 2


def test_a_row_applies_only_when_its_condition_holds():
    load_config(None, ["v1.ema_decay=1.0", "data.synthetic.num_train=1", "data.dataset=medmnist", "data.flag=x"])
    with pytest.raises(ConfigError, match=r"^config key v1\.ema_decay: must be in \[0, 1\), got 1\.0$"):
        load_config(None, ["v1.ema_decay=1.0", "model.method=diffmic_v1"])


# --- stored configs of older versions ------------------------------------------------------------------------------

# The keys of the first version's default.yml (commit 3ce1992): a config stored in its checkpoints, as
# hyper_parameters.config, holds these and no others.
FIRST_VERSION_KEYS = """
name seed data.dataset data.root data.train_list data.val_list data.test_list data.val_fraction data.num_classes
data.class_names data.image_size data.vertical_flip data.rotation_degrees data.batch_size data.num_workers
data.synthetic.num_train data.synthetic.num_val data.synthetic.num_test data.synthetic.pattern_size dcg.ckpt
dcg.num_rois dcg.roi_size dcg.percent_t dcg.backbone_weights dcg.epochs dcg.batch_size dcg.lr model.image_encoder
model.efficientsam_weights model.patch_encoder model.patch_encoder_weights model.feature_dim diffusion.timesteps
diffusion.beta_start diffusion.beta_end diffusion.sampling_steps diffusion.clip_sample diffusion.focal_alpha
diffusion.focal_gamma optim.lr optim.betas optim.eps optim.weight_decay optim.min_lr_ratio trainer.max_epochs
trainer.val_every trainer.log_dir trainer.accelerator trainer.devices trainer.precision trainer.log_every_n_steps
""".split()
SMALL = ["model.feature_dim=16", "data.num_classes=3", "data.class_names=null"]


def nest(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def first_version_config(cfg: dict) -> tuple[dict, dict]:
    """(the config a first-version run of `cfg` stored, what upgrading it must give: `cfg` with every key added
    since at default.yml's value, or at what its absence meant, config.ABSENT_MEANT)."""
    flat = flatten(cfg)
    stored = nest({k: v for k, v in flat.items() if k in FIRST_VERSION_KEYS})
    added = {k: ABSENT_MEANT.get(k, DEFAULTS[k]) for k in DEFAULTS}
    expected = nest({k: flat[k] if k in FIRST_VERSION_KEYS else added[k] for k in DEFAULTS})
    return stored, expected


def upgrade_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "diffmic.config" and "older version" in r.getMessage()]


def test_a_first_version_config_is_upgraded_over_default_yml(caplog):
    cfg = load_config(None, SMALL)
    stored, expected = first_version_config(cfg)
    with caplog.at_level(logging.INFO, logger="diffmic.config"):
        upgraded = upgrade_config(copy.deepcopy(stored), "checkpoint old.ckpt")
    assert upgraded == expected
    assert upgraded["trainer"]["dist_timeout_s"] == 1800 and upgraded["trainer"]["num_nodes"] == 1  # default.yml's
    assert upgraded["dcg"]["backbone"] == "resnet18" and upgraded["model"]["method"] == "diffmic_v2"
    assert upgraded["explain"]["val_images"] == 0  # runs before the TensorBoard explanations drew none
    (line,) = upgrade_logs(caplog)  # one line, naming every key filled in
    added = [k for k in DEFAULTS if k not in FIRST_VERSION_KEYS]
    assert len(added) > 20 and all(f"{k}=" in line for k in added), line
    assert "checkpoint old.ckpt" in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="diffmic.config"):
        assert upgrade_config(copy.deepcopy(upgraded), "checkpoint new.ckpt") == upgraded
    assert upgrade_logs(caplog) == [], "a config of this version has nothing to upgrade"


def test_retired_and_unknown_stored_keys(caplog):
    cfg = load_config(None, SMALL)
    stored = copy.deepcopy(cfg)
    stored["dcg"]["cross_fit_folds"] = 0  # what a run of that era did when it did not cross-fit: today's DCG
    with caplog.at_level(logging.INFO, logger="diffmic.config"):
        assert upgrade_config(stored, "run config c.yaml") == cfg
    assert "dropped dcg.cross_fit_folds" in upgrade_logs(caplog)[0]
    stored["dcg"]["cross_fit_folds"] = 2
    with pytest.raises(ConfigError, match=r"^config key dcg\.cross_fit_folds: run config c\.yaml was trained with 2"):
        upgrade_config(stored, "run config c.yaml")
    newer = copy.deepcopy(cfg)
    newer["model"]["hologram"] = True
    with pytest.raises(ConfigError, match=r"^config key model\.hologram: checkpoint n\.ckpt stores a key this version"):
        upgrade_config(newer, "checkpoint n.ckpt")


def test_a_renamed_key_takes_its_new_name(monkeypatch, caplog):
    """default.yml's history has no rename yet; the mechanism a rename would use, with a made-up old name."""
    from diffmic import config

    monkeypatch.setitem(config.RENAMED_KEYS, "trainer.nodes", "trainer.num_nodes")
    stored = load_config(None, SMALL)
    del stored["trainer"]["num_nodes"]
    stored["trainer"]["nodes"] = 3
    with caplog.at_level(logging.INFO, logger="diffmic.config"):
        assert upgrade_config(stored, "checkpoint r.ckpt")["trainer"]["num_nodes"] == 3
    (line,) = upgrade_logs(caplog)
    assert "renamed trainer.nodes -> trainer.num_nodes" in line and "filled in" not in line


def test_a_checkpoint_stores_its_config_under_either_name_and_is_upgraded_once(caplog):
    cfg = load_config(None, SMALL)
    stored, expected = first_version_config(cfg)
    old = {"state_dict": {}, "hyper_parameters": {"config": stored}}  # the first version's name for it
    with caplog.at_level(logging.INFO, logger="diffmic.config"):
        assert checkpoint_config(old, "old.ckpt") == expected
        assert checkpoint_config(old, "old.ckpt") == expected  # a second reader of the same content
    assert len(upgrade_logs(caplog)) == 1
    assert old["hyper_parameters"] == {"cfg": expected}
    with pytest.raises(ConfigError, match=r"^checkpoint w\.ckpt stores no config"):
        checkpoint_config({"state_dict": {}}, "w.ckpt")


def test_an_old_run_config_yaml_is_upgraded(tmp_path):
    cfg = load_config(None, SMALL)
    stored, expected = first_version_config(cfg)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(stored, sort_keys=False))
    assert read_run_config(path) == expected


def test_a_first_version_checkpoint_loads(tmp_path: Path, caplog):
    """A checkpoint as the first version wrote it (hyper_parameters.config, holding the DCG, none of the later keys)
    loads into the model its config describes, upgraded; the same weights."""
    from diffmic.v2.system import DiffMICv2

    torch.manual_seed(0)
    cfg = load_config(None, SMALL)
    trained = DiffMICv2(cfg)
    stored, expected = first_version_config(cfg)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": {"config": stored}}, path)
    with caplog.at_level(logging.INFO, logger="diffmic.config"):
        system = DiffMICv2.load_from_checkpoint(path)
    assert system.cfg == expected and len(upgrade_logs(caplog)) == 1
    state = system.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())
