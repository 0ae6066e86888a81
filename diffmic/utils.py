"""Run set-up shared by the DCG pre-trainer, the diffusion trainer and the benchmarks: the Adam optimiser
and its cosine schedule, the Lightning Trainer with its logger and checkpoints, and log formatting."""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy

from diffmic.checkpoint_io import AtomicCheckpointIO, DiskSpaceCheck
from diffmic.config import load_config
from diffmic.faults import DivergenceGuard, InterruptGuard, exit_code, prepare_process_group_env
from diffmic.precision import apply_float32_policy

logger = logging.getLogger(__name__)


def adam(
    params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0
) -> torch.optim.Adam:
    """torch's Adam; its fused kernel where every parameter lives on the CPU or a CUDA device (the same
    update, about 7x faster per step than the default loop on the CPU: a tenth of a ResNet-18 step). `params`:
    parameters, or parameter groups (dicts with "params" and their own options, e.g. lr or amsgrad)."""
    groups = list(params)
    if not groups or not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    every = [p for g in groups for p in g["params"]]
    fused = bool(every) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in every)
    return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def cosine_schedule(
    optimizer: torch.optim.Optimizer, epochs: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing per epoch from the optimiser's lr down to min_lr_ratio * lr over `epochs`
    (min_lr_ratio 1.0: a constant lr)."""
    lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=lr * min_lr_ratio)


def build_optimizer(
    params, optim: dict, max_epochs: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam with the config's lr / betas / eps / weight decay, and cosine annealing per epoch
    from lr down to min_lr_ratio * lr over max_epochs (SPEC section 7)."""
    optimizer = adam(
        params, lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"], weight_decay=optim["weight_decay"]
    )
    return optimizer, cosine_schedule(optimizer, max_epochs, optim["min_lr_ratio"])


def selection_metric(cfg: dict) -> str:
    """The validation metric that picks the best checkpoint: macro F1, or mean AUROC for multi-label."""
    return "val/auc" if cfg["data"]["task"] == "multilabel" else "val/f1"


class BestCheckpoint(ModelCheckpoint):
    """`best.ckpt`: the highest value of the monitored validation metric; on a tie the later epoch
    replaces the earlier. Macro F1 on a small validation split ties often (78 images: a handful of
    values), and a tie says nothing about which model is better, while the later one has trained
    longer at an annealed learning rate. (Lightning's own rule keeps the first.)"""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        assert self.save_top_k == 1 and self.mode == "max", "BestCheckpoint keeps one checkpoint, highest first"

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is None or not self.best_k_models:
            return super().check_monitor_top_k(trainer, current)
        better_or_tie = bool(current >= self.best_k_models[self.kth_best_model_path])
        return trainer.strategy.reduce_boolean_decision(better_or_tie)


class BestWeights(Callback):
    """The weights of the epoch with the highest monitored validation metric (the later on a tie, as BestCheckpoint),
    kept in memory on every process (`state_dict`, on the CPU): for the DCG pre-training, whose best epoch must reach
    every machine of a run without a shared file system. Every process holds the same gathered metrics, so every
    process keeps the same epoch."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.best_score: float | None = None
        self.state_dict: dict[str, torch.Tensor] | None = None
        self.epoch: int | None = None  # the epoch of state_dict

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[self.monitor])
        if self.best_score is None or score >= self.best_score:
            self.best_score = score
            self.epoch = trainer.current_epoch
            self.state_dict = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}


def progress_refresh_rate(trainer_cfg: dict) -> int:
    """Steps between progress-bar refreshes: every step on the CPU; on a GPU every trainer.log_every_n_steps, the
    steps at which the logger reads the metrics anyway, since each refresh copies the step's loss to the host (a
    synchronisation the GPU would otherwise wait on at every step)."""
    from pytorch_lightning.accelerators import CUDAAccelerator

    gpu = trainer_cfg["accelerator"] in ("gpu", "cuda") or (
        trainer_cfg["accelerator"] == "auto" and CUDAAccelerator.is_available()
    )
    return trainer_cfg["log_every_n_steps"] if gpu else 1


def build_trainer(
    cfg: dict,
    run_name: str,
    max_epochs: int,
    val_every: int,
    version: int | None = None,
    resumable: bool = True,
    best_in_memory: bool = False,
    callbacks: Sequence[Callback] = (),
) -> tuple[pl.Trainer, ModelCheckpoint | BestWeights]:
    """A Trainer logging to <log_dir>/<run_name>/version_N with TensorBoard, a progress bar, the
    learning rate, `best.ckpt` (highest `selection_metric`, the later epoch on a tie; the weights only, what
    evaluation needs) and, when `resumable`, `last.ckpt` (every epoch, with the optimiser state, for resuming); with
    `best_in_memory`, no checkpoint file but BestWeights. A non-finite training loss stops the fit at its step
    (faults.DivergenceGuard), a Ctrl-C by the next batch (faults.InterruptGuard); the processes of a run wait
    trainer.dist_timeout_s for each other. Checkpoints are written atomically (checkpoint_io.AtomicCheckpointIO) after
    a look at the free disk space (checkpoint_io.DiskSpaceCheck). `callbacks`: the caller's, added to these (e.g.
    explain.outputs.ExplainValidation for a fit of a diffusion model)."""
    t = cfg["trainer"]
    ignore_lightning_internal_warnings()
    # before the Trainer exists: Lightning reads the matmul policy when it sets up a CUDA device, and the process
    # group (formed at fit, in this process or the launcher's children) reads the NCCL settings
    apply_float32_policy(t["float32_matmul_precision"])
    prepare_process_group_env()
    if best_in_memory:  # no checkpoint files at all
        best, checkpoints = BestWeights(selection_metric(cfg)), []
    else:
        best = BestCheckpoint(
            monitor=selection_metric(cfg),
            mode="max",
            filename="best",
            save_top_k=1,
            auto_insert_metric_name=False,
            save_weights_only=True,
        )
        checkpoints = [best]
    if resumable and not best_in_memory:
        checkpoints.append(ModelCheckpoint(filename="last", save_top_k=1, save_on_train_epoch_end=True))
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        check_val_every_n_epoch=val_every,
        accelerator=t["accelerator"],
        devices=t["devices"],
        num_nodes=t["num_nodes"],
        strategy=t["strategy"],
        sync_batchnorm=t["sync_batchnorm"],
        precision=t["precision"],
        log_every_n_steps=t["log_every_n_steps"],
        logger=TensorBoardLogger(t["log_dir"], name=run_name, version=version, default_hp_metric=False),
        callbacks=[
            *checkpoints,
            *([best] if best_in_memory else []),
            LearningRateMonitor(logging_interval="epoch"),
            TQDMProgressBar(refresh_rate=progress_refresh_rate(t)),
            DivergenceGuard(),
            InterruptGuard(),
            *([DiskSpaceCheck()] if checkpoints else []),
            *callbacks,
        ],
        # checkpoints written atomically beside their destination, never through the system temp folder
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=not best_in_memory,
        limit_train_batches=t["limit_train_batches"],
        limit_val_batches=t["limit_val_batches"],
        num_sanity_val_steps=0,
        # the DataModule splits the data over processes itself (dataloader/datamodule.py): evaluation by whole
        # batches, so that an image's numbers do not depend on how many processes there are
        use_distributed_sampler=False,
        enable_model_summary=False,
    )
    if isinstance(trainer.strategy, DDPStrategy):
        # how long the processes wait for each other (joining, then every collective): Lightning takes it only as
        # an argument of a DDPStrategy it builds itself from the strategy's name, so it is set on that one
        trainer.strategy._timeout = timedelta(seconds=t["dist_timeout_s"])
    return trainer, best


def ignore_lightning_internal_warnings() -> None:
    """Hide a warning that Lightning raises at every fit, validation and test of any Trainer about its own code, which
    a user can do nothing about: Lightning 2.6's CombinedLoader builds torch's `LeafSpec`, which the torch of
    requirements.txt deprecates (pytorch_lightning/utilities/_pytree.py; a FutureWarning). Only that message from that
    module is hidden."""
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"pytorch_lightning\.utilities\._pytree",
    )


def planned_world_size(cfg: dict) -> int:
    """How many processes the run's Trainer will have (trainer.num_nodes x the devices of each), known before any
    process starts: Lightning's own resolution of trainer.devices (auto, lists) and of a launcher's variables."""
    from diffmic.config import quiet_lightning

    t = cfg["trainer"]
    with quiet_lightning():
        probe = pl.Trainer(
            accelerator=t["accelerator"],
            devices=t["devices"],
            strategy=t["strategy"],
            num_nodes=t["num_nodes"],
            precision=t["precision"],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    return probe.world_size


def log_global_batch(trainer: pl.Trainer, batch_size: int, lr: float, what: str, lr_key: str) -> None:
    """On several processes, say (once) what a training step then is: the global batch and the learning rate, which
    stays the config's (nothing is scaled with the number of processes)."""
    if trainer.world_size > 1 and trainer.is_global_zero:
        logger.info(
            "%s on %d processes (%d machine(s) x %d): global batch %d x %d = %d images a step, learning rate %g "
            "(%s, not scaled with the processes)",
            what,
            trainer.world_size,
            trainer.num_nodes,
            trainer.num_devices,
            trainer.world_size,
            batch_size,
            trainer.world_size * batch_size,
            lr,
            lr_key,
        )


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped log lines on stderr for the command-line entry points."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def config_command(description: str, argv: list[str] | None, work: Callable[[dict], object]) -> int:
    """A command-line entry point that takes a config (--config FILE, key.sub=value overrides, --debug) and runs
    `work(cfg)`: 0 when it returns, else the one line and the documented exit code of its error (faults.exit_code)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config (default: configs/demo.yml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    parser.add_argument("--debug", action="store_true", help="a diverged or interrupted run shows its traceback")
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        work(cfg)
    except Exception as err:  # one line and the documented exit code
        return exit_code(err, cfg, args.debug)
    return 0
