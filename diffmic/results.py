"""What the commands write into a run folder (or to --out): metrics.json, predictions.csv (and its rows as a pandas
DataFrame for the Python API), the reliability and risk-coverage figures, and the resolved config.yaml. Every file is
written atomically (durable.py) and by the first process only (the callers check)."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from diffmic.durable import atomic_open, write_atomically
from diffmic.evaluation.evaluator import uncertainty_figures
from diffmic.evaluation.figures import save
from diffmic.evaluation.uncertainty import SAMPLE_SCORES, apply_temperature, entropy

logger = logging.getLogger(__name__)


def write_json(path: Path, content: dict) -> None:
    """metrics.json, atomically: a reader (or a kill) never meets half a file."""
    write_atomically(path, json.dumps(content, indent=2, allow_nan=True))
    logger.info("wrote %s", path)


@dataclass
class PredictionTable:
    """The rows of predictions.csv with their values as Python objects (str, int, float; None where an unreadable
    image's row is left empty): `columns`, `rows` in index order, the sample scores that are `undefined` (nan: one
    sample per image) and how many images were `unreadable`."""

    columns: list[str]
    rows: list[list[Any]]
    undefined: list[str]
    unreadable: int

    def frame(self) -> pd.DataFrame:
        """The table as a DataFrame, at full precision (the CSV rounds to 6 decimals); empty cells are NaN / None."""
        return pd.DataFrame(self.rows, columns=self.columns)


def prediction_table(
    predictions: dict, dataset, class_names: list[str], multilabel: bool, temperature: float = 1.0
) -> PredictionTable:
    """One row per image, in index order: its id, its label (when the images have labels), one score per class
    (finding), the prediction, the spread of the grid cells, then the probabilities (after `temperature`) and the
    per-image uncertainty: max_prob (single-label), entropy, and the diffusion models' agreement and sample_spread
    over their S samples (`nan` when S = 1: undefined). Multi-label: the label and the prediction are the findings at
    or above 0.5, joined by '|'. Unlabelled images (predict on new images) get a `status` column instead of a label:
    `ok`, or `unreadable: <why>` with the scores left empty. `predictions`: EvaluatedSystem.predictions."""
    labelled = dataset.labels is not None
    sample_scores = [k for k in SAMPLE_SCORES if k in predictions]
    head = ["image"] + (["label"] if labelled else []) + [f"score_{n}" for n in class_names] + ["pred"]
    head += ([] if multilabel else ["pred_name"]) + ["spread"]
    head += [f"prob_{n}" for n in class_names] + ([] if multilabel else ["max_prob"]) + ["entropy", *sample_scores]
    head += [] if labelled else ["status"]
    errors = predictions.get("error", [""] * len(predictions["index"]))
    probs = apply_temperature(predictions["probs"], temperature, multilabel)
    uncertainty = {"entropy": entropy(probs, multilabel), **{k: predictions[k] for k in sample_scores}}
    undefined = [k for k in sample_scores if not np.isfinite(predictions[k]).any()]
    rows, unreadable = [], 0
    columns = (predictions["index"], predictions["scores"], predictions["spread"], predictions["label"], errors)
    for row_index, (i, scores, spread, label, error) in enumerate(zip(*columns, strict=True)):
        row: list[Any] = [dataset.ids[int(i)]]
        if labelled:
            truth = label.tolist()
            row.append(
                "|".join(n for n, y in zip(class_names, truth, strict=True) if y >= 0.5) if multilabel else int(truth)
            )
        if error:
            unreadable += 1
            rows.append(row + [None] * (len(head) - len(row) - 1) + [f"unreadable: {error}"])
            continue
        row += scores.tolist()
        if multilabel:
            row.append("|".join(n for n, s in zip(class_names, scores.tolist(), strict=True) if s >= 0.5))
        else:
            pred = int(scores.argmax())
            row += [pred, class_names[pred]]
        row.append(float(spread))
        p = probs[row_index]
        row += p.tolist() + ([] if multilabel else [float(p.max())])
        row += [float(uncertainty[k][row_index]) for k in ("entropy", *sample_scores)]
        rows.append(row + ([] if labelled else ["ok"]))
    return PredictionTable(head, rows, undefined, unreadable)


def _cell(value: Any) -> Any:
    """A value of the table as predictions.csv writes it: floats with 6 decimals (nan as `nan`), None empty."""
    if value is None:
        return ""
    return f"{value:.6f}" if isinstance(value, float) else value


def write_prediction_table(path: Path, table: PredictionTable) -> None:
    """predictions.csv, atomically: a reader (or a kill) never meets half a file."""
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(table.columns)
        writer.writerows([row[0], *map(_cell, row[1:])] for row in table.rows)  # the id as the data set names it
    logger.info("wrote %s", path)


def log_prediction_notes(table: PredictionTable, where: str) -> None:
    """What a reader of the predictions (`where`: the CSV, or the returned table) should know, said once: the columns
    one sample per image leaves undefined, and the images that could not be read."""
    if table.undefined:
        logger.info(
            "%s: %s undefined (nan): one sample per image (diffusion.eval_samples 1)", where, ", ".join(table.undefined)
        )
    if table.unreadable:
        logger.warning("%d image(s) could not be read: their rows in %s say why", table.unreadable, where)


def write_uncertainty_figures(folder: Path, split: str, system) -> None:
    """The reliability diagram and the risk-coverage curve of the split just evaluated, as PNGs beside its metrics:
    reliability_<split>.png, risk_coverage_<split>.png (single-label)."""
    if "probs" not in system.last_outputs:
        return
    for name, fig in uncertainty_figures(system.last_outputs, system.temperature).items():
        logger.info("wrote %s", save(fig, folder / f"{name}_{split}.png"))


def save_config(cfg: dict, trainer) -> Path:
    """The run folder: every process asks for it (once the processes are connected, Lightning broadcasts the first
    one's answer, a collective call), the first process writes the resolved config there and logs it."""
    log_dir = Path(trainer.log_dir)
    if trainer.is_global_zero:
        log_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(log_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        logger.info("run directory: %s", log_dir)
    return log_dir
