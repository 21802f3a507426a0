"""The float64 arbiter: when a rewrite misses the float32 tolerance, is the rewrite wrong or is
float32 itself that far from the exact answer?

The float32 tolerance (``1e-5 * max|y| + 1e-6``) treats eager float32 as the truth. On deep
re-parameterizable models eager float32 is itself further than that from the exact answer:
on timm's mobileone_s0 (224², random weights, outputs up to 5.8) eager float32 is 6.7e-5 from
the float64 result and the bound is 5.9e-5. A folded graph sums in another order, lands about
as far from the exact answer on another side (6.3e-5), and so misses the bound by comparison
with eager although it is as accurate as eager. timm's own deploy form misses it by more
(8.2e-5).

When an exact check fails on floating outputs, the reference and the candidate run again in
float64 (weights and inputs cast, the graph's float dtype arguments set to float64), and the
candidate is accepted when both hold for every output:

1. in float64 it matches the reference within the float32 bound plus what rounding the weights
   costs: a rewrite stores new weights (a folded kernel, a summed branch) rounded to float32, and
   on an ill-conditioned model that alone moves the output past the bound (timm's levit_128s
   with random weights, on some inputs: 0.1 at outputs of 137). So the reference also runs in
   float64 with every weight moved by up to one float32 rounding step (a fixed random relative
   change of at most 2**-24), and condition 1 allows `ROUNDINGS` times the change that makes.
   A graph with no weights gets no allowance: its rewrite must agree to the plain bound;
2. in float32 it is no further from the float64 result than the reference in float32 is, plus
   the bound: the user's float32 results lose nothing.

Nothing else is relaxed: a non-finite output, a changed shape, dtype or integer output fails
as before.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import astuple, dataclass

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .ir.errors import VerificationError
from .verify import max_error, outputs, same_non_finite, tolerance

REDUCED = (torch.float32, torch.float16, torch.bfloat16)
# A rewrite may round a new weight a few times (a scale, a product, a sum of branches): condition
# 1 allows this many single roundings of every weight.
ROUNDINGS = 4
ROUNDING_STEP = 2.0**-24  # float32's unit roundoff


def float64_copy(module: nn.Module, rounding_seed: int | None = None) -> nn.Module:
    """A deep copy of `module` computing in float64: its floating parameters, buffers and tensor
    attributes cast and, in a GraphModule, float dtype arguments (``_to_copy(dtype=float32)``,
    ``full(..., dtype=float32)``) set to float64. With `rounding_seed`, every floating weight is
    also moved by one float32 rounding step at most, `w * (1 + u * 2**-24)` with u uniform in
    [-1, 1], drawn from that seed."""
    module = _copy(module)
    generator = None if rounding_seed is None else torch.Generator().manual_seed(rounding_seed)
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, tensor in table.items():
                if tensor is not None and tensor.dtype in REDUCED:
                    table[name] = _cast(tensor, generator)
        for name, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and value.dtype in REDUCED:
                object.__setattr__(m, name, _cast(value, generator))
    if isinstance(module, fx.GraphModule):
        for node in module.graph.nodes:
            node.args, node.kwargs = pytree.tree_map(_float64_dtype, (node.args, node.kwargs))
        module.recompile()
    return module


def _copy(module: nn.Module) -> nn.Module:
    """A copy whose tensors may be replaced without touching `module`'s: a GraphModule whose
    called submodules hold no tensors (export's guard function) gets new module objects around
    the same tensors, which `float64_copy` then swaps for float64 ones; anything else is
    deep-copied."""
    if isinstance(module, fx.GraphModule) and not any(
        _holds_tensors(module.get_submodule(node.target))
        for node in module.graph.nodes
        if node.op == "call_module"
    ):
        return fx.GraphModule(module, copy.deepcopy(module.graph))
    return copy.deepcopy(module)


def _holds_tensors(module: nn.Module) -> bool:
    return any(
        isinstance(value, torch.Tensor)
        for m in module.modules()
        for value in (*m._parameters.values(), *m._buffers.values(), *vars(m).values())
    )


def float64_inputs(args):
    """`args` with every floating tensor cast to float64."""
    return pytree.tree_map(
        lambda x: x.double() if isinstance(x, torch.Tensor) and x.dtype in REDUCED else x, args
    )


def _cast(tensor: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    casted = tensor.detach().double()
    if generator is not None:
        u = torch.rand(casted.shape, generator=generator, dtype=torch.float64) * 2 - 1
        casted = casted * (1 + u * ROUNDING_STEP)
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(casted, tensor.requires_grad)
    return casted


def _float64_dtype(value):
    return torch.float64 if isinstance(value, torch.dtype) and value in REDUCED else value


@dataclass(frozen=True)
class Rounding:
    """At worst over the outputs: how far the reference (`floor`) and the candidate (`off`) are
    from the float64 result in their own dtype, the two apart in float64 (`exact`), and how much
    of that condition 1 allowed for rounding weights (`allowed`, beyond the bound)."""

    floor: float
    off: float
    exact: float
    allowed: float = 0.0

    def __str__(self) -> str:
        allowed = f" (weight rounding allows {self.allowed:.1e})" if self.allowed else ""
        return (
            f"float32 rounding: the reference is {self.floor:.1e} from the float64 result and "
            f"this graph {self.off:.1e}; in float64 the two agree to {self.exact:.1e}{allowed}"
        )


def judge(ref32, cand32, ref64, cand64, rounded64=None) -> Rounding:
    """Apply the two conditions above to one input set's outputs (pytrees; `rounded64`: the
    reference's float64 outputs with its weights moved by a rounding step, or a function
    returning them, called only when an output misses the bound without the allowance; None for
    no allowance); raise VerificationError saying which condition failed."""
    leaves = [pytree.tree_flatten(x)[0] for x in (ref32, cand32, ref64, cand64)]
    moved = None
    worst = Rounding(0.0, 0.0, 0.0)
    for i, (r32, c32, r64, c64) in enumerate(zip(*leaves, strict=True)):
        if not (isinstance(r32, torch.Tensor) and r32.dtype in REDUCED):
            max_error(r32, c32)  # integers, booleans, non-tensors: equal as before
            continue
        max_error(r32, c32, rtol=float("inf"))  # shape, dtype and finiteness as before
        rtol, atol = tolerance(r32.dtype)
        finite = r64[torch.isfinite(r64)]  # max_error saw NaN and Inf in the same places
        bound = rtol * finite.abs().max().item() + atol if finite.numel() else atol
        exact, allowed = _distance(c64, r64), 0.0
        if exact > bound and rounded64 is not None:
            if moved is None:
                moved = pytree.tree_flatten(rounded64() if callable(rounded64) else rounded64)[0]
            allowed = ROUNDINGS * _distance(moved[i], r64)
        leaf = Rounding(_distance(r32, r64), _distance(c32, r64), exact, allowed)
        if leaf.exact > bound + leaf.allowed:
            allowed = f" + {leaf.allowed:.3g} for weight rounding" if leaf.allowed else ""
            raise VerificationError(
                f"output {i}: not float32 rounding, {leaf.exact:.3g} off in float64 too "
                f"(bound {bound:.3g}{allowed})"
            )
        if leaf.off > leaf.floor + bound:
            raise VerificationError(
                f"output {i}: {leaf.off:.3g} from the float64 result, where the reference is "
                f"{leaf.floor:.3g} (bound {bound:.3g})"
            )
        worst = Rounding(*map(max, astuple(worst), astuple(leaf)))
    return worst


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference where both are finite; infinite where NaN or Inf differ."""
    a, b = a.double(), b.double()
    if not same_non_finite(a, b):
        return float("inf")
    finite = torch.isfinite(a)
    return (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0


class Float64Reference:
    """The graph before any pass, kept to arbitrate float32 misses (see the module docstring).

    Holds its own copy of the graph (not of the tensors: a pass may not write into a tensor the
    graph reads, which the pipeline enforces); runs it, in float32, in float64 and in float64
    with its weights moved by a rounding step, only when a check fails, and keeps those outputs
    for the input sets it has seen."""

    def __init__(self, gm: fx.GraphModule):
        self._graph = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        self._float64_graphs: list[nn.Module | None] = [None, None]  # exact, weights moved
        self._seen: list[tuple[tuple, dict]] = []  # (args, {float32/float64/moved: outputs})

    def check(self, candidate: fx.GraphModule, found: list, inputs: Sequence[tuple], ref32=None):
        """Judge `candidate`, whose float32 outputs on `inputs` are `found`, against this
        reference (`ref32`: the reference's float32 outputs, when they come from elsewhere, such
        as eager). An input set on which `found` is within the float32 bound of the reference
        needs no arbitration; the others run in float64. Returns the worst input set's Rounding
        (None when every set was within the bound); raises VerificationError."""
        accounts, candidate64 = [], None
        for i, args in enumerate(inputs):
            own32 = self._float32(args)
            reference = own32 if ref32 is None else ref32[i]
            try:
                if ref32 is not None:  # float64 speaks for `ref32` only if it is the same program
                    max_error(ref32[i], own32)
                if _within(reference, found[i]):
                    continue
                candidate64 = candidate64 or float64_copy(candidate)
                cand64 = outputs(candidate64, [float64_inputs(args)])[0]
                ref64 = self._float64(args)
                moved = functools.partial(self._float64, args, rounded=True)
                accounts.append(judge(reference, found[i], ref64, cand64, moved))
            except VerificationError as error:
                raise VerificationError(f"input set {i}: {error}") from None
        return max(accounts, key=lambda account: account.off, default=None)

    def _float32(self, args: tuple):
        return self._cached(args, "float32", lambda: outputs(self._graph, [args])[0])

    def _float64(self, args: tuple, rounded: bool = False):
        """The reference's float64 outputs on `args` (`rounded`: with its weights moved by a
        rounding step)."""
        if self._float64_graphs[rounded] is None:
            seed = 0 if rounded else None
            self._float64_graphs[rounded] = float64_copy(self._graph, rounding_seed=seed)
        graph = self._float64_graphs[rounded]
        key = "moved" if rounded else "float64"
        return self._cached(args, key, lambda: outputs(graph, [float64_inputs(args)])[0])

    def _cached(self, args: tuple, key: str, compute):
        found = next((found for seen, found in self._seen if seen is args), None)
        if found is None:
            found = {}
            self._seen.append((args, found))
        if key not in found:
            found[key] = compute()
        return found[key]


def _within(reference, found) -> bool:
    try:
        max_error(reference, found)
    except VerificationError:
        return False
    return True
