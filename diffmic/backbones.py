"""CNN trunks from torchvision (ResNet / DenseNet) with their classifier removed, and their weights:
none (random init), ImageNet through torchvision's weight API, or a local state-dict file. ImageNet
weights that cannot be fetched refuse the run before any work (config.check_imagenet_weights) unless
the config opts into random init (imagenet_fallback: true): then the loaders below warn loudly."""

from __future__ import annotations

import logging
import pickle
import urllib.error
import urllib.parse
from pathlib import Path

import torch
import torchvision
from torch import nn

logger = logging.getLogger(__name__)

# name -> width of the pooled feature vector
TRUNK_WIDTH = {"resnet18": 512, "resnet50": 2048, "densenet121": 1024, "densenet169": 1664}


def _features(model: nn.Module, name: str) -> nn.Sequential:
    """The model without pooling and classifier; (B, 3, H, W) -> (B, width, H/32, W/32)."""
    if name.startswith("resnet"):
        return nn.Sequential(*list(model.children())[:-2])
    # DenseNet's features end on a BatchNorm; torchvision applies the ReLU before pooling
    return nn.Sequential(model.features, nn.ReLU(inplace=False))


def _imagenet_state(name: str, key: str, tag: str = "DEFAULT") -> dict | None:
    """torchvision's ImageNet weights `tag` (DEFAULT, IMAGENET1K_V1, ...), or None (random init, warned) when they
    cannot be fetched."""
    try:
        return torchvision.models.get_model(name, weights=tag).state_dict()
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        logger.warning(
            "%s = imagenet: cannot fetch the ImageNet weights of %s (%s: %s). STARTING FROM RANDOM INIT; "
            "results will fall short of pretrained ones. Offline, put torchvision's file in %s or point %s "
            "to a local state-dict file.",
            key,
            name,
            err.__class__.__name__,
            err,
            cache,
            key,
        )
        return None


def imagenet_file(name: str, tag: str = "DEFAULT") -> Path:
    """The file of torchvision's ImageNet weights `tag` of `name` in torch's cache (<torch hub dir>/checkpoints),
    fetched there (hash-checked) when missing. Raises what the fetch raises offline: OSError (URLError is one) or
    RuntimeError."""
    weights = torchvision.models.get_model_weights(name)[tag]
    path = imagenet_cache_path(weights.url)
    if not path.is_file():
        weights.get_state_dict(progress=False, check_hash=True)  # downloads beside its destination, then renames
    return path


def imagenet_cache_path(url: str) -> Path:
    """Where torch's cache keeps the weights file of `url` (what torchvision looks up before any download)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name


class Trunk(nn.Module):
    """A torchvision CNN without its classifier, built with random weights."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in TRUNK_WIDTH:
            raise ValueError(f"unknown backbone {name!r}; use one of {', '.join(TRUNK_WIDTH)}")
        self.name, self.width = name, TRUNK_WIDTH[name]
        self.features = _features(torchvision.models.get_model(name, weights=None), name)

    def load_weights(self, weights: str | None, key: str, imagenet: str = "DEFAULT") -> None:
        """Keep random init (None), load ImageNet ("imagenet": torchvision's weights `imagenet`), or load a local
        state-dict file of the full torchvision model; `key` is the config key named in the logs. A file that does
        not fit raises ValueError."""
        if weights is None:
            logger.info("%s (%s): random init", self.name, key)
            return
        if weights == "imagenet":
            state, source = _imagenet_state(self.name, key, imagenet), f"ImageNet weights ({imagenet}) from torchvision"
            if state is None:
                return
        else:
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except (RuntimeError, pickle.UnpicklingError, EOFError) as err:  # not a torch file, truncated, or code
                raise ValueError(
                    f"{weights}: not a readable weights-only state dict ({str(err).splitlines()[0]})"
                ) from None
            state, source = state.get("state_dict", state), weights
        model = torchvision.models.get_model(self.name, weights=None)
        missing, _ = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
        if missing:
            raise ValueError(f"{source} is not a {self.name} state dict (missing {', '.join(missing[:3])} ...)")
        self.features.load_state_dict(_features(model, self.name).state_dict())
        logger.info("%s (%s): %s", self.name, key, source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)
