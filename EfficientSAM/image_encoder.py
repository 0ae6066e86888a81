"""EfficientSAM ViT image encoder (without its neck), built from timm blocks.

The parameter names follow the official EfficientSAM ``image_encoder.*`` layout
(minus ``neck.*``) so that the released checkpoints load with ``strict=True``:
``patch_embed.proj``, ``pos_embed`` and ``blocks.{i}.{norm1,attn.qkv,attn.proj,
norm2,mlp.fc1,mlp.fc2}``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

PATCH_SIZE = 16
PRETRAIN_IMG_SIZE = 224  # the position embedding was learnt on a 14x14 grid

# Architecture of each variant; the remaining hyper-parameters are shared.
ENCODERS: dict[str, dict[str, int]] = {
    "vit_s": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_t": dict(embed_dim=192, depth=12, num_heads=3),
}


def resample_pos_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubically resample a (1, gh, gw, D) position grid to (1, h, w, D), size=(h, w)."""
    if tuple(grid.shape[1:3]) == tuple(size):
        return grid
    # F.interpolate wants channels first; bicubic/align_corners=False is what the
    # official ``get_abs_pos`` uses, so features stay comparable to the paper's.
    resized = F.interpolate(grid.permute(0, 3, 1, 2), size=size, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """Plain ViT encoder returning a (B, D, H/16, W/16) feature map.

    Args:
        embed_dim: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: hidden width of the MLP relative to D.
    """

    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = PATCH_SIZE
        self.pretrain_grid = PRETRAIN_IMG_SIZE // PATCH_SIZE
        # strict_img_size=False: the classifier feeds sizes other than 224; the
        # divisibility check is done in forward with a clearer message.
        self.patch_embed = PatchEmbed(
            img_size=PRETRAIN_IMG_SIZE,
            patch_size=PATCH_SIZE,
            in_chans=3,
            embed_dim=embed_dim,
            flatten=True,
            strict_img_size=False,
        )
        # 14*14 grid positions plus the class-token slot kept by the official weights.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pretrain_grid**2 + 1, embed_dim))
        # Official init is zeros (it is always overwritten by the checkpoint); a small
        # random init keeps a randomly initialised encoder position-aware.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        # Default timm options (no layer-scale, no qk-norm) add no extra parameters.
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=True,
                    act_layer=nn.GELU,
                    norm_layer=norm_layer,
                )
                for _ in range(depth)
            ]
        )

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Position embedding for an (h, w) token grid, shape (1, h*w, D)."""
        g = self.pretrain_grid
        # Drop the class-token slot: the encoder has no class token.
        grid = self.pos_embed[:, 1:].reshape(1, g, g, self.embed_dim)
        return resample_pos_grid(grid, (h, w)).reshape(1, h * w, self.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images (B, 3, H, W), H and W multiples of 16, into (B, D, H/16, W/16)."""
        assert x.dim() == 4, f"expected a 4-D (B, 3, H, W) tensor, got shape {tuple(x.shape)}"
        assert x.shape[1] == 3, f"expected 3 input channels, got {x.shape[1]}"
        H, W = x.shape[-2:]
        assert H % self.patch_size == 0 and W % self.patch_size == 0, (
            f"image sides must be multiples of {self.patch_size}, got {H}x{W}"
        )
        h, w = H // self.patch_size, W // self.patch_size
        x = self.patch_embed(x)  # (B, h*w, D)
        x = x + self.position_embedding(h, w)
        x = self.blocks(x)
        return x.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w)
