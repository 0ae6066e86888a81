"""The demo as the README runs it: the longest test, in a file of its own so that pytest-xdist runs it beside the
others rather than after test_cli.py's."""

from __future__ import annotations

import json

from helpers import cli, ok


def test_demo_default_command_reaches_accuracy(tmp_path):
    """`python diffuser_trainer.py` exactly as in the README (only the log folder moved)."""
    ok(cli(f"trainer.log_dir={tmp_path}", cwd=tmp_path))
    metrics = json.loads((tmp_path / "demo" / "version_0" / "metrics.json").read_text())
    assert metrics["test"]["acc"] >= 0.8, metrics
