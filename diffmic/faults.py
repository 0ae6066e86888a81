"""Faults a user causes, each ended with one line and nothing lost: a training loss that is no longer finite, two runs
writing one folder, and Ctrl-C (SIGINT) or a scheduler's SIGTERM during a fit.

Exit codes of the command-line entry points (README, "Command line"):
    2    a config or input error, before any work
    3    training diverged (a non-finite loss): the run stopped at that step
    4    the processes of a run could not reach each other within trainer.dist_timeout_s (a machine that never
         joined, a port in use, a process that died)
    5    a file of the run could not be written (no space, a quota, permissions, an I/O error): durable.py
    130  interrupted by SIGINT (Ctrl-C)
    143  interrupted by SIGTERM (a scheduler's pre-emption)
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytorch_lightning as pl
import torch
from filelock import FileLock, Timeout
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from dataloader.lists import ImageUnreadable
from diffmic.config import ConfigError, OptionError
from diffmic.durable import EXIT_WRITE, WriteFailed

logger = logging.getLogger(__name__)
EXIT_CONFIG, EXIT_DIVERGED, EXIT_DISTRIBUTED, EXIT_SIGINT, EXIT_SIGTERM = 2, 3, 4, 130, 143
# what gloo / NCCL say when a peer never came or went away (they raise RuntimeError, not torch's DistError), or when
# NCCL's watchdog aborted the communicator after a collective timed out
_PEER_FAILURES = (
    "timed out",
    "connection closed by peer",
    "connection reset",
    "address already in use",
    "communicator was aborted",
    "watchdog caught collective operation timeout",
    "nccl error",
)
# How torch's NCCL watchdog handles a collective that exceeds the process group's timeout (trainer.dist_timeout_s):
# its default (3) tears the process down with SIGABRT, no Python exception and no exit 4; 2 aborts the communicator
# only, so the collective the process waits in (or its next one) raises, and the run ends with its one line. Set before
# any process group forms (the launcher's child processes inherit it); a value the user set is kept.
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


def prepare_process_group_env() -> None:
    """Put NCCL_ENV in this process's environment (unless set already): first thing in every entry point."""
    for key, value in NCCL_ENV.items():
        os.environ.setdefault(key, value)


