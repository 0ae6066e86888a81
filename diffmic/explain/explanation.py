"""What guided a prediction: for an image batch and a trained model, the DCG's saliency map, the K ROI boxes with
their gated-attention weights, the final K x K label grid and the guided prior map P (DiffMIC-v2), and the class
scores after every sampling step.

It watches the model's own evaluation of the batch (`evaluate_batch`): the DCG and the encoders run once per image,
with the same start noise (seeding.start_noise, by dataset index), so its scores are, to the last bit, the ones
evaluation computes for the same batch; it only reads what the DCG and the sampler produce.

Notation: B images, C classes, K ROIs (= grid side), (h, w) the CAM, (H, W) the image, N sampling steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dataloader.transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class Explanation:
    """What guided the predictions of an image batch; CPU tensors. `grid`, `prior` and `estimate` are None for
    DiffMIC v1, which denoises the label vector and has no grid."""

    method: str
    title: str  # the method's name, its sampler's and what `trajectory` shows (GuidedSystem.title, ...)
    sampler: str
    step_score: str
    multilabel: bool
    index: torch.Tensor  # (B,) dataset indices
    image: torch.Tensor  # (B, H, W, 3) uint8: the image as the model saw it (normalisation undone)
    label: torch.Tensor | None  # (B,) classes or (B, C) multi-hot; None for images without labels
    scores: torch.Tensor  # (B, C) the scores evaluation writes (v2: mean of the final grid; v1: softmax(y_0))
    cam: torch.Tensor  # (B, C, h, w) the DCG's saliency map S
    boxes: torch.Tensor  # (B, K, 4) ROI boxes (top, left, bottom, right) in image pixels, bottom / right exclusive
    attention: torch.Tensor  # (B, K) the gated-attention weights a of the ROIs, in the order the DCG chose them
    y_global: torch.Tensor  # (B, C) DCG logits
    y_local: torch.Tensor  # (B, C)
    timesteps: list[int]  # t of each sampling step, in the order they run
    trajectory: torch.Tensor  # (B, N, C) class scores after each step (v2: Y_t's cell mean; v1: softmax(y_t))
    estimate: torch.Tensor | None  # (B, N, C) v2: the cell mean of each step's clean-grid estimate x0_hat
    grid: torch.Tensor | None  # (B, C, K, K) v2: the final label grid (mean over diffusion.eval_samples)
    prior: torch.Tensor | None  # (B, C, K, K) v2: the guided prior map P

    def predicted(self) -> torch.Tensor:
        """(B,) the predicted class (multi-label: the highest-scoring finding)."""
        return self.scores.argmax(dim=1)

    def classes_to_show(self, b: int) -> list[tuple[int, str]]:
        """The classes image b's figure explains, each with its role: single-label, the predicted class and the
        true one when known and different; multi-label, every present or predicted finding (score >= 0.5, as the
        predictions CSV), or the highest-scoring one when there is none."""
        scores = self.scores[b]
        if not self.multilabel:
            shown = [(int(scores.argmax()), "predicted")]
            if self.label is not None and int(self.label[b]) != shown[0][0]:
                shown.append((int(self.label[b]), "true"))
            return shown
        present = set() if self.label is None else {int(c) for c in torch.nonzero(self.label[b] >= 0.5).flatten()}
        predicted = {int(c) for c in torch.nonzero(scores >= 0.5).flatten()}
        roles = {"present, predicted": present & predicted, "present": present - predicted}
        roles["predicted"] = predicted - present
        shown = [(c, role) for role, classes in roles.items() for c in classes]
        if not shown:
            return [(int(scores.argmax()), "highest score, none predicted")]
        return sorted(shown, key=lambda item: -float(scores[item[0]]))

    def saliency(self, b: int, c: int) -> torch.Tensor:
        """(H, W): the CAM of class c for image b, upsampled bilinearly to the image."""
        return upsample(self.cam[b : b + 1, c : c + 1], self.image.shape[1:3])[0, 0]


def upsample(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W), bilinear, as a CAM is shown over its image."""
    return F.interpolate(cam.float(), size=tuple(size), mode="bilinear", align_corners=False)


