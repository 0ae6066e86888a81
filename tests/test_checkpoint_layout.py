"""Checkpoints written before the move into the `diffmic` package load after it: the state-dict keys and shapes of
both methods, as commit 7a4e930 (the last one before the move) built them from the demo config, are today's, and a
checkpoint in that layout loads with its tensors where they were."""

import json
from pathlib import Path

import pytest
import torch

from diffmic.config import load_config
from diffmic.methods import METHODS, build_system

FIXTURE = Path(__file__).parent / "fixtures" / "state_dict_keys_7a4e930.json"
OVERRIDES = {
    "diffmic_v2": ["dcg.backbone_weights=null", "model.patch_encoder_weights=null"],
    "diffmic_v1": ["dcg.backbone_weights=null"],
}


def config(method: str) -> dict:
    return load_config(None, [f"model.method={method}", *OVERRIDES[method]])


@pytest.fixture(scope="module")
def old_layout() -> dict[str, dict[str, list[int]]]:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_state_dict_layout_is_the_one_before_the_move(method, old_layout):
    now = {k: list(v.shape) for k, v in build_system(config(method)).state_dict().items()}
    assert now == old_layout[method]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_checkpoint_in_the_old_layout_loads_with_its_tensors(method, old_layout, tmp_path):
    generator = torch.Generator().manual_seed(0)
    current = build_system(config(method)).state_dict()
    # tensors in the old layout, each of the dtype today's model holds there (integer counters stay integers)
    state = {
        key: torch.randn(shape, generator=generator).to(current[key].dtype) for key, shape in old_layout[method].items()
    }
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"config": config(method)}}, path)
    system = METHODS[method].load_from_checkpoint(path)
    loaded = system.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
