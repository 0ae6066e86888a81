"""Cross-fitted DCG priors [ours, opt-in: dcg.cross_fit_folds >= 2].

SPEC 2 trains the denoiser on the images its DCG was pre-trained on. A DCG that fits those images
(BreastMNIST: 0.98 training accuracy against 0.91 on validation, benchmarks/results) hands the denoiser a
prior that is right on nearly every training image, so it learns to copy the prior (stacking on in-sample
predictions). With k folds, k DCGs are trained, member j on the training split without fold j; while the
denoiser trains, each image's prior comes from the member that never saw it (out-of-fold). At evaluation
the S samples per image are shared out over the members (sample s is guided by member s mod k), so the
final grid averages the k priors' refinements. The same k DCG trainings on (k-1)/k of the data each.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pretraining.dcg import DCG, DCGOutput, build_dcg


def assign_folds(labels: np.ndarray, num_folds: int, seed: int) -> np.ndarray:
    """Fold id of every training image, (N,) int64: a seeded shuffle, stratified by class when
    single-label (each class is dealt out over the folds in turn), so fold sizes differ by at most one
    per class. Multi-label labels (N, C) are dealt out without stratification."""
    labels = np.asarray(labels)
    assert num_folds >= 2, f"cross-fitting needs at least 2 folds, got {num_folds}"
    assert len(labels) >= num_folds, f"{len(labels)} training images cannot fill {num_folds} folds"
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    if labels.ndim == 1:  # stable sort by class keeps the shuffled order within each class
        order = order[np.argsort(labels[order], kind="stable")]
    folds = np.empty(len(labels), dtype=np.int64)
    folds[order] = np.arange(len(labels)) % num_folds
    return folds


class CrossFitDCG(nn.Module):
    """k DCG members and the fold of every training image (`fold_of`, set by `set_folds`).

    out_of_fold(image, index): each image's output from the member that did not train on it.
    each(image): the outputs of all members (evaluation). forward(image): the members' mean logits, as a
    DCG-like prediction of the ensemble prior; its patches, attention and saliency are member 0's."""

    def __init__(self, members: list[DCG]) -> None:
        super().__init__()
        assert len(members) >= 2, "a cross-fitted DCG needs at least 2 members"
        self.members = nn.ModuleList(members)
        # not saved in checkpoints: recomputed from the training labels and the seed (assign_folds)
        self.register_buffer("fold_of", torch.empty(0, dtype=torch.long), persistent=False)

    @property
    def num_folds(self) -> int:
        return len(self.members)

    def set_folds(self, folds: np.ndarray | torch.Tensor) -> None:
        folds = torch.as_tensor(folds, dtype=torch.long, device=self.fold_of.device)
        assert folds.dim() == 1 and int(folds.min()) >= 0 and int(folds.max()) < self.num_folds, \
            f"fold ids must be a vector in 0..{self.num_folds - 1}"
        self.fold_of = folds

    def out_of_fold(self, image: torch.Tensor, index: torch.Tensor) -> DCGOutput:
        """(B, 3, H, W) images with their training-set indices -> one DCGOutput, row b from member fold_of[index[b]]."""
        n = self.fold_of.numel()
        assert n > 0, "set_folds() first: the fold of every training image is unknown"
        fold = self.fold_of[index.to(self.fold_of.device).clamp(0, n - 1)]  # checked below, with the sizes
        order = torch.argsort(fold)  # the batch's rows grouped by member
        # one host sync per step: the members' row counts (to split the batch) and the largest index (the check)
        *sizes, largest = torch.cat([torch.bincount(fold, minlength=self.num_folds),
                                     index.max().view(1).to(fold.device)]).tolist()
        assert largest < n, f"image index {largest} is outside the {n} training images the folds cover"
        outs = [member(image[rows]) for member, rows, size in zip(self.members, order.split(sizes), sizes) if size]
        merged = [torch.cat(fields) for fields in zip(*outs)]  # row i belongs to batch row order[i]
        return DCGOutput(*[torch.empty_like(field).index_copy_(0, order, field) for field in merged])

    def each(self, image: torch.Tensor) -> list[DCGOutput]:
        return [member(image) for member in self.members]

    def forward(self, image: torch.Tensor) -> DCGOutput:
        outs = self.each(image)
        mean = lambda name: torch.stack([getattr(o, name) for o in outs]).mean(0)  # noqa: E731
        return outs[0]._replace(y_fusion=mean("y_fusion"), y_global=mean("y_global"), y_local=mean("y_local"))

    @property
    def local_trunk(self) -> nn.Module:
        """Member 0's local ResNet-18: what model.patch_encoder_weights: dcg copies."""
        return self.members[0].local_trunk


def build_guide(cfg: dict) -> DCG | CrossFitDCG:
    """The guidance model of a config: one DCG (SPEC), or k cross-fitted members (dcg.cross_fit_folds)."""
    k = cfg["dcg"]["cross_fit_folds"]
    return CrossFitDCG([build_dcg(cfg) for _ in range(k)]) if k >= 2 else build_dcg(cfg)


def guide_outputs(guide: DCG | CrossFitDCG, image: torch.Tensor) -> list[DCGOutput]:
    """The DCG output(s) that guide sampling: one for a DCG, one per member for a CrossFitDCG."""
    return guide.each(image) if isinstance(guide, CrossFitDCG) else [guide(image)]
