"""The default pipeline, and the loop that runs passes with verification and rollback."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from torch import fx

from .errors import InputError, VerificationError
from .graph import clean, snapshot
from .registry import get_pass
from .report import PassRecord, Report
from .verify import check

log = logging.getLogger("fxopt")

DEFAULT_PIPELINE = (
    "remove_noops",  # dropout, identity, clone and no-op views hide patterns from later passes
    "fold_constants",  # weights computed from weights become plain constants
    "fold_conv_bn",  # eval batch norm after a conv becomes the conv's weight and bias
    "fold_linear_bn",  # the same for linear layers, on either side
    "fold_bn_into_next",  # a norm before a 1x1 or unpadded conv moves into that conv
    "merge_parallel_convs",  # a sum of linear branches of one input is one conv (RepVGG family)
    "merge_sequential_convs",  # conv -> conv, linear -> linear, adapters: one op, if not costlier
    "merge_conv_into_linear",  # conv branches on a fixed H x W input join the FC (RepMLP)
    "fold_channel_affine",  # layer scale and x*a+b after conv/linear join the weights
    "merge_channel_branches",  # split -> depthwise convs -> cat: one depthwise conv, if cheaper
    "fuse_horizontal",  # sibling linears/convs on one input become one wider op (q, k, v)
    "remove_noops",  # folding leaves inverse transposes and dead copies next to each other
)


def resolve(passes: Sequence[str] | None, approximate: bool) -> list[str]:
    """Pass names to run: the default pipeline or the user's list, exactness checked."""
    names = list(DEFAULT_PIPELINE if passes is None else passes)
    for name in names:
        info = get_pass(name if isinstance(name, str) else getattr(name, "pass_name", ""))
        if not info.exact and not approximate:
            raise InputError(
                f"pass {info.name!r} is approximate (its result is not output-equivalent); "
                "pass approximate=True to run it"
            )
    return [n if isinstance(n, str) else n.pass_name for n in names]


def run_passes(
    gm: fx.GraphModule,
    names: Sequence[str],
    inputs: Sequence[tuple],
    report: Report,
    verify: bool = True,
) -> fx.GraphModule:
    """Run each pass on `gm`; with `verify`, check it against the graph before it on `inputs`
    and roll it back when it fails. Returns the final graph module."""
    records = []
    for name in names:
        info = get_pass(name)
        before = snapshot(gm) if verify else None
        start = time.perf_counter()
        record = PassRecord(name, "no change")
        try:
            result = info.fn(gm)
            gm = clean(result.graph_module)
            record.applied = {k: v for k, v in result.applied.items() if v}
            declined = getattr(result, "declined", None) or {}
            record.declined = {rule: list(misses) for rule, misses in declined.items() if misses}
            record.status = "applied" if result.modified else "no change"
            if verify and result.modified:
                record.max_error = check(before, gm, inputs)
        except Exception as error:  # a failing pass is rolled back, never fatal
            record.status = "rolled back" if isinstance(error, VerificationError) else "failed"
            record.message = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            log.warning("fxopt: pass %s %s: %s", name, record.status, record.message)
            if before is None:
                raise
            gm = before
        record.seconds = time.perf_counter() - start
        records.append(record)
    report.add_run(records)
    return gm
