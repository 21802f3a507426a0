"""Pure math for exact kernel decompositions: separable factors, dilation grids, and prices.

No graph in sight: these are functions of tensors and shapes, tested on their own. A kernel is
laid out as a conv weight, (out, in / groups, kh, kw).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fxopt.analysis.cost import Cost, call_overhead, conv_cost, roofline

# Singular values are dropped while the dropped part's Frobenius norm stays within this many
# units of roundoff of the kernel's own norm: storing the kernel in its dtype already moves it by
# about half a unit per entry (a Frobenius norm near 0.3 units), so a kernel built exactly low
# rank and rounded keeps its rank, and what is dropped is below what the conv's own summation
# rounds away (fp32: a relative error under 5e-7 of the output's scale).
RANK_TOLERANCE_ULPS = 4
# FLOP-rate penalties of band (1 x k, k x 1) convs against square kernels, measured on this
# project's CPU with PyTorch 2.13 (see split_separable_kernels): dense and grouped band convs run
# at about 2/3 of a square kernel's rate; depthwise band convs at about 1/6 of a square depthwise
# kernel's; and a grouped band conv with several channels per group (a depthwise kernel of
# rank > 1 gives one: a channel multiplier, then R inputs per group) is 5 times slower again.
BAND_FLOP_PENALTY = 1.5
DEPTHWISE_BAND_FLOP_PENALTY = 6.0
MULTIPLIER_FLOP_PENALTY = 5.0


@dataclass(frozen=True)
class Factors:
    """conv(first, then second) == conv(kernel): `first` (rank * groups, in / groups, 1, kw)
    and `second` (out, rank, kh, 1) when `order` is "w"; kh x 1 first when it is "h"."""

    first: torch.Tensor
    second: torch.Tensor
    rank: int
    order: str


def numerical_rank(singular: torch.Tensor, eps: float) -> int:
    """The smallest r whose dropped tail, sqrt(sum of s_j^2 for j >= r), is within
    `RANK_TOLERANCE_ULPS * eps` of the whole norm. `singular` is sorted in descending order."""
    energy = singular.double().pow(2)
    total = energy.sum()
    if total == 0:
        return 0
    tails = energy.flip(0).cumsum(0).flip(0)  # tails[r] = sum of s_j^2 for j >= r
    bound = (RANK_TOLERANCE_ULPS * eps) ** 2 * total
    return next((r for r in range(len(singular)) if tails[r] <= bound), len(singular))


def group_energy(kernel: torch.Tensor, groups: int) -> torch.Tensor:
    """Each group's sum of squared taps, in float64 (`rank_exceeds`'s scale; the same in
    either order)."""
    flat = kernel.detach().reshape(groups, -1)
    return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64) ** 2


def rank_exceeds(
    kernel: torch.Tensor, groups: int, rank: int, order: str = "w", energy=None
) -> bool:
    """Whether the numerical rank `separable_factors` finds is certainly above `rank`, without
    an SVD: some group's matrix M[(o, h), (i, w)] has a square block of `rank` + 1 rows and
    columns whose smallest singular value, squared, exceeds the tolerance by more than rounding
    (a Cholesky factorization of its shifted Gram matrix succeeds). Deleting rows or columns
    only lowers singular values, so the energy beyond the first `rank` singular values of the
    whole matrix is at least that. False when this does not settle it. `energy` is
    `group_energy(kernel, groups)`, when the caller has it already."""
    taps = kernel.detach() if order == "w" else kernel.detach().transpose(2, 3)
    out, per_group, kh, kw = taps.shape
    size = rank + 1
    if size > min(out // groups * kh, per_group * kw):
        return False
    rows = torch.arange(size) * (out // groups * kh) // size  # spread over the matrix
    columns = torch.arange(size) * (per_group * kw) // size
    first = (torch.arange(groups) * (out // groups))[:, None, None]  # each group's first output
    o, h = (rows // kh)[None, :, None], (rows % kh)[None, :, None]
    i, w = columns // kw, columns % kw
    block = taps[first + o, i, h, w].double()  # (groups, size, size)
    total = group_energy(kernel, groups) if energy is None else energy
    bound = (RANK_TOLERANCE_ULPS * torch.finfo(kernel.dtype).eps) ** 2 * total
    # the Gram product's and the factorization's rounding (Higham, Thm 10.3), twice over
    slack = 8 * (size + 2) * torch.finfo(torch.float64).eps * block.pow(2).sum((1, 2))
    shift = (bound + slack)[:, None, None] * torch.eye(size, dtype=torch.float64)
    _, info = torch.linalg.cholesky_ex(block.mT @ block - shift)
    return bool((info == 0).any())


def _separable_matrices(kernel: torch.Tensor, groups: int) -> torch.Tensor:
    """Each group's kernel as the float64 matrix M[(o, h), (i, w)]."""
    out, per_group, kh, kw = kernel.shape
    matrices = kernel.double().reshape(groups, out // groups, per_group, kh, kw)
    return matrices.permute(0, 1, 3, 2, 4).reshape(groups, out // groups * kh, per_group * kw)


def separable_factors(kernel: torch.Tensor, groups: int, order: str = "w") -> Factors:
    """Factor each group's kernel, read as the matrix M[(o, h), (i, w)], by its SVD truncated at
    its numerical rank; every group gets the largest rank of any group (zero columns pad the
    others). With order "h" the roles of the two spatial axes swap."""
    if order == "h":
        f = separable_factors(kernel.transpose(2, 3), groups, "w")
        return Factors(f.first.transpose(2, 3), f.second.transpose(2, 3), f.rank, "h")
    out, per_group, kh, kw = kernel.shape
    eps = torch.finfo(kernel.dtype).eps
    matrices = _separable_matrices(kernel, groups)
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    rank = max(1, max(numerical_rank(values, eps) for values in s))
    root = s[:, :rank].sqrt()
    left = u[:, :, :rank] * root[:, None, :]  # (g, out_g * kh, rank)
    right = root[:, :, None] * vh[:, :rank, :]  # (g, rank, in_g * kw)
    first = right.reshape(groups * rank, per_group, 1, kw)
    second = left.reshape(groups, out // groups, kh, rank).permute(0, 1, 3, 2)
    second = second.reshape(out, rank, kh, 1)
    return Factors(first.to(kernel.dtype), second.to(kernel.dtype), rank, "w")


def compose_separable(factors: Factors, groups: int) -> torch.Tensor:
    """The kernel the two factors compute together (the inverse of `separable_factors`)."""
    if factors.order == "h":
        first, second = factors.first.transpose(2, 3), factors.second.transpose(2, 3)
        swapped = Factors(first, second, factors.rank, "w")
        return compose_separable(swapped, groups).transpose(2, 3)
    first, second, rank = factors.first.double(), factors.second.double(), factors.rank
    out, kh, (_, per_group, _, kw) = second.shape[0], second.shape[2], first.shape
    a = first.reshape(groups, rank, per_group, kw)
    b = second.reshape(groups, out // groups, rank, kh)
    kernel = torch.einsum("gorh,griw->goihw", b, a)
    return kernel.reshape(out, per_group, kh, kw).to(factors.first.dtype)


@dataclass(frozen=True)
class Grid:
    """Per spatial axis: the first and last index holding a nonzero tap, and their spacing."""

    start: tuple[int, ...]
    stop: tuple[int, ...]
    step: tuple[int, ...]


def tap_grid(kernel: torch.Tensor) -> Grid | None:
    """The coarsest grid holding every nonzero tap of `kernel`, or None when it is all zero."""
    starts, stops, steps = [], [], []
    if kernel.dim() <= 2:
        return Grid((), (), ())
    taps = kernel.flatten(0, 1)  # one (out, in) slice per row
    first = taps[0].ne(0) if len(taps) else None
    # where one slice uses every tap (as a trained dense kernel does), so does the kernel
    used_taps = first if first is not None and bool(first.all()) else taps.ne(0).any(0)
    for axis in range(used_taps.dim()):
        others = [d for d in range(used_taps.dim()) if d != axis]
        used = torch.nonzero(used_taps.any(dim=others) if others else used_taps)
        if used.numel() == 0:
            return None
        indices = used.flatten().tolist()
        starts.append(indices[0])
        stops.append(indices[-1])
        steps.append(math.gcd(*(i - indices[0] for i in indices)) or 1)
    return Grid(tuple(starts), tuple(stops), tuple(steps))


def grid_kernel(kernel: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The taps of `kernel` on `grid`, as a smaller dense kernel."""
    index = (
        ...,
        *(slice(a, b + 1, s) for a, b, s in zip(grid.start, grid.stop, grid.step, strict=True)),
    )
    return kernel[index].contiguous()


def out_size(length: int, pad_left: int, pad_right: int, extent: int, stride: int) -> int:
    """Output length of a conv whose kernel spans `extent` input positions."""
    return (length + pad_left + pad_right - extent) // stride + 1


def conv_price(
    out_shape: Sequence[int],
    weight_shape: Sequence[int],
    input_elements: int,
    has_bias: bool,
    groups: int,
    element_size: int,
    penalty: float = 1.0,
) -> float:
    """`roofline` of a conv that does not exist yet (batched output shape), in byte units, its
    FLOPs counted `penalty` times (a band conv's slower FLOP rate)."""
    cost = conv_cost(out_shape, weight_shape, has_bias, input_elements, element_size)
    return roofline(Cost(round(cost.flops * penalty), cost.bytes), call_overhead(groups))
