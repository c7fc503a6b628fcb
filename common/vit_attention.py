"""The attention maps of an open_clip ViT tower, per layer and head, for measures over them (attention distance).

Each block's attention is recomputed from its own input, captured by a forward pre-hook, with its own projections
(nn.MultiheadAttention with need_weights): softmax(Q K^T / sqrt(d_head)) per head, the CLS token included.
clip_quality.py's attention stage measures its mean attention distance with it (docs/clip_quality.md).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn


def attention_blocks(visual: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an open_clip ViT tower, each with an nn.MultiheadAttention; else TypeError."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not all(isinstance(getattr(block, "attn", None), nn.MultiheadAttention) for block in blocks):
        raise TypeError(f"{type(visual).__name__} has no blocks with nn.MultiheadAttention: attention "
                        "distance supports open_clip VisionTransformer towers only")
    return blocks


@torch.no_grad()
def attention_maps(visual: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Per layer (B, H, L, L) attention probabilities, recomputed from each block's captured input."""
    blocks = attention_blocks(visual)
    captured = {}
    hooks = [block.attn.register_forward_pre_hook(lambda module, a, kw, i=i: captured.__setitem__(i, (a, kw)),
                                                  with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        visual(images)
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    for i, block in enumerate(blocks):
        inputs, kwargs = captured[i]
        # softmax(Q K^T / sqrt(d_head)) per head, from the block's own projections
        _, weights = block.attn(*inputs[:3], need_weights=True, average_attn_weights=False,
                                attn_mask=kwargs.get("attn_mask"))
        maps.append(weights.float().cpu())  # (B, H, L, L)
    return maps


def over_images(visual: nn.Module, images: torch.Tensor, per_head: Callable[[torch.Tensor], torch.Tensor],
                device: str, world_size: int = 1, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_head` (one layer's (1, H, L, L) maps of one image -> (H,)) of every image: (the sum over `images`, and
    over the ranks too when world_size > 1 (each rank passes its own images, maybe none), (layers, heads) float64;
    this rank's values image by image, (n, layers, heads) float64), `batch_size` images through the tower at a time
    (ViT-B/16 maps are 2 GB per 128 images)."""
    blocks = attention_blocks(visual)
    rows = torch.zeros(len(images), len(blocks), blocks[0].attn.num_heads, dtype=torch.float64)
    for i in range(0, len(images), batch_size):
        maps = attention_maps(visual, images[i:i + batch_size].to(device))
        for b in range(len(maps[0])):
            rows[i + b] = torch.stack([per_head(layer[b:b + 1]) for layer in maps])
    total = rows.sum(0).to(device)
    if world_size > 1:
        dist.all_reduce(total)
    return total, rows
