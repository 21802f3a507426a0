"""Pure math for merging side-by-side branches: kernels and biases.

No graph in sight: these are functions of tensors and shapes, tested on their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .kernels import identity_kernel, pad_centred


def depthwise_weight(
    parts: Sequence[torch.Tensor | int],
    size: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One depthwise kernel for channel groups laid side by side: a tensor part is a branch's
    dense depthwise kernel (c, 1, *k) with odd k, an int part is that many identity channels."""
    kernels = [
        identity_kernel(part, part, len(size), dtype).to(device) if isinstance(part, int) else part
        for part in parts
    ]
    return torch.cat([pad_centred(kernel, size) for kernel in kernels])


def concat_biases(
    biases: Sequence[torch.Tensor | None], sizes: Sequence[int]
) -> torch.Tensor | None:
    """The bias of branches side by side: each branch's own, zeros where a branch has none;
    None when no branch has one."""
    present = [b for b in biases if b is not None]
    if not present:
        return None
    like = present[0]
    return torch.cat(
        [b if b is not None else like.new_zeros(n) for b, n in zip(biases, sizes, strict=True)]
    )
