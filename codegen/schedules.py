"""Schedules fxopt owns for the TIR functions TVM leaves unscheduled (convolutions first).

`apply(mod, target)` is called by the lowering pipeline after legalization and fusion, before
the generic (dlight) rules and `tvm.compile`.
"""

from __future__ import annotations


def apply(mod, target):
    """Return `mod` with fxopt's schedules applied to the functions they recognize."""
    return mod
