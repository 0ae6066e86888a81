"""Several devices, one answer: two CPU processes (DDP over gloo) evaluate a checkpoint exactly as one does, count
every image once, write each file once and draw their own training noise; a run killed with SIGKILL and resumed
from last.ckpt ends with the metrics of the run that was never interrupted."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, ok
from helpers import TINY as DEMO
from helpers import cli as run_cli

from diffmic.seeding import rank_seed, start_noise

# odd-sized validation and test splits: two processes cannot split them evenly
TINY = [*DEMO, "data.synthetic.num_val=33", "data.synthetic.num_test=25", "trainer.accelerator=cpu"]
TWO = ["trainer.devices=2", "trainer.strategy=ddp"]


def cli(*args: str):
    return run_cli(*args, threads=1)  # two processes on two cores


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ddp_logs")
    result = ok(cli("fit", f"trainer.log_dir={logs}", *TINY, *TWO))
    return logs, result.stderr


@pytest.mark.slow
def test_two_processes_fit_once_and_write_each_file_once(ddp_run):
    logs, stderr = ddp_run
    run = logs / "demo"
    # no stray version folders (the run folder's lock, .run.lock, is hidden)
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["dcg", "dcg.pt", "version_0"]
    assert sorted(p.name for p in (run / "dcg").iterdir()) == ["version_0"]
    assert sorted(p.name for p in run.rglob("*.json")) == ["metrics.json"]
    assert sorted(p.name for p in run.rglob("config.yaml")) == ["config.yaml"]
    assert stderr.count("DCG saved to") == 1, "one DCG pre-training, written by one process"
    # every evaluation counts each image once, not DistributedSampler's padding
    counts = {line.split(" images)")[0].rsplit(", ", 1)[1] for line in stderr.splitlines() if " images): " in line}
    assert counts == {"33", "25"}, counts


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, split, extra",
    [
        ("validate", "val", []),
        ("test", "test", []),
        # the uncertainty of several samples, and a temperature fitted on the gathered validation split first
        ("test", "test", ["diffusion.eval_samples=2", "evaluation.temperature=fit"]),
    ],
)
def test_one_and_two_processes_give_identical_metrics(ddp_run, tmp_path, command, split, extra):
    logs, _ = ddp_run
    best = str(logs / "demo" / "version_0" / "checkpoints" / "best.ckpt")
    common = [command, "--ckpt", best, f"trainer.log_dir={tmp_path / 'logs'}", *TINY, *extra]
    ok(cli(*common, "trainer.devices=1", "--out", str(tmp_path / "one" / "m.json")))
    ok(cli(*common, *TWO, "--out", str(tmp_path / "two" / "m.json")))
    one, two = (json.loads((tmp_path / n / "m.json").read_text()) for n in ("one", "two"))
    assert json.dumps(one[split]) == json.dumps(two[split])  # to the last digit (NaN-safe: an absent class's recall)
    assert one["temperature"] == two["temperature"] and (extra or one["temperature"] == 1.0)
    assert {"calib/ece", "calib/brier", "calib/nll", "selective/aurc/max_prob"} <= set(one[split])
    if extra:
        assert all(v == v for k, v in one[split].items() if k.endswith("/agreement")), "defined with 2 samples"
    # the figures are drawn once, beside the metrics
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "m.json",
        f"reliability_{split}.png",
        f"risk_coverage_{split}.png",
    ]


@pytest.mark.slow
def test_predict_on_two_processes_writes_every_row_once(ddp_run, tmp_path):
    logs, _ = ddp_run
    common = ["predict", "--ckpt", str(logs / "demo/version_0/checkpoints/best.ckpt"), *TINY]
    ok(cli(*common, f"trainer.log_dir={tmp_path / 'a'}", "trainer.devices=1", "--out", str(tmp_path / "one.csv")))
    ok(cli(*common, f"trainer.log_dir={tmp_path / 'b'}", *TWO, "--out", str(tmp_path / "two.csv")))
    one, two = (list(csv.DictReader((tmp_path / f"{n}.csv").open())) for n in ("one", "two"))
    assert len(two) == 25 and len({row["image"] for row in two}) == 25
    assert two == one


def test_training_noise_is_per_rank_and_reproducible():
    seeds = [rank_seed(7, rank) for rank in range(4)]
    assert len(set(seeds)) == 4 and seeds == [rank_seed(7, rank) for rank in range(4)]
    assert rank_seed(8, 0) not in seeds
    draws = []
    for seed in seeds[:2]:
        torch.manual_seed(seed)
        draws.append(torch.randint(0, 1000, (4, 3, 3)))
    assert not torch.equal(draws[0], draws[1])


def test_start_noise_depends_on_the_image_not_on_its_batch():
    index = torch.tensor([4, 0, 9])
    noise = start_noise(7, index, (2, 3, 5))
    assert noise.shape == (3, 2, 3, 5)
    torch.testing.assert_close(start_noise(7, torch.tensor([9, 4]), (2, 3, 5)), noise[[2, 0]], rtol=0, atol=0)
    assert not torch.equal(start_noise(8, index, (2, 3, 5)), noise)
    assert not torch.equal(noise[0], noise[1])


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_metrics(tmp_path):
    args = [*TINY, "trainer.max_epochs=3", "trainer.devices=1"]
    ok(cli("fit", f"trainer.log_dir={tmp_path / 'whole'}", *args))
    whole = json.loads((tmp_path / "whole/demo/version_0/metrics.json").read_text())

    logs = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "diffuser_trainer.py"), "fit", f"trainer.log_dir={logs}", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    last = logs / "demo/version_0/checkpoints/last.ckpt"
    deadline = time.monotonic() + 600
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)  # mid-run: after the first epoch's last.ckpt, within the second epoch
    process.wait()
    assert not (logs / "demo/version_0/metrics.json").exists()
    ok(cli("fit", "--ckpt", "last", f"trainer.log_dir={logs}", *args))
    resumed = json.loads((logs / "demo/version_0/metrics.json").read_text())
    for split in ("val", "test"):  # exactly equal (a class absent from a split has a NaN recall in both)
        assert resumed[split] == pytest.approx(whole[split], abs=0, rel=0, nan_ok=True)
    assert resumed["selection"] == whole["selection"]


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 0), (2, 1)])
def test_each_process_of_a_fit_reseeds_with_its_own_seed(world, rank):
    """A fit on one process keeps the seeded stream; on several, process r continues from rank_seed(seed, r)."""
    from types import SimpleNamespace

    from diffmic.config import load_config
    from diffmic.evaluation.evaluator import EvaluatedSystem

    system = EvaluatedSystem(load_config(None, []))
    system._trainer = SimpleNamespace(world_size=world, global_rank=rank)
    torch.manual_seed(123)
    system.on_fit_start()
    assert torch.initial_seed() == (rank_seed(7, rank) if world > 1 else 123)


@pytest.mark.slow
def test_diffmic_v1_trains_on_two_processes_and_evaluates_as_one(tmp_path):
    """v1 with its joint DCG training (one backward for both losses, every parameter used) under DDP, and its
    per-image sampling noise: the test metrics of one and of two processes agree to the last digit."""
    v1 = [*TINY, "model.method=diffmic_v1", "v1.sampling_steps=10", "v1.warmup_epochs=0", "v1.feature_dim=16"]
    logs = tmp_path / "logs"
    ok(cli("fit", f"trainer.log_dir={logs}", *v1, *TWO))
    best = str(logs / "demo" / "version_0" / "checkpoints" / "best.ckpt")
    common = ["test", "--ckpt", best, f"trainer.log_dir={tmp_path / 'eval'}", *v1]
    ok(cli(*common, "trainer.devices=1", "--out", str(tmp_path / "one.json")))
    ok(cli(*common, *TWO, "--out", str(tmp_path / "two.json")))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["test"] for n in ("one", "two"))
    assert json.dumps(one) == json.dumps(two)


# ------------------------------------------------------------------------------------------------ several machines


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(rank: int, logs, port: int, *extra: str) -> subprocess.Popen:
    """One machine of a two-node run on localhost, as a launcher starts it: its NODE_RANK and the first machine's
    address; its own log and DCG folder (`logs`), so the two share no file."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.pop("LOCAL_RANK", None)
    args = ["fit", f"trainer.log_dir={logs}", *TINY, "trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp"]
    log = open(logs.parent / f"node{rank}.log", "w")  # noqa: SIM115 (closed with the process below)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "diffuser_trainer.py"), *args, *extra],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=env,
    )
    process.log = log
    return process


