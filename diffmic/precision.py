"""How float32 arithmetic runs: the config's policy for matmuls and cuDNN convolutions, and the layers kept in IEEE
float32 whatever the policy (which Lightning precisions a run may use is a config check: config.precision_refusal).

trainer.float32_matmul_precision takes PyTorch's (and Lightning's) names:
    highest   IEEE float32 for matmuls and convolutions: a GPU computes what the CPU computes (the default)
    high      TF32 (10-bit mantissa) tensor cores for float32 matmuls and cuDNN convolutions
    medium    as high, and bf16 passes where a backend offers them for float32 matmuls
torch's own defaults differ between the two (matmuls 'highest', cuDNN convolutions TF32), so a run would otherwise
compute its float32 convolutions in TF32 on a GPU while its matmuls take the slow IEEE path; the policy sets both.

The layers the design keeps in float32 (the frozen DCG, the denoiser's first and last label-space layers) run their
forward pass under `ieee_float32()`, which switches TF32 off around them: what they compute does not depend on the
policy (their gradients, computed later by autograd, follow it). The DCG pre-trains under `highest`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)

# the values of trainer.float32_matmul_precision (config.RULES lists this registry)
FLOAT32_POLICIES = ("highest", "high", "medium")


def apply_float32_policy(policy: str) -> None:
    """Set the float32 policy for matmuls (every backend) and cuDNN convolutions alike, in this process."""
    assert policy in FLOAT32_POLICIES, f"float32 policy {policy!r}: use one of {', '.join(FLOAT32_POLICIES)}"
    # torch's legacy switches for both: torch refuses to report a state set partly through the legacy and partly
    # through the per-backend (fp32_precision) API, and Lightning and other code read the legacy getters
    torch.set_float32_matmul_precision(policy)
    torch.backends.cudnn.allow_tf32 = policy != "highest"


def float32_policy() -> tuple[str, bool]:
    """(matmul policy, whether cuDNN convolutions may use TF32) in force in this process."""
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


@contextmanager
def ieee_float32() -> Iterator[None]:
    """IEEE float32 for the matmuls and convolutions of the forward pass inside, whatever the policy; the policy is
    back afterwards (a backward pass runs later, under the policy). The switches are host-side flags read when a
    kernel is launched: no device synchronisation."""
    matmul, conv_tf32 = float32_policy()
    if matmul == "highest" and not conv_tf32:
        yield
        return
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = conv_tf32
