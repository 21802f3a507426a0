"""Attention models written by hand: softmax ViT/DeiT, softmax and linear token models, GLA-like.

The attention is spelled out (`q @ k.transpose(-2, -1) * scale`, `softmax`, `@ v`) rather than
calling `F.scaled_dot_product_attention`, so that fxopt's attention passes have something to
find. The token models take (N, 64) tokens and hold no parameter sized by N: any sequence length
runs (`fxopt bench --input-shape 4096,64`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) => (B, H, N, C / H)."""
    batch, tokens, dim = x.shape
    return x.reshape(batch, tokens, heads, dim // heads).permute(0, 2, 1, 3)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) => (B, N, H * D)."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


class SoftmaxAttention(nn.Module):
    """Multi-head softmax self-attention, hand-written, one qkv projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        weights = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj(merge_heads(weights @ v))


class ReluLinearAttention(nn.Module):
    """EfficientViT-style ReLU linear attention: relu(q) (relu(k)T v) normalized by
    relu(q) relu(k)T 1, written the quadratic way (scores first)."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.heads, self.eps = heads, eps
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        scores = F.relu(q) @ F.relu(k).transpose(-2, -1)
        out = (scores @ v) / (scores.sum(dim=-1, keepdim=True) + self.eps)
        return self.proj(merge_heads(out))


class GatedCausalLinearAttention(nn.Module):
    """GLA-like token mixer: causal elu+1 linear attention (normalized, lower-triangular
    scores) with a SiLU output gate, as in gated linear attention without the decay."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.heads, self.eps, self.scale = heads, eps, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.gate = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        scores = ((F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1) * self.scale).tril()
        out = (scores @ v) / (scores.sum(dim=-1, keepdim=True) + self.eps)
        return self.proj(merge_heads(out) * F.silu(self.gate(x)))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block around any token mixer."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(dim), mixer
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenModel(nn.Module):
    """Blocks over (B, N, dim) tokens, then a final LayerNorm; no positional parameters."""

    def __init__(self, blocks: list[nn.Module], dim: int) -> None:
        super().__init__()
        self.blocks, self.norm = nn.Sequential(*blocks), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


class DeiTLike(nn.Module):
    """Conv patch embedding, class token, learned positions, softmax blocks, class-token head."""

    def __init__(self, image_size=32, patch=4, dim=64, depth=2, heads=4, num_classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
        blocks = [Block(dim, SoftmaxAttention(dim, heads), 4) for _ in range(depth)]
        self.blocks, self.norm = nn.Sequential(*blocks), nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


@register_model("vit_deit_like", input_shape=(3, 32, 32))
def vit_deit_like() -> nn.Module:
    """Small DeiT: 4x4 patches of 32x32 images, dim 64, 2 blocks of 4-head softmax attention."""
    return DeiTLike()


@register_model("token_softmax_attention", input_shape=(64, 64))
def token_softmax_attention() -> nn.Module:
    """Softmax-attention token model: (N, 64) tokens, 2 blocks, 4 heads; any N."""
    return TokenModel([Block(64, SoftmaxAttention(64, 4)) for _ in range(2)], 64)


@register_model("linear_attention_vit", input_shape=(256, 64))
def linear_attention_vit() -> nn.Module:
    """EfficientViT/SLAB-style ReLU linear attention on (N, 64) tokens: 2 blocks, one head of
    dim 64, written scores-first; any N."""
    return TokenModel([Block(64, ReluLinearAttention(64, 1)) for _ in range(2)], 64)


@register_model("gla_like_block", input_shape=(256, 64))
def gla_like_block() -> nn.Module:
    """Causal gated linear attention block on (N, 64) tokens: elu+1 features, 2 heads; any N."""
    return TokenModel([Block(64, GatedCausalLinearAttention(64, 2))], 64)