def finish(process: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    code = process.wait(timeout=timeout)
    process.log.close()
    return code, open(process.log.name).read()


@pytest.mark.slow
def test_two_nodes_without_a_shared_file_system(tmp_path):
    import hashlib

    port = free_port()
    folders = [tmp_path / f"machine{rank}" / "logs" for rank in range(2)]
    for folder in folders:
        folder.mkdir(parents=True)
    nodes = [start_node(rank, folders[rank], port) for rank in (1, 0)][::-1]
    (code0, text0), (code1, text1) = finish(nodes[0]), finish(nodes[1])
    assert (code0, code1) == (0, 0), (text0[-3000:], text1[-3000:])
    first, second = (folder / "demo" for folder in folders)
    # the DCG was pre-trained once, by both machines together, and each has its own file of the same bytes
    assert (text0 + text1).count("DCG saved to") == 1 and "DCG file of the first process copied to" in text1
    digests = {hashlib.sha256((run / "dcg.pt").read_bytes()).hexdigest() for run in (first, second)}
    assert len(digests) == 1
    # the run's files are the first machine's alone
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("metrics.json")] == [
        "machine0/logs/demo/version_0/metrics.json"
    ]
    assert not list(second.rglob("*.ckpt")) and not list(second.rglob("config.yaml"))
    # every image once, on two processes: the split sizes of TINY
    counts = {line.split(" images)")[0].rsplit(", ", 1)[1] for line in text0.splitlines() if " images): " in line}
    assert counts == {"33", "25"}, counts
    # the best checkpoint validated on one process, on the first machine alone, gives the fit's numbers
    fitted = json.loads((first / "version_0" / "metrics.json").read_text())
    ok(
        cli(
            "validate",
            "--ckpt",
            fitted["checkpoint"],
            f"trainer.log_dir={folders[0]}",
            *TINY,
            "--out",
            str(tmp_path / "one.json"),
        )
    )
    one = json.loads((tmp_path / "one.json").read_text())["val"]
    assert json.dumps(one) == json.dumps(fitted["val"])


@pytest.mark.slow
def test_a_node_that_never_joins_ends_the_other_within_the_timeout(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    start = time.monotonic()
    code, text = finish(start_node(0, logs, free_port(), "trainer.dist_timeout_s=10"), timeout=300)
    assert code == 4, text[-3000:]
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "did not reach each other within trainer.dist_timeout_s (10 s)" in errors[0], errors
    assert "Traceback" not in text
    assert time.monotonic() - start < 240  # the timeout, not hours