class TrainingDiverged(Exception):
    """The training loss was not finite at one step; the message says where, and what to try."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


class RunInterrupted(Exception):
    """A fit stopped by SIGINT or SIGTERM; the message says what was saved and how to resume."""

    def __init__(self, message: str, signal_name: str, rank: int) -> None:
        super().__init__(message)
        self.exit_code = EXIT_SIGTERM if signal_name == "SIGTERM" else EXIT_SIGINT
        self.rank = rank


class DivergenceGuard(Callback):
    """Stops a fit at the first step whose training loss is not finite: no optimiser step with that loss, and no
    checkpoint after it (last.ckpt keeps the last finished epoch). On several processes the decision is taken
    together (the flag is all-reduced), so every process stops at the same step.

    Where the loss lives on the CPU the host reads it at no cost, and the fit stops before the backward pass. On a GPU
    reading it would make the host wait for the device at every step, so the check is deferred (`deferred`, default:
    on CUDA): the step's flag stays on the device, where fused Adam's `found_inf` skips the optimiser step (and every
    later one: the flag is sticky), and it is copied to the host without waiting. The host reads the flag of a step
    `lag` steps later, when the device has long finished it, or at the epoch's end, before a validation and before
    a full checkpoint is written (best.ckpt, weights only, follows a validation), whichever comes first; the error
    names the step where the loss stopped being finite. An optimiser that cannot skip a step on the device (not fused
    Adam) is checked before its step instead. Under 16-mixed the GradScaler sets found_inf itself: it skips the
    non-finite step (its gradients are not finite either) but not the `lag` steps after it.

    The LightningModule may name the config key of its learning rate in `lr_key` (default optim.lr)."""

    def __init__(self, deferred: bool | None = None, lag: int = 2) -> None:
        self.deferred, self.lag = deferred, lag
        self.last_finite: tuple[int, float] | None = None  # (step, loss)
        self._reset()

    def _reset(self) -> None:
        self._flag: torch.Tensor | None = None  # on the device: 1.0 once any loss was not finite
        self._pending: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []  # (step, [flag, loss], copied)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.last_finite = None
        self._reset()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        scale = getattr(getattr(trainer.precision_plugin, "scaler", None), "_scale", None)
        if scale is not None:  # 16-mixed hands the hooks the scaled loss; its scale stays on the device (no sync)
            loss = loss / scale.reshape(())
        bad = (~torch.isfinite(loss)).float()
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            # every process takes the decision of all (a NaN on one poisons every gradient); torch's all-reduce, not
            # Lightning's reduce, whose barrier would make the host wait for the device
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        deferred = loss.device.type == "cuda" if self.deferred is None else self.deferred
        if not deferred:  # the host reads it at no cost: decide now, before backward
            self._pending.append((trainer.global_step, torch.stack((bad, loss)), None))
            self._resolve(trainer, pl_module, upto=None)
            return
        self._flag = bad if self._flag is None else torch.maximum(self._flag, bad)
        values = torch.stack((self._flag, loss))
        if values.device.type == "cuda":
            host = torch.empty(2, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            self._pending.append((trainer.global_step, host, copied))
        else:
            self._pending.append((trainer.global_step, values, None))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._flag is None:
            return
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # under Lightning's wrapper
        if getattr(optimizer, "defaults", {}).get("fused"):
            # fused Adam skips its update (and does not count the step) where found_inf is 1, on the device; under
            # 16-mixed the GradScaler sets its own found_inf, which a non-finite loss's gradients set too
            optimizer.found_inf = self._flag
        else:
            self._resolve(trainer, pl_module, upto=None)

    def _drop_flags(self, trainer: pl.Trainer) -> None:
        # the optimiser outlives the fit (a notebook may step it again): no stale flag may skip its steps
        for optimizer in trainer.optimizers:
            vars(getattr(optimizer, "_optimizer", optimizer)).pop("found_inf", None)
        self._reset()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._drop_flags(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._drop_flags(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        # flags of steps the device finished long ago (lag steps back): waiting on them leaves the last step queued
        self._resolve(trainer, pl_module, upto=trainer.global_step - self.lag)

    def _resolve_all(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self._resolve(trainer, pl_module, upto=None)

    on_train_epoch_end = on_validation_start = on_train_end = _resolve_all

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._resolve(trainer, pl_module, upto=None)  # raising here writes no file

    def _resolve(self, trainer: pl.Trainer, pl_module: pl.LightningModule, upto: int | None) -> None:
        """Read the pending flags of the steps up to `upto` (None: all), in order; raise at the first bad one."""
        while self._pending and (upto is None or self._pending[0][0] <= upto):
            step, values, copied = self._pending.pop(0)
            if copied is not None:
                copied.synchronize()
            bad, loss = values.tolist()
            if bad:
                self._pending.clear()
                raise self._diverged(trainer, pl_module, step)
            self.last_finite = (step, loss)

    def _diverged(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> TrainingDiverged:
        cfg = getattr(pl_module, "cfg", {})
        key = getattr(pl_module, "lr_key", "optim.lr")
        section, name = key.split(".")
        lr = cfg.get(section, {}).get(name, "?")
        precision = cfg.get("trainer", {}).get("precision", "?")
        last = (
            "no finite loss before it"
            if self.last_finite is None
            else (f"last finite loss {self.last_finite[1]:.4g} at step {self.last_finite[0]}")
        )
        return TrainingDiverged(
            f"training diverged: the loss is not finite at step {step} (epoch {trainer.current_epoch}; "
            f"{last}); the checkpoints written before are kept as they were. Try a smaller {key} (now {lr})"
            + ("" if str(precision) == "32-true" else f" or trainer.precision=32-true (now {precision})"),
            trainer.global_rank,
        )


# ---------------------------------------------------------------------------------------------- interrupts


class InterruptGuard(Callback):
    """Ctrl-C stops a run by the next batch at the latest. Python raises KeyboardInterrupt wherever the main thread
    is when SIGINT lands; where that is a __del__ or a garbage-collector callback, Python prints "Exception ignored"
    and goes on, and the fit would run to its end (seen once in the suite: a SIGINT after an epoch's checkpoint did
    nothing). The handler notes the signal too, and the next batch raises it again for Lightning's shutdown. A SIGINT
    that was ignored when the process started (nohup, a background job) is left ignored."""

    def __init__(self) -> None:
        self.pending = False
        self._previous = None

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.pending = True
        raise KeyboardInterrupt

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.pending = False
        main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning ignores SIGINT once it has caught one (its shutdown): then the handler is no longer ours to undo
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None

    def _raise_pending(self, *args: object) -> None:
        if self.pending:
            raise KeyboardInterrupt

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _raise_pending


def resume_command(argv: list[str] | None = None) -> str:
    """The command line of this process with `--ckpt last` in place of any --ckpt it had."""
    argv = list(sys.argv if argv is None else argv)
    words, skip = [], False
    for word in argv[1:]:
        if skip:
            skip = False
            continue
        if word == "--ckpt":
            skip = True
            continue
        if word.startswith("--ckpt="):
            continue
        words.append(word)
    if not words or words[0] != "fit":
        words.insert(0, "fit")
    return " ".join(shlex.quote(w) for w in ["python", argv[0], *words, "--ckpt", "last"])


@contextmanager
def interruptible(trainer: pl.Trainer, what: str, resumable: bool) -> Iterator[None]:
    """Turn Lightning's ends of a fit stopped by SIGINT (its graceful shutdown, then SystemExit(1)) or SIGTERM
    (SIGTERMException at the next batch) into a RunInterrupted that says what was saved and how to go on.
    `resumable`: the fit writes last.ckpt every epoch (the diffusion model's); else it is started again."""
    try:
        yield
    except SystemExit as stop:
        if not trainer.interrupted and not isinstance(stop, SIGTERMException):
            raise
        signal_name = "SIGTERM" if isinstance(stop, SIGTERMException) else "SIGINT"
        finished = trainer.current_epoch  # epochs completed (last.ckpt is written at each epoch's end)
        last = Path(trainer.log_dir or ".") / "checkpoints" / "last.ckpt"
        if resumable and last.is_file():
            saved = f"{last} holds the {finished} finished epoch(s); resume with: {resume_command()}"
        elif resumable:
            saved = "no epoch finished, so nothing to resume: run the same command again"
        else:
            saved = "nothing of it was kept: run the same command again"
        message = f"{what} interrupted by {signal_name}: {saved}"
        raise RunInterrupted(message, signal_name, trainer.global_rank) from None


def _fit_saved(trainer: pl.Trainer) -> str:
    """What a fit's last.ckpt holds and the command that resumes it, as interruptible says it."""
    last = Path(trainer.log_dir or ".") / "checkpoints" / "last.ckpt"
    if last.is_file():
        return f"{last} holds the {trainer.current_epoch} finished epoch(s); resume with: {resume_command()}"
    return "no epoch finished, so nothing to resume: run the same command again"


class _Signalled(BaseException):
    """Raised by signals_end_run's handler: a BaseException, so that no `except Exception` on the way (a reader that
    turns any error into its own message) takes it for an error of its own."""


@contextmanager
def signals_end_run(trainer: pl.Trainer, what: str) -> Iterator[None]:
    """After the training of a fit (its final validation and test, reading the best checkpoint, writing
    metrics.json): SIGINT and SIGTERM end `what` at once with RunInterrupted, the one line of `interruptible` (130 /
    143). Lightning's own handling covers only its passes, and between them a SIGTERM would kill the process without
    a word and a Ctrl-C end in a traceback. Files are written atomically, so what was written stays whole. A signal
    that Python swallowed where it landed (a __del__) ends the run when the block ends. A SIGINT ignored at start
    stays ignored; outside the main thread nothing changes (signal handlers live there)."""
    pending: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        pending.append(signal.Signals(signum).name)
        raise _Signalled

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else [])
    previous = {signum: signal.signal(signum, on_signal) for signum in names}
    try:
        yield
    except _Signalled:
        pass  # said below
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if pending:
        raise RunInterrupted(
            f"{what} interrupted by {pending[0]}: {_fit_saved(trainer)}", pending[0], trainer.global_rank
        )


