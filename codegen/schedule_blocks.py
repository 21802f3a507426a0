"""Schedules for the fused-block PrimFuncs of `fxopt.codegen.block_converters` (attribute
`fxopt.block`).

One spatial tile of the block's output per loop iteration (CPU) or thread block (GPU): the dw
output of the tile, for all channels, stays in a small local (CPU) or shared-memory (GPU) buffer
that the 1x1 conv reads, so the intermediate never goes to main memory and the whole block is one
kernel. The tile sizes were chosen at conversion time (`fxopt.ir.block_ops.tile_for`) and are read
from the function attributes `fxopt.tile` (CPU) and `fxopt.gpu_tile` (GPU: whole tiles only, since a
partial tile makes TVM bound the halo of a border tile by the whole map).
"""

from __future__ import annotations

from fxopt.codegen import tvm_api as tv

BLOCK_ATTR = "fxopt.block"
SCHEDULED_ATTR = "fxopt.block_scheduled"  # the target kind a block function was scheduled for
THREADS = 128  # GPU threads per block; a tile's (channel, pixel) work is spread over them
# CPU: output channels whose row of the tile accumulates in registers at once, so each
# vector of the dw tile loaded feeds that many FMAs.
OUT_CHANNEL_BLOCK = 8


def schedule(mod, target):
    """Return a copy of `mod` with every `fxopt.block` PrimFunc scheduled for `target` (a
    `Target`, dict or str) and marked `tirx.is_scheduled`; `mod` itself is left as it is."""
    target = tv.make_target(target)
    schedule_target = schedule_gpu if tv.is_gpu(target) else schedule_cpu
    scheduled = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tv.tirx.PrimFunc) or BLOCK_ATTR not in func.attrs:
            continue
        if "tirx.is_scheduled" in func.attrs:
            continue
        sch = tv.s_tir.Schedule(func)
        tile = func.attrs["fxopt.gpu_tile" if tv.is_gpu(target) else "fxopt.tile"]
        schedule_target(sch, tuple(int(t) for t in tile))
        func = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        scheduled[gvar] = func.with_attr(SCHEDULED_ATTR, target.kind.name)
    return tv.with_functions(mod, scheduled)


def _has(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # noqa: BLE001  (TVM raises its own ScheduleError types)
        return False
    return True


def _tile_output(sch, tile):
    """Split the last block's rows/columns into tiles: (tile loop parts, inner loops)."""
    last = "residual" if _has(sch, "residual") else "pw_act"
    n, f, y, x = sch.get_loops(last)
    yo, yi = sch.split(y, [None, tile[0]])
    xo, xi = sch.split(x, [None, tile[1]])
    sch.reorder(n, yo, xo, f, yi, xi)
    return last, (n, yo, xo), (f, yi, xi)


def _inline_epilogue(sch) -> None:
    if _has(sch, "residual"):
        sch.compute_inline("pw_act")


def schedule_cpu(sch, tile) -> None:
    """One tile per iteration of a parallel loop. Per channel, the padded dw input and the dw
    output of the tile live in small local buffers, the activated dw output of all channels in
    one tile-sized buffer that the 1x1 conv reads (an inverted residual's expanded input tile,
    with its halo, likewise); reductions run outside the vectorized columns."""
    _inline_epilogue(sch)
    last, (n, yo, xo), (f, yi, xi) = _tile_output(sch, tile)
    fo, fi = sch.split(f, [None, OUT_CHANNEL_BLOCK])
    sch.reorder(fo, yi, fi, xi)
    sch.compute_at("pw", yi, preserve_unit_loops=True)
    inverted = _has(sch, "expand")
    sch.compute_at("mid", xo, preserve_unit_loops=True)
    channel_loop = sch.get_loops("mid")[-3]
    sch.compute_at("dw", channel_loop, preserve_unit_loops=True)
    if inverted:  # the expanded tile for all channels, computed a channel at a time
        sch.compute_at("pad", xo, preserve_unit_loops=True)
        sch.compute_at("expand", sch.get_loops("pad")[-3], preserve_unit_loops=True)
        sch.compute_at("x_pad", xo, preserve_unit_loops=True)
    else:  # the padded input of one channel
        sch.compute_at("pad", channel_loop, preserve_unit_loops=True)
    for elementwise in ("mid", "pad"):
        sch.vectorize(sch.get_loops(elementwise)[-1])
    sch.parallel(sch.fuse(n, yo, xo))
    sch.vectorize(xi)
    f_loop, row, col, rc = sch.get_loops("pw")[-4:]
    sch.reorder(rc, f_loop, row, col)
    sch.unroll(f_loop)
    sch.vectorize(col)
    reductions = [(b, axes) for b, axes in (("dw", 2), ("expand", 1)) if _has(sch, b)]
    for block, axes in reductions:
        _reduce_outside_columns(sch, block, axes)
    sch.decompose_reduction("pw", rc)
    for block, axes in reductions:
        sch.decompose_reduction(block, sch.get_loops(block)[-2 - axes])


def _reduce_outside_columns(sch, block: str, axes: int) -> None:
    """Move a reduction's `axes` loops outside its tile's rows and columns and vectorize the
    columns (a reduction that accumulates whole rows of registers)."""
    loops = sch.get_loops(block)
    rows, cols, reduce = loops[-2 - axes], loops[-1 - axes], loops[-axes:]
    sch.reorder(*reduce, rows, cols)
    sch.vectorize(cols)


def schedule_gpu(sch, tile) -> None:
    """One thread block per output tile; the tile's activated dw output (and for an inverted
    residual its expanded, activated and zero-padded input) live in shared memory; threads
    cover (channel, pixel) pairs."""
    expand = _has(sch, "expand")
    sch.compute_inline("x_pad" if expand else "pad")
    _inline_epilogue(sch)
    last, (n, yo, xo), (f, yi, xi) = _tile_output(sch, tile)
    block_loop = sch.fuse(n, yo, xo)
    sch.bind(block_loop, "blockIdx.x")
    _bind_threads(sch, sch.fuse(f, yi, xi))
    sch.compute_at("pw", sch.get_loops(last)[-1], preserve_unit_loops=True)
    sch.set_scope("pw", 0, "local")
    stages = [("mid", "dw")] + ([("pad", "expand")] if expand else [])
    for elementwise, reduction in stages:
        sch.compute_at(elementwise, block_loop, preserve_unit_loops=True)
        loops = sch.get_loops(elementwise)[1:]
        _bind_threads(sch, sch.fuse(*loops))
        sch.set_scope(elementwise, 0, "shared")
        sch.compute_at(reduction, sch.get_loops(elementwise)[-1], preserve_unit_loops=True)
        sch.set_scope(reduction, 0, "local")


def _bind_threads(sch, loop) -> None:
    _, inner = sch.split(loop, [None, THREADS])
    sch.bind(inner, "threadIdx.x")
