"""The demo as the README runs it (the longest test, in a file of its own so that pytest-xdist runs it beside the
others rather than after test_cli.py's), and what a fit prints."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from helpers import TINY, cli, ok

from diffmic.checkpoints import read_checkpoint

pytestmark = pytest.mark.slow  # trains, or runs the command line or several processes


def test_demo_default_command_reaches_accuracy(tmp_path):
    """`python diffuser_trainer.py` exactly as in the README (only the log folder moved)."""
    result = ok(cli(f"trainer.log_dir={tmp_path}", cwd=tmp_path))
    metrics = json.loads((tmp_path / "demo" / "version_0" / "metrics.json").read_text())
    assert metrics["test"]["acc"] >= 0.8, metrics
    assert_clean_output(result, tmp_path / "demo" / "version_0")


def assert_clean_output(result: subprocess.CompletedProcess, run_dir: Path) -> None:
    """What a user reads of a fit: no warning of a third party (Python's warnings print `<file>.py:<line>: `), no
    Lightning note that callbacks override the Trainer's, the note that selective prediction by the sample scores
    is undefined (one sample per image) once at most, and the final validations and the test named by the epoch of
    the weights they evaluate."""
    output = result.stdout + result.stderr
    warnings = sorted({m.group(0) for m in re.finditer(r"\S+\.py:\d+: .{0,100}", output)})
    assert not warnings, warnings
    assert "Warning:" not in output, output[output.index("Warning:") - 300 :][:600]
    assert "override existing callbacks" not in output
    assert output.count("selective prediction by") <= 1, output.count("selective prediction by")
    # the DCG's final validation (of its best epoch, kept in memory) names one of the epochs it validated
    dcg = re.findall(r"INFO \S+: val \(epoch (\d+), ", output[: output.index("DCG: validation")])
    assert dcg[-1] in dcg[:-1], dcg
    best = read_checkpoint(run_dir / "checkpoints" / "best.ckpt")["epoch"]
    final = output[output.index("training finished: validating and testing") :]
    epochs = re.findall(r"INFO \S+: (val|test) \(epoch (\d+), \d+ images\)", final)
    assert epochs == [("val", str(best)), ("test", str(best))], (best, epochs)


def test_a_fit_says_what_it_did_without_third_party_noise(tmp_path):
    """A demo fit made tiny (its four batches per epoch under a logging interval of 2 steps: a larger one makes
    Lightning warn that it exceeds an epoch's steps). The old output had a LeafSpec FutureWarning at every stage, the
    module-in-eval-mode warning, the callback-override note at the final validation and test, the undefined note
    at every validation, and the final validation said 'epoch 2' (the trainer's epoch after the fit) for the
    checkpoint of epoch 0 or 1 (the DCG's: 'epoch 1' for its only epoch, 0)."""
    result = ok(cli("fit", f"trainer.log_dir={tmp_path}", *TINY, "trainer.log_every_n_steps=2", cwd=tmp_path))
    assert "selective prediction by ['agreement', 'sample_spread'] is undefined" in result.stderr  # eval_samples 1
    assert_clean_output(result, tmp_path / "demo" / "version_0")
