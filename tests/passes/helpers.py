"""Helpers the pass tests share: seeded weights and inputs that do not depend on the global RNG
(hypothesis replays examples), and small readers of a graph.

Plain functions rather than fixtures, since model builders at module level call them; the
conftest next to this file makes `from helpers import ...` work under any import mode. Whether a
pass declines and leaves the graph unchanged is `fxopt.testing.assert_declines`.
"""

from __future__ import annotations

import torch
from torch import nn

aten = torch.ops.aten


def seeded(module: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """`module` in eval mode with every parameter redrawn as N(0, scale^2) from `seed`."""
    g = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        parameter.data = torch.randn(parameter.shape, generator=g) * scale
    return module.eval()


def randn(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def x_for(dims: int, batch: int = 2, channels: int = 4, size: int = 9) -> torch.Tensor:
    """An input for a `dims`-D conv of `channels` input channels."""
    return torch.randn(batch, channels, *([size] * dims))


def qkv(*shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.randn(*shape) for _ in range(3))


def remaining_ops(gm) -> list[str]:
    """The ATen ops left in `gm`, by name, shape bookkeeping left out."""
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    return sorted(op.overloadpacket.__name__ for op in ops if op is not aten.sym_size.int)
