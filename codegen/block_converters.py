"""Relax converters for the fused-block ops `fuse_blocks` puts in the fx graph.

`CONVERTERS` maps an ATen-level op name to a converter for `from_exported_program`'s
`custom_convert_map`. Each converter emits one `call_tir` of a TE PrimFunc (pad, dw conv, its
bias and activation, the 1x1 conv, its bias and activation, and for an inverted residual the 1x1
expand before and the residual add after) tagged with the function attribute `fxopt.block`.
Its `op_pattern` is opaque, so FuseOps leaves the call alone (FuseTIR would drop the tag). After
FuseTIR the lowering calls `schedule(mod, target)` (`fxopt.codegen.schedule_blocks`), which
schedules every tagged function so that one spatial tile of the output is computed by one loop
iteration (CPU) or thread block (GPU), and sets `tirx.is_scheduled`, which dlight and
`fxopt.codegen.schedules` skip.
"""

from __future__ import annotations

import math
import re

from fxopt.codegen import tvm_api as tv
from fxopt.codegen.schedule_blocks import BLOCK_ATTR, schedule
from fxopt.ir.block_ops import CPU_ON_CHIP_BYTES, DW_PW_BLOCK, PW_DW_PW_BLOCK, TILES, tile_for

OPAQUE = 8  # relax OpPatternKind kOpaque


def _activation(value, name: str, dtype: str):
    """The TIR expression of activation `name` (a key of `fxopt.ir.block_ops.ACTIVATIONS`)."""
    tirx = tv.tirx

    def const(number):
        return tirx.const(number, dtype)

    if name == "none":
        return value
    if name == "relu":
        return tirx.max(value, const(0))
    if name == "relu6":
        return tirx.min(tirx.max(value, const(0)), const(6))
    if name == "gelu":
        return const(0.5) * value * (const(1) + tirx.erf(value * const(math.sqrt(0.5))))
    if name == "gelu_tanh":
        inner = const(math.sqrt(2 / math.pi)) * (value + const(0.044715) * value * value * value)
        return const(0.5) * value * (const(1) + tirx.tanh(inner))
    if name == "silu":
        return value * tirx.sigmoid(value)
    if name == "hardswish":
        return value * tirx.min(tirx.max(value + const(3), const(0)), const(6)) / const(6)
    raise ValueError(f"fxopt.codegen.block_converters: no TIR form for activation {name!r}")


def _pointwise(x, weight, name: str):
    """1x1 conv as a reduction `name` (no bias)."""
    te = tv.te
    n, _, h, w = x.shape
    rc = te.reduce_axis((0, x.shape[1]), name="rc")
    return te.compute(
        (n, weight.shape[0], h, w),
        lambda b, f, i, j: te.sum(x[b, rc, i, j] * weight[f, rc, 0, 0], axis=rc),
        name=name,
    )


def _epilogue(acc, bias, act: str, name: str, inside=None):
    """act(acc + bias), and zero where `inside(i, j)` is false (padding after the act)."""
    tirx = tv.tirx

    def value(b, f, i, j):
        v = acc[b, f, i, j] if bias is None else acc[b, f, i, j] + bias[f]
        v = _activation(v, act, acc.dtype)
        zero = tirx.const(0, acc.dtype)
        return v if inside is None else tirx.if_then_else(inside(i, j), v, zero)

    return tv.te.compute(acc.shape, value, name=name)


def _pad(x, padding, name: str):
    """x zero-padded by `padding` on both sides of H and W, and the padded map's `inside`."""
    tirx, (ph, pw), (h, w) = tv.tirx, padding, x.shape[2:]

    def inside(i, j):
        return tirx.all(i >= ph, i < h + ph, j >= pw, j < w + pw)

    def padded(b, c, i, j):
        return tirx.if_then_else(inside(i, j), x[b, c, i - ph, j - pw], tirx.const(0, x.dtype))

    n, c = x.shape[:2]
    return tv.te.compute((n, c, h + 2 * ph, w + 2 * pw), padded, name=name), inside


def _depthwise(pad, weight, bias, stride, dilation, act: str, out_size):
    """Depthwise conv `dw` of the zero-padded `pad`, and its bias and activation `mid`."""
    te = tv.te
    kh, kw = (int(k) for k in weight.shape[2:])
    (sh, sw), (dh, dw) = stride, dilation
    ry, rx = te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, kw), name="rx")
    acc = te.compute(
        (*pad.shape[:2], *out_size),
        lambda b, c, i, j: te.sum(
            pad[b, c, i * sh + ry * dh, j * sw + rx * dw] * weight[c, 0, ry, rx], axis=[ry, rx]
        ),
        name="dw",
    )
    return _epilogue(acc, bias, act, "mid")


