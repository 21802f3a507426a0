"""Structural re-parameterization by hand: the kernel math and the step that reaches a deploy form.

The helpers are pure functions of tensors (a batch norm is read, never written), the identities of
structural re-parameterization (RepVGG, Ding et al. 2021, arXiv:2101.03697; DBB, Ding et al. 2021,
arXiv:2103.13425). A re-parameterizable block offers `reparameterized()`, which returns a new module
computing the same function from the same weights; `reparameterize` swaps every such block in a
model for its deploy form, as timm's `reparameterize_model` does, and is idempotent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Kernel = tuple[torch.Tensor, torch.Tensor]  # (weight, bias)


@torch.no_grad()
def reparameterize(model: nn.Module) -> nn.Module:
    """Replace every block of `model` that has `reparameterized()` by its result.

    Parameters
    ----------
    model
        A train-form model; its children are replaced in place.

    Returns
    -------
    nn.Module
        The deploy form: `model` itself, or its replacement when the root is such a block.
    """
    if hasattr(model, "reparameterized"):
        return model.reparameterized()
    for name, child in model.named_children():
        setattr(model, name, reparameterize(child))
    return model


def batch_norm_affine(bn: nn.modules.batchnorm._BatchNorm) -> Kernel:
    """Eval-mode batch norm as ``x * scale + shift`` per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def fuse_conv_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module) -> Kernel:
    """A conv (or linear) followed by eval batch norm, as one weight and bias."""
    scale, shift = batch_norm_affine(bn)
    bias = torch.zeros_like(scale) if bias is None else bias
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * scale.reshape(shape), bias * scale + shift


def fuse_bn_conv(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module) -> Kernel:
    """Eval batch norm followed by a conv without zero padding (padded zeros are not normalized).

    Only for `groups=1` convs or linears, whose input channels are the weight's second dimension.
    """
    scale, shift = batch_norm_affine(bn)
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    moved = (weight * shift.reshape(shape)).flatten(1).sum(1)
    return weight * scale.reshape(shape), moved if bias is None else bias + moved


def pad_kernel(weight: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Zero-pad a (possibly non-square) kernel to `size`, keeping it centred."""
    height, width = (size, size) if isinstance(size, int) else size
    pad_h, pad_w = height - weight.shape[-2], width - weight.shape[-1]
    if pad_h < 0 or pad_w < 0 or pad_h % 2 or pad_w % 2:
        raise ValueError(f"cannot centre a {tuple(weight.shape[-2:])} kernel in {size}")
    return F.pad(weight, [pad_w // 2, pad_w // 2, pad_h // 2, pad_h // 2])


def identity_kernel(channels: int, groups: int, size: int = 1, dtype=torch.float32) -> torch.Tensor:
    """The kernel of a `groups`-grouped conv that maps its input to itself (a centred delta)."""
    per_group = channels // groups
    weight = torch.zeros(channels, per_group, size, size, dtype=dtype)
    weight[torch.arange(channels), torch.arange(channels) % per_group, size // 2, size // 2] = 1
    return weight


def avg_pool_kernel(channels: int, groups: int, size: int, dtype=torch.float32) -> torch.Tensor:
    """The kernel of a grouped conv equal to a per-channel `size`x`size` average pool."""
    per_group = channels // groups
    weight = torch.zeros(channels, per_group, size, size, dtype=dtype)
    weight[torch.arange(channels), torch.arange(channels) % per_group] = 1.0 / size**2
    return weight


def dilate_kernel(weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """A kernel at `dilation` as the dense kernel with zeros between its taps."""
    if dilation == 1:
        return weight
    flat = weight.reshape(-1, 1, *weight.shape[-2:])
    dense = F.conv_transpose2d(flat, torch.ones(1, 1, 1, 1, dtype=weight.dtype), stride=dilation)
    return dense.reshape(*weight.shape[:2], *dense.shape[-2:])


def merge_1x1_kxk(first: Kernel, second: Kernel) -> Kernel:
    """`second` (k x k, groups=1) after `first` (1 x 1, groups=1) as one k x k conv.

    Exact when the k x k conv has no zero padding of its own, or when its input is padded with the
    1 x 1 conv's bias (DBB's BNAndPad), as if the 1 x 1 conv had seen a zero-padded input.
    """
    (weight1, bias1), (weight2, bias2) = first, second
    weight = F.conv2d(weight2, weight1.permute(1, 0, 2, 3))
    return weight, bias2 + (weight2 * bias1.reshape(1, -1, 1, 1)).sum((1, 2, 3))


def merge_linears(first: Kernel, second: Kernel) -> Kernel:
    """`second` after `first`, two linear maps, as one."""
    (weight1, bias1), (weight2, bias2) = first, second
    return weight2 @ weight1, weight2 @ bias1 + bias2


def conv_as_linear(
    weight: torch.Tensor,
    bias: torch.Tensor,
    in_shape: tuple[int, int, int],
    padding: int | tuple[int, int],
) -> Kernel:
    """A stride-1 conv on a fixed (C, H, W) input as a linear map of the flattened input.

    Returns the weight and bias of the equivalent linear over ``x.flatten(1)``, producing the
    flattened (O, H', W') output (RepMLP's conv-to-FC identity).
    """
    size = in_shape[0] * in_shape[1] * in_shape[2]
    basis = torch.eye(size, dtype=weight.dtype).reshape(size, *in_shape)
    columns = F.conv2d(basis, weight, padding=padding)
    out_hw = columns.shape[-2] * columns.shape[-1]
    return columns.flatten(1).T, bias.repeat_interleave(out_hw)


def conv2d_from(
    kernel: Kernel,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    dilation: int | tuple[int, int] = 1,
) -> nn.Conv2d:
    """A conv module holding `kernel`, for the deploy forms."""
    weight, bias = kernel
    out_channels, per_group, height, width = weight.shape
    size = (height, width)
    conv = nn.Conv2d(per_group * groups, out_channels, size, stride, padding, dilation, groups)
    conv.weight.data.copy_(weight)
    conv.bias.data.copy_(bias)
    return conv


def linear_from(kernel: Kernel) -> nn.Linear:
    """A linear module holding `kernel`."""
    weight, bias = kernel
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.weight.data.copy_(weight)
    linear.bias.data.copy_(bias)
    return linear


class ConvBN(nn.Module):
    """Conv2d without bias, then BatchNorm2d: the branch every re-parameterizable block sums."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        groups: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def fused(self) -> Kernel:
        """Weight and bias of the conv with the norm folded in."""
        return fuse_conv_bn(self.conv.weight, self.conv.bias, self.bn)

    def reparameterized(self) -> nn.Conv2d:
        conv = self.conv
        return conv2d_from(self.fused(), conv.stride, conv.padding, conv.groups, conv.dilation)


class Residual(nn.Module):
    """``x + body(x)``: the shape deploy forms of residual blocks take."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)
