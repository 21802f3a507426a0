"""Schedules fxopt owns for the TIR functions TVM leaves unscheduled (convolutions first).

`apply(mod, target)` is called by the lowering pipeline after legalization and fusion, before
the generic (dlight) rules and `tvm.compile`. It schedules, per PrimFunc:

- a 2-D NCHW convolution (any stride, padding, dilation; dense, grouped or depthwise) with its
  fused epilogue, on llvm and cuda (`schedule_conv`);
- a dense matmul / linear (`C[..., i, j] += A[..., i, k] * B[..., k, j]`) on llvm
  (`schedule_matmul`); dlight's Matmul and GEMV rules cover it on GPUs.

Functions it does not recognize, and functions whose schedule fails, are returned unchanged (the
failure is logged at debug level) and left to dlight. Scheduled functions carry
`tirx.is_scheduled`, so dlight leaves them alone.
"""

from __future__ import annotations

import logging

from fxopt.codegen import schedule_conv, schedule_matmul
from fxopt.codegen import tvm_api as tv

log = logging.getLogger(__name__)


def _vector_lanes(target) -> int:
    """float32 lanes of the target's widest vector register (4 when unknown)."""
    has = tv.tvm.target.codegen.llvm_cpu_has_features
    for feature, lanes in (("avx512f", 16), ("avx2", 8)):
        if has([feature], target):
            return lanes
    return 4


def schedule_func(func, target):
    """Return `func` scheduled for `target`, or None when no fxopt schedule applies."""
    sch = tv.s_tir.Schedule(func)
    kind = target.kind.name
    conv = schedule_conv.find_conv(sch)
    if conv is not None and kind == "llvm":
        schedule_conv.schedule_cpu(sch, *conv, _vector_lanes(target))
    elif conv is not None and kind == "cuda":
        schedule_conv.schedule_gpu(sch, *conv)
    elif kind == "llvm" and (matmul := schedule_matmul.find_matmul(sch)) is not None:
        schedule_matmul.schedule_cpu(sch, *matmul, _vector_lanes(target))
    else:
        return None  # dlight's GPU rules cover matmuls
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def apply(mod, target):
    """Return a copy of `mod` with fxopt's schedules applied to the functions they recognize.

    Parameters
    ----------
    mod : tvm.IRModule
        A legalized and fused Relax module.
    target : tvm.target.Target, dict or str
        The target to schedule for (`llvm` or `cuda`, as `tv.make_target` reads it); other
        kinds leave `mod` unchanged.
    """
    target = tv.make_target(target)
    scheduled = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tv.tirx.PrimFunc) or "tirx.is_scheduled" in func.attrs:
            continue
        try:
            result = schedule_func(func, target)
        except Exception as err:  # noqa: BLE001 - TVM reports schedule failures as many types
            log.debug("fxopt schedule failed for %s, left to TVM: %s", gv.name_hint, err)
            continue
        if result is not None:
            scheduled[gv] = result
    return tv.with_functions(mod, scheduled)
