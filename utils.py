"""The counterpart of the authors' utils.py at the repository root: the run set-up helpers (optimiser and its
schedule, the Lightning Trainer, logging), for scripts run from a checkout. The library keeps them in
`diffmic.utils`; this file only names them (it is not installed)."""

from diffmic.utils import (
    adam,
    build_optimizer,
    build_trainer,
    cosine_schedule,
    log_global_batch,
    planned_world_size,
    selection_metric,
    setup_logging,
)

__all__ = [
    "adam",
    "build_optimizer",
    "build_trainer",
    "cosine_schedule",
    "log_global_batch",
    "planned_world_size",
    "selection_metric",
    "setup_logging",
]
