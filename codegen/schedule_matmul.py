"""Recognize a dense matmul (`linear`, `matmul`, batched or not) and schedule it for CPU.

The legalized form is one reduction block `C[..., i, j] += A[..., i, k] * B[..., k, j]` with the
fused epilogue (bias, activation) after it. dlight's CPU rules cover only GEMV, so without this a
linear layer runs as a scalar triple loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxopt.codegen import tvm_api as tv
from fxopt.codegen.schedule_conv import (
    REDUCE,
    SPATIAL,
    accumulate_locally,
    is_var,
    largest_divisor,
    multiply_accumulate,
    only_reduction,
)


@dataclass(frozen=True)
class Matmul:
    """What the schedule needs to know about one recognized matmul block."""

    block: str
    columns: int  # the extent of j, the vectorized axis
    rows: object  # the extent of i: an int, or a symbolic expression (dynamic batch)


def analyze_matmul(sch, block_rv) -> Matmul | None:
    """Return the matmul `block_rv` computes, or None when B is not indexed `[..., k, j]`."""
    block = sch.get(block_rv)
    iters = list(block.iter_vars)
    kinds = [int(iv.iter_type) for iv in iters]
    if len(kinds) < 3 or kinds != [SPATIAL] * (len(kinds) - 1) + [REDUCE] or block.init is None:
        return None
    loads = multiply_accumulate(block)
    if loads is None or not isinstance(iters[-2].dom.extent, tv.tirx.IntImm):
        return None
    spatial, k = [iv.var for iv in iters[:-1]], iters[-1].var
    i, j = spatial[-2], spatial[-1]
    if not all(map(is_var, block.body.indices, spatial)) or len(block.body.indices) != len(spatial):
        return None
    rhs = [ld for ld in loads if len(ld.indices) >= 2 and is_var(ld.indices[-2], k)]
    lhs = [ld for ld in loads if len(ld.indices) >= 2 and is_var(ld.indices[-1], k)]
    if len(rhs) != 1 or len(lhs) != 1 or not is_var(rhs[0].indices[-1], j):
        return None
    if not is_var(lhs[0].indices[-2], i):
        return None
    return Matmul(block.name_hint, int(iters[-2].dom.extent), iters[-3].dom.extent)


def _row_tile(rows, limit: int = 4) -> int:
    """The largest row tile up to `limit` that provably divides `rows` (symbolic or not)."""
    if isinstance(rows, tv.tirx.IntImm):
        return largest_divisor(int(rows), limit)
    analyzer = tv.tvm.sym.Analyzer()  # `tvm.arith` in TVM < 0.27
    for tile in range(limit, 1, -1):
        if analyzer.can_prove(tv.tirx.floormod(rows, tile) == 0):
            return tile
    return 1


def find_matmul(sch):
    """Return (block, matmul) when the function holds exactly one reduction, and it is a matmul."""
    block = only_reduction(sch)
    matmul = None if block is None else analyze_matmul(sch, block)
    return None if matmul is None else (block, matmul)


def schedule_cpu(sch, block_rv, matmul: Matmul, lanes: int) -> None:
    """Register-tile rows x (a few vectors of columns), k inside, the epilogue at the tile."""
    epilogue = accumulate_locally(sch, block_rv)
    *batch, i, j, k = sch.get_loops(block_rv)
    tile_j = largest_divisor(matmul.columns, 4 * lanes)
    io, ii = sch.split(i, [None, _row_tile(matmul.rows)])
    jo, ji = sch.split(j, [None, tile_j])
    sch.reorder(io, jo, k, ii, ji)
    sch.parallel(sch.fuse(*batch, io))
    sch.unroll(ii)
    sch.vectorize(ji)
    sch.reverse_compute_at(epilogue, jo, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(epilogue)[-1])
    init = sch.decompose_reduction(block_rv, k)
    sch.vectorize(sch.get_loops(init)[-1])