# ---------------------------------------------------------------------------------------------- one writer


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold the file-system lock `path` (filelock: fcntl on POSIX) while doing `what`; another process that holds
    it is waited for, and the log names it (its pid, host and what it does, from `<path>.owner`). A process that
    dies releases its lock with it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock, owner = FileLock(str(path)), path.with_name(path.name + ".owner")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = owner.read_text().strip() if owner.is_file() else "another process"
        logger.info("waiting for %s, which holds %s", holder, path)
        lock.acquire()
        logger.info("%s released: going on", path)
    try:
        owner.write_text(f"pid {os.getpid()} on {socket.gethostname()} ({what}, since {time.strftime('%H:%M:%S')})")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def launched_as_rank_zero() -> bool:
    """Whether this process is the first of its run, by the variables a launcher sets (Lightning's own launcher,
    torchrun, SLURM, MPI): only it takes the run folder's lock, so that the processes of one run never wait on each
    other for it."""
    env = os.environ
    return all(env.get(k, "0") == "0" for k in RANK_VARIABLES)


# the variables by which Lightning's cluster environments (its own launcher, torchrun, SLURM, MPI) tell a process
# its rank; a process is the run's first when every one that is set is 0
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def run_folder_lock(run_folder: Path, what: str):
    """`exclusive` on <run_folder>/.run.lock for the first process of a run; nothing for the others."""
    return exclusive(run_folder / ".run.lock", what) if launched_as_rank_zero() else nullcontext()


