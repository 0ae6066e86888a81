"""How float32 arithmetic runs: the config's policy for matmuls and cuDNN convolutions, and the layers kept in IEEE
float32 whatever the policy (which Lightning precisions a run may use is a config check: config.precision_refusal).

trainer.float32_matmul_precision takes PyTorch's (and Lightning's) names:
    highest   IEEE float32 for matmuls and convolutions: a GPU computes what the CPU computes (the default)
    high      TF32 (10-bit mantissa) tensor cores for float32 matmuls and cuDNN convolutions
    medium    as high, and bf16 passes where a backend offers them for float32 matmuls
torch's own defaults differ between the two (matmuls 'highest', cuDNN convolutions TF32), so a run would otherwise
compute its float32 convolutions in TF32 on a GPU while its matmuls take the slow IEEE path; the policy sets both.

The layers the design keeps in float32 (the frozen DCG, the denoiser's first and last label-space layers) run under
`ieee_float32()`, which switches TF32 off around them: their numbers do not depend on the policy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from config import FLOAT32_POLICIES

logger = logging.getLogger(__name__)


def apply_float32_policy(policy: str) -> None:
    """Set the float32 policy for matmuls (every backend) and cuDNN convolutions alike, in this process."""
    assert policy in FLOAT32_POLICIES, f"float32 policy {policy!r}: use one of {', '.join(FLOAT32_POLICIES)}"
    # the legacy setter keeps every matmul backend consistent (torch refuses to report a mixed state, and Lightning
    # asks for it); the convolutions have only the per-backend setting
    torch.set_float32_matmul_precision(policy)
    torch.backends.cudnn.conv.fp32_precision = "ieee" if policy == "highest" else "tf32"


def float32_policy() -> tuple[str, str]:
    """(matmul policy, cuDNN convolution setting) in force in this process."""
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.conv.fp32_precision


@contextmanager
def ieee_float32() -> Iterator[None]:
    """IEEE float32 for the matmuls and convolutions inside, whatever the policy; the policy is back afterwards.
    The switches are host-side flags read when a kernel is launched: no device synchronisation."""
    matmul, conv = float32_policy()
    if matmul == "highest" and conv == "ieee":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.conv.fp32_precision = conv
