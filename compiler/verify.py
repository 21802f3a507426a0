"""Numerical verification: run two callables on the same inputs and compare with a tolerance
relative to the output's scale (max |a-b| <= rtol * max|a| + atol), dtype-aware.

Non-finite reference outputs fail verification: NaN never equals NaN here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from .ir.errors import VerificationError

TOLERANCES = {  # dtype -> (rtol, atol)
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES.get(dtype, (0.0, 0.0))


def max_error(reference, candidate, rtol: float | None = None, atol: float | None = None) -> float:
    """Compare two outputs (any pytree of tensors); return the largest error relative to its
    tolerance bound, raising VerificationError where a bound is exceeded."""
    ref_leaves, ref_spec = pytree.tree_flatten(reference)
    cand_leaves, cand_spec = pytree.tree_flatten(candidate)
    if ref_spec != cand_spec:
        raise VerificationError(f"output structure differs: {ref_spec} vs {cand_spec}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(ref_leaves, cand_leaves, strict=True)):
        worst = max(worst, _compare_leaf(i, a, b, rtol, atol))
    return worst


def _compare_leaf(index: int, a, b, rtol, atol) -> float:
    where = f"output {index}"
    if not isinstance(a, torch.Tensor):
        if a != b:
            raise VerificationError(f"{where}: {a!r} != {b!r}")
        return 0.0
    if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        got = f"{tuple(b.shape)} {b.dtype}" if isinstance(b, torch.Tensor) else type(b).__name__
        raise VerificationError(f"{where}: expected {tuple(a.shape)} {a.dtype}, got {got}")
    if not (a.is_floating_point() or a.is_complex()):
        if not torch.equal(a, b.to(a.device)):
            raise VerificationError(f"{where}: integer outputs differ")
        return 0.0
    default_rtol, default_atol = tolerance(a.dtype)
    a, b = a.detach().double(), b.detach().to(a.device).double()
    finite = torch.isfinite(a)
    if not finite.all():
        if not finite.any():
            raise VerificationError(
                f"{where}: the reference output has no finite value, so equivalence cannot be "
                "checked; check the weights and inputs"
            )
        if not same_non_finite(a, b):
            raise VerificationError(
                f"{where}: NaN or Inf where the reference has a number, or a number where it "
                "has NaN or Inf"
            )
        a, b = a[finite], b[finite]  # NaN (a fully masked attention row) where eager has it
    if not torch.isfinite(b).all():
        raise VerificationError(f"{where}: the candidate output has NaN or Inf")
    scale = a.abs().max().item() if a.numel() else 0.0
    bound = (default_rtol if rtol is None else rtol) * scale + (
        default_atol if atol is None else atol
    )
    error = (a - b).abs().max().item() if a.numel() else 0.0
    if error > bound:
        raise VerificationError(f"{where}: max |difference| {error:.3g} exceeds {bound:.3g}")
    return error


def same_non_finite(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` have NaN, +Inf and -Inf at exactly the same places."""
    return all(
        torch.equal(test(a), test(b)) for test in (torch.isnan, torch.isposinf, torch.isneginf)
    )


def random_like(inputs, seed: int, batch: int | None = None):
    """Fresh inputs shaped like `inputs` (optionally with another batch size); floats keep the
    example's mean and spread, integers stay in its range. Masks (booleans, and floats of two
    values, such as 0 and finfo.min) are the example's rows: a padding mask stays a valid mask
    (random bits could hide a whole row, noise scaled like finfo.min overflows)."""
    generator = torch.Generator().manual_seed(seed)

    def fresh(x):
        if not isinstance(x, torch.Tensor):
            return x
        shape = (batch, *x.shape[1:]) if batch is not None and x.dim() else x.shape
        if x.is_floating_point() and x.dim() and _two_valued(x):
            return _rows(x, shape[0])
        if x.is_floating_point():
            mean, std = _moments(x)
            noise = torch.randn(shape, generator=generator, dtype=torch.float64)
            return (noise * std + mean).to(dtype=x.dtype, device=x.device)
        if x.dtype == torch.bool or x.numel() == 0:
            return _rows(x, shape[0]) if x.dim() else x.clone()
        low, high = int(x.min()), int(x.max())
        return torch.randint(low, high + 1, shape, generator=generator).to(x.dtype).to(x.device)

    return pytree.tree_map(fresh, inputs)


def _two_valued(x: torch.Tensor) -> bool:
    if x.numel() <= 2:
        return False
    low, high = x.aminmax()
    return bool(low < high) and bool(((x == low) | (x == high)).all())


def _rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    """`batch` rows of `x`, repeating its rows in turn."""
    if x.shape[0] == 0:
        return x.new_zeros((batch, *x.shape[1:]))
    return x[torch.arange(batch, device=x.device) % x.shape[0]].clone()


def _moments(x: torch.Tensor) -> tuple[float, float]:
    if x.numel() < 2:
        return 0.0, 1.0
    data = x.detach().double()
    std = data.std().item()
    return data.mean().item(), std if std > 0 else 1.0


def input_sets(example: tuple, n_random: int = 2, other_batch: int | None = None) -> list[tuple]:
    """The example inputs, `n_random` fresh sets of the same shapes, and one set at
    `other_batch` when given."""
    sets = [example] + [random_like(example, seed) for seed in range(n_random)]
    if other_batch is not None:
        sets.append(random_like(example, n_random, batch=other_batch))
    return sets


def outputs(fn: Callable, inputs: Sequence[tuple]) -> list:
    """`fn`'s outputs on every input set, copied: a later in-place edit of a tensor `fn` reads
    (a weight it returns, say) cannot reach them. `fn` runs on copies of the inputs, so a model
    that writes into its input sees the same input every time."""
    with torch.no_grad():
        return [_copy(fn(*_copy(args))) for args in inputs]


def check_against(
    expected: Sequence,
    candidate: Callable,
    inputs: Sequence[tuple],
    rtol: float | None = None,
    atol: float | None = None,
) -> tuple[float, list]:
    """`check_equivalent` against outputs computed earlier (`outputs`): run `candidate` on every
    input set, compare with `expected`, stop at the first mismatch (VerificationError). Returns
    the worst absolute error and the candidate's outputs, copied, to check the next graph
    against."""
    worst, found = 0.0, []
    with torch.no_grad():
        for i, (args, reference) in enumerate(zip(inputs, expected, strict=True)):
            actual = _copy(candidate(*_copy(args)))
            try:
                worst = max(worst, max_error(reference, actual, rtol, atol))
            except VerificationError as error:
                raise VerificationError(f"input set {i}: {error}") from None
            found.append(actual)
    return worst, found


def _copy(output):
    return pytree.tree_map(
        lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, output
    )


def check_equivalent(
    reference: Callable,
    candidate: Callable,
    inputs: Sequence[tuple],
    rtol: float | None = None,
    atol: float | None = None,
) -> float:
    """Run both on every input set; return the worst absolute error, raise on a mismatch."""
    return check_against(outputs(reference, inputs), candidate, inputs, rtol, atol)[0]


check = check_equivalent  # its name before fxopt.testing.check (check_pass's module) took it