def _out_size(size, kernel, stride, padding, dilation):
    return tuple(
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip(size, kernel, stride, padding, dilation, strict=True)
    )


def dw_pw_compute(x, dw_w, dw_b, pw_w, pw_b, stride, padding, dilation, act_mid, act_out):
    """TE for act_out(pw(act_mid(dw(x)))); the biases may be None. Blocks: pad, dw, mid, pw,
    pw_act."""
    out_size = _out_size(x.shape[2:], dw_w.shape[2:], stride, padding, dilation)
    pad, _ = _pad(x, padding, "pad")
    mid = _depthwise(pad, dw_w, dw_b, stride, dilation, act_mid, out_size)
    return _epilogue(_pointwise(mid, pw_w, "pw"), pw_b, act_out, "pw_act")


def pw_dw_pw_compute(x, e_w, e_b, dw_w, dw_b, p_w, p_b, stride, padding, dilation, *acts, residual):
    """TE for the inverted residual; `acts` = (act_expand, act_mid, act_out). Blocks: x_pad,
    expand (over the padded map, so a tile's halo is a plain box), pad (its bias and activation,
    zero on the border), dw, mid, pw, pw_act (and residual)."""
    out_size = _out_size(x.shape[2:], dw_w.shape[2:], stride, padding, dilation)
    x_pad, inside = _pad(x, padding, "x_pad")
    pad = _epilogue(_pointwise(x_pad, e_w, "expand"), e_b, acts[0], "pad", inside)
    mid = _depthwise(pad, dw_w, dw_b, stride, dilation, acts[1], out_size)
    out = _epilogue(_pointwise(mid, p_w, "pw"), p_b, acts[2], "pw_act")
    if not residual:
        return out
    return tv.te.compute(out.shape, lambda *i: x(*i) + out(*i), name="residual")


def _convert(node, importer, compute, n_weights: int):
    """Emit `compute` for `node` as one tagged `call_tir`; None weights become absent biases."""
    args = importer.retrieve_args(node)
    tensors = args[: 1 + n_weights]
    present = [t for t in tensors if t is not None]
    slots = [t is not None for t in tensors]
    rest = args[1 + n_weights :]
    dw = node.args[1 + (2 if n_weights == 6 else 0)].meta["val"]
    kind = node.target.__name__.split(".")[0]

    def fn(*given):
        it = iter(given)
        full = [next(it) if used else None for used in slots]
        return compute(*full, *rest)

    shape = (dw.shape[0], tuple(dw.shape[2:]), rest[0], rest[2], n_weights == 6)
    out_size = tuple(node.meta["val"].shape[2:])
    attrs = {
        BLOCK_ATTR: kind,
        "op_pattern": OPAQUE,  # FuseOps must not fold neighbours in (FuseTIR drops the tags)
        "fxopt.tile": list(_cpu_tile(shape, out_size)),
        "fxopt.gpu_tile": list(tile_for(*shape, out_size, exact=True) or (1, 1)),
    }
    return importer.block_builder.emit_te(
        fn, *present, primfunc_name_hint=f"fxopt_{kind}", primfunc_attrs=attrs
    )


def _cpu_tile(shape: tuple, out_size) -> tuple[int, int]:
    """The CPU tile: within `CPU_ON_CHIP_BYTES`; for kernels wider than 3 at most 8 columns
    (one vector), since each of the k x k taps then costs a vector op per 8 columns (measured:
    16 and 14 wide tiles win at 3x3, lose at 7x7)."""
    tiles = TILES if shape[1][1] <= 3 else tuple(t for t in TILES if t[1] <= 8)
    return tile_for(*shape, out_size, budget=CPU_ON_CHIP_BYTES, tiles=tiles) or (2, 2)


def convert_dw_pw(node, importer):
    """Converter for `fxopt::dw_pw_block` (for `custom_convert_map`)."""
    return _convert(node, importer, dw_pw_compute, 4)


def convert_pw_dw_pw(node, importer):
    """Converter for `fxopt::pw_dw_pw_block` (for `custom_convert_map`)."""

    def compute(*args):
        return pw_dw_pw_compute(*args[:-1], residual=args[-1])

    return _convert(node, importer, compute, 6)


CONVERTERS: dict = {
    DW_PW_BLOCK.__name__: convert_dw_pw,
    PW_DW_PW_BLOCK.__name__: convert_pw_dw_pw,
}


def kernel_names(source: str) -> set[str]:
    """The distinct `__global__` kernels a generated CUDA source declares or defines."""
    return set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)", source))


def block_kernel_count(source: str) -> int:
    """How many distinct `__global__` kernels a generated CUDA source declares or defines."""
    return len(kernel_names(source))


__all__ = ["BLOCK_ATTR", "CONVERTERS", "block_kernel_count", "kernel_names", "schedule"]