def roi_boxes(corners: torch.Tensor, roi_size: int) -> torch.Tensor:
    """The DCG's upper-left corners (B, K, 2) (row, col) -> boxes (B, K, 4) (top, left, bottom, right), the
    roi_size x roi_size windows that `crop_patches` cut (parts outside the image were filled, not cropped)."""
    return torch.cat([corners, corners + roi_size], dim=-1)


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    """A normalised image batch (B, 3, H, W) -> (B, H, W, 3) uint8."""
    mean = image.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (image * std + mean).clamp(0.0, 1.0)
    return (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


@torch.no_grad()
def explain_batch(system, batch: dict) -> Explanation:
    """What guided `system`'s predictions for `batch` (image, index, label; on the system's device, under the
    precision context evaluation runs in). `system`: a DiffMICv2 or DiffMICv1 in eval mode.

    It is the system's own `evaluate_batch`, watched: a forward hook keeps the DCG's outputs (the DCG runs once, in
    the sampler), the sampler's on_step callback hands each step to the system's `explain_step`, and the scores are the
    ones evaluate_batch returns. Nothing is computed twice, and no number of evaluation changes."""
    guides: list = []
    steps: list[tuple] = []  # (t, ExplainedStep)

    def record(t: int, *outputs: torch.Tensor) -> None:
        steps.append((t, system.explain_step(*outputs)))

    hook = system.dcg.register_forward_hook(lambda module, args, output: guides.append(output))
    try:
        scores = system.evaluate_batch(batch, on_step=record)["scores"]
    finally:
        hook.remove()
    assert len(guides) == 1, f"the DCG ran {len(guides)} times for one batch"
    guide = guides[0]
    final = steps[-1][1]
    estimates = [step.estimate for _, step in steps]
    label = batch.get("label")
    if label is not None and label.dim() == 1 and bool((label < 0).all()):  # unlabelled images (predict --input)
        label = None
    return Explanation(
        method=system.method,
        title=system.title,
        sampler=system.sampler_name,
        step_score=system.step_score_name,
        multilabel=system.cfg["data"]["task"] == "multilabel",
        index=batch["index"].cpu(),
        image=unnormalise(batch["image"].detach().float()).cpu(),
        label=None if label is None else label.cpu(),
        scores=_cpu(scores),
        cam=_cpu(guide.saliency),
        boxes=roi_boxes(guide.corners, system.dcg.roi_size).cpu(),
        attention=_cpu(guide.attention),
        y_global=_cpu(guide.y_global),
        y_local=_cpu(guide.y_local),
        timesteps=[t for t, _ in steps],
        trajectory=torch.stack([step.scores for _, step in steps], dim=1).float().cpu(),
        estimate=None if estimates[0] is None else torch.stack(estimates, dim=1).float().cpu(),
        # the final grids, averaged over the samples as the method's `sample` does
        grid=None if final.grids is None else _cpu(final.grids.mean(dim=0)),
        prior=_cpu(system.explain_prior(guide)),
    )


def _cpu(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().float().cpu()


# ---------------------------------------------------------------------- the pointing game (benchmarks/explain_demo.py)


def cell_boxes(cells: torch.Tensor, cam_hw: tuple[int, int], image_hw: tuple[int, int]) -> torch.Tensor:
    """CAM cells (B, 2) (row, col) -> the image pixels they stand for, (B, 4) (top, left, bottom, right), with the
    DCG's rounding (cell i starts at round(i / h * H))."""
    scale = cells.new_tensor([image_hw[0] / cam_hw[0], image_hw[1] / cam_hw[1]], dtype=torch.float64)
    start = torch.round(cells.double() * scale).long()
    end = torch.round((cells.double() + 1) * scale).long()
    return torch.cat([start, end], dim=-1)


def box_centres(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (top, left, bottom, right) -> (..., 2) (row, col) centres."""
    return (boxes[..., :2] + boxes[..., 2:]).double() / 2


def holds(boxes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Whether each box (..., 4) holds its point (..., 2) (top <= row < bottom, left <= col < right)."""
    points = points.double()
    inside = (boxes[..., :2].double() <= points) & (points < boxes[..., 2:].double())
    return inside.all(dim=-1)


def pointing_hits(
    cam: torch.Tensor,
    boxes: torch.Tensor,
    attention: torch.Tensor,
    classes: torch.Tensor,
    evidence: torch.Tensor,
    image_hw: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """Per image (B,), does the guidance point at the evidence box (B, 4), i.e. hold its centre?
    saliency: the CAM cell where class `classes[b]`'s map peaks (the resolution the DCG has: a cell is 32 px);
    roi_any: at least one of the K ROI boxes; roi_top: the ROI with the largest attention weight."""
    b, _, h, w = cam.shape
    maps = cam[torch.arange(b), classes].flatten(1)  # (B, h * w)
    peak = maps.argmax(dim=1)
    peak_box = cell_boxes(torch.stack([peak // w, peak % w], dim=1), (h, w), image_hw)
    centre = box_centres(evidence)  # (B, 2)
    in_roi = holds(boxes, centre[:, None, :].expand(-1, boxes.shape[1], -1))  # (B, K)
    top = attention.argmax(dim=1)
    return {
        "saliency": holds(peak_box, centre),
        "roi_any": in_roi.any(dim=1),
        "roi_top": in_roi[torch.arange(b), top],
    }
