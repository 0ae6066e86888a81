"""What the tests share: a tiny demo config, a way to run the command line as a user does, test images."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# The demo made small enough for plumbing tests (the full demo has its own test in test_cli.py).
TINY = [
    "data.synthetic.num_train=64",
    "data.synthetic.num_val=32",
    "data.synthetic.num_test=24",
    "data.batch_size=16",
    "dcg.batch_size=16",
    "dcg.epochs=1",
    "model.feature_dim=16",
    "trainer.max_epochs=2",
    "trainer.val_every=1",
]


def cli(
    *args: str, cwd: Path = ROOT, script: str = "diffuser_trainer.py", threads: int | None = None
) -> subprocess.CompletedProcess:
    """Run a script of the project in a fresh process; `threads` caps each process's intra-op threads (several
    processes of one run share 2 cores). Under pytest-xdist the default is one thread: every worker runs a test at
    a time, and processes whose threads outnumber the cores spin against each other (a demo fit took 5x longer)."""
    if threads is None and "PYTEST_XDIST_WORKER" in os.environ:
        threads = 1
    # the CPU, whatever the machine: on a GPU machine `auto` would start CUDA (and NCCL) runs from several pytest
    # workers at once; the CUDA tests name their accelerator themselves
    if not any(a.startswith("trainer.accelerator=") for a in args) and "--help" not in args:
        args = (*args, "trainer.accelerator=cpu")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def start_fit(args: list[str], log: Path) -> subprocess.Popen:
    """`diffuser_trainer.py fit <args>` (on the CPU) started in the background as from a terminal, its log lines
    written to `log`, for a test that signals it. A shell's background job (CI's, `cmd &`) starts with SIGINT ignored,
    and Python then keeps it ignored: the child gets the default a terminal's Ctrl-C meets."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with log.open("w") as handle:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "diffuser_trainer.py"), "fit", *args, "trainer.accelerator=cpu"],
            stdout=subprocess.DEVNULL,
            stderr=handle,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def write_image_lists(folder: Path, count: int, num_classes: int, num_train: int, size: tuple[int, int]) -> None:
    """`folder`/images/case_<k>.png (random RGB of `size` = (height, width)) and the lists train.csv (the first
    `num_train`) and test.csv (the rest), labels k % num_classes: the README's own-data layout."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    for k in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / "images" / f"case_{k}.png")
    ids = [f"case_{k}" for k in range(count)]
    rows = pd.DataFrame({"image_id": ids, "label": [k % num_classes for k in range(count)]})
    rows[:num_train].to_csv(folder / "train.csv", index=False)
    rows[num_train:].to_csv(folder / "test.csv", index=False)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, written here independently of config.py."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def textured_image(width: int = 90, height: int = 70, seed: int = 0) -> Image.Image:
    """Noise, with a flat block and a smooth ramp (where a rounding of the interpolated levels shows)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = (200, 120, 40)
    pixels[height // 2 :, width // 2 :] = np.linspace(0, 255, width - width // 2, dtype=np.uint8)[None, :, None]
    return Image.fromarray(pixels)