def report_fault(err: TrainingDiverged | RunInterrupted, debug: bool) -> int:
    """The one line of a diverged or interrupted run (said by its first process), and its exit code; `debug` shows
    the traceback instead."""
    if debug:
        raise err
    if err.rank == 0:
        logger.error("%s", err)
    return EXIT_DIVERGED if isinstance(err, TrainingDiverged) else err.exit_code


def exit_code(err: Exception, cfg: dict | None, debug: bool) -> int:
    """The one line and the exit code (the table above) of an error that ends a command-line entry point; `cfg` is
    None when the config itself could not be read. `debug` raises the error again with its traceback instead (a
    config error is always one line), and so does any error that is not one of these."""
    if isinstance(err, ConfigError):
        # a bad option is named by its flag (--ckpt best) here, where the Python API names its keyword (ckpt='best')
        logger.error("config error: %s", err.on_command_line() if isinstance(err, OptionError) else err)
        return EXIT_CONFIG
    if isinstance(err, (TrainingDiverged, RunInterrupted)):
        return report_fault(err, debug)
    if debug:
        raise err
    if isinstance(err, WriteFailed):  # a full disk, a quota, permissions: the previous file kept
        logger.error("%s", err)
        return EXIT_WRITE
    if isinstance(err, ImageUnreadable):  # an image that went away during the run, raised here or in a worker
        logger.error("%s", ImageUnreadable.one_line(err))
        return EXIT_CONFIG
    message = distributed_failure(err, cfg) if cfg is not None else None
    if message is None:
        raise err
    logger.error("%s", message)
    return EXIT_DISTRIBUTED


def distributed_failure(err: BaseException, cfg: dict) -> str | None:
    """The one line for an error of the process group (torch.distributed's DistError, or a gloo / NCCL timeout or
    lost peer), or None for any other error."""
    text = " ".join(str(err).split())
    if not isinstance(err, torch.distributed.DistError) and not (
        isinstance(err, RuntimeError) and any(f in text.lower() for f in _PEER_FAILURES)
    ):
        return None
    t = cfg["trainer"]
    where = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '(Lightning picks one)')}"
    return (
        f"the processes of the run did not reach each other within trainer.dist_timeout_s ({t['dist_timeout_s']} s): "
        f"{text[:300]}. Start the same command on each of the trainer.num_nodes ({t['num_nodes']}) machines with "
        f"its own NODE_RANK, check that {where} (MASTER_ADDR:MASTER_PORT) is reachable from every machine and the port "
        "free, and raise trainer.dist_timeout_s if one process legitimately waits longer (a long DCG pre-training)"
    )
