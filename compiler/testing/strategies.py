"""Hypothesis strategies for random models to test passes on (needs the `dev` extra).

Every model comes in eval mode with batch-norm statistics and affine parameters drawn away from
identity, so a fold that forgets a term is caught.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED_CONVS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def randomize_batch_norm(bn: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters away from (0, 1) identity, in place."""
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    bn.running_mean = torch.randn(n, generator=g)
    bn.running_var = torch.rand(n, generator=g) * 1.5 + 0.5
    if bn.affine:
        bn.weight.data = torch.rand(n, generator=g) + 0.5
        bn.bias.data = torch.randn(n, generator=g) * 0.3
    return bn


@st.composite
def conv_bn(draw, dims=(1, 2, 3), transposed=(False, True)):
    """(model, input): a conv or transposed conv of random hyper-parameters, then batch norm."""
    dim = draw(st.sampled_from(dims))
    is_transposed = draw(st.sampled_from(transposed))
    groups = draw(st.sampled_from([1, 2]))
    in_ch, out_ch = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 3))
    # a transposed conv's padding must stay within its dilated kernel
    padding = draw(st.integers(0, min(2, dilation * (kernel - 1)) if is_transposed else 2))
    extra = {}
    if is_transposed:
        extra["output_padding"] = draw(st.integers(0, max(stride, dilation) - 1))
    conv = (TRANSPOSED_CONVS if is_transposed else CONVS)[dim](
        in_ch,
        out_ch,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        **extra,
    )
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    bn = BATCH_NORMS[dim](out_ch, affine=draw(st.booleans()), eps=eps)
    randomize_batch_norm(bn, seed=draw(st.integers(0, 2**16)))
    size = draw(st.integers(5, 9 if dim < 3 else 6))  # >= the widest dilated kernel
    x = torch.randn(draw(st.integers(1, 3)), in_ch, *([size] * dim))
    return nn.Sequential(conv, bn).eval(), x
