"""A small ViT whose norms are batch norms, as in SLAB (Guo et al. 2024), so they can fold."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class TokenBatchNorm(nn.Module):
    """BatchNorm1d over the channels of (B, N, C) tokens, in place of LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head softmax self-attention with one qkv projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class BatchNormMlp(nn.Module):
    """Linear -> BatchNorm1d -> GELU -> Linear; the norm runs on (B*N, hidden) rows."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        hidden = self.bn(self.fc1(x).flatten(0, 1)).reshape(batch, tokens, -1)
        return self.fc2(self.act(hidden))


class Block(nn.Module):
    """Pre-norm transformer block with batch norms."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = TokenBatchNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = TokenBatchNorm(dim)
        self.mlp = BatchNormMlp(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BatchNormViT(nn.Module):
    """Conv patch embedding, learned positions, transformer blocks, mean-pooled class head."""

    def __init__(
        self,
        image_size: int = 32,
        patch: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = TokenBatchNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens.mean(1))


@register_model("vit_bn_like", input_shape=(3, 32, 32))
def vit_bn_like() -> nn.Module:
    """ViT with BatchNorm in place of LayerNorm (SLAB-style): 4x4 patches, dim 64, 4 blocks."""
    return BatchNormViT()
