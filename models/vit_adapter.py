"""A small ViT with linear adapters that merge into their host layers (ZeroI2V, Li et al. 2024).

Adapters are linear only (down-projection then up-projection, no activation), so a serial adapter
after the attention projection, ``z + up(down(z))``, and a parallel one beside the MLP's first
layer, ``fc1(x) + up(down(x))``, both fold into the linear they accompany.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .reparam import linear_from, merge_linears, reparameterize


class LinearAdapter(nn.Module):
    """``up(down(x))`` with a zero-initialized up-projection, so training starts at the host."""

    def __init__(self, in_features: int, bottleneck: int, out_features: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, bottleneck)
        self.up = nn.Linear(bottleneck, out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the adapter as one linear."""
        return merge_linears((self.down.weight, self.down.bias), (self.up.weight, self.up.bias))


class Attention(nn.Module):
    """Multi-head self-attention; its output projection is followed by a serial adapter."""

    def __init__(self, dim: int, heads: int, bottleneck: int | None) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.adapter = None if bottleneck is None else LinearAdapter(dim, bottleneck, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        return out if self.adapter is None else out + self.adapter(out)

    def reparameterized(self) -> Attention:
        if self.adapter is None:
            return self
        dim = self.proj.in_features
        deploy = Attention(dim, self.heads, None)
        deploy.qkv = self.qkv
        weight, bias = self.adapter.fused()
        # z + A z is the linear (I + A), applied after the projection.
        serial = (weight + torch.eye(dim, dtype=weight.dtype), bias)
        deploy.proj = linear_from(merge_linears((self.proj.weight, self.proj.bias), serial))
        return deploy


class Mlp(nn.Module):
    """fc1 (+ a parallel adapter) -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, bottleneck: int | None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.adapter = None if bottleneck is None else LinearAdapter(dim, bottleneck, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if self.adapter is not None:
            hidden = hidden + self.adapter(x)
        return self.fc2(self.act(hidden))

    def reparameterized(self) -> Mlp:
        if self.adapter is None:
            return self
        deploy = Mlp(self.fc1.in_features, self.fc1.out_features, None)
        deploy.fc2 = self.fc2
        weight, bias = self.adapter.fused()
        deploy.fc1 = linear_from((self.fc1.weight + weight, self.fc1.bias + bias))
        return deploy


class Block(nn.Module):
    """Pre-LayerNorm transformer block with adapted attention and MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, bottleneck: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, bottleneck)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio * dim, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AdapterViT(nn.Module):
    """Conv patch embedding, learned positions, adapted blocks, LayerNorm, mean-pooled head."""

    def __init__(
        self,
        image_size: int = 32,
        patch: int = 4,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        bottleneck: int = 8,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        self.blocks = nn.Sequential(
            *(Block(dim, heads, mlp_ratio, bottleneck) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens)).mean(1))


@register_model("vit_adapter_net", input_shape=(3, 32, 32), deploy=reparameterize)
def vit_adapter_net() -> nn.Module:
    """ViT (4x4 patches, dim 64, 2 blocks) with rank-8 linear adapters beside proj and fc1."""
    return AdapterViT()
