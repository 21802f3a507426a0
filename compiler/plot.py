"""`fxopt bench --plot FILE.png`: the speed-ups of a bench run as grouped bars, one group per
model and one bar per candidate, against eager's 1.0. Needs matplotlib (``pip install
'fxopt[plot]'``); `require_matplotlib` says so before any timing starts."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

from .bench import Row
from .ir.errors import InputError

MISSING = "fxopt bench --plot needs matplotlib: pip install 'fxopt[plot]' (or matplotlib)"


def require_matplotlib() -> None:
    """InputError when matplotlib cannot be imported."""
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError(MISSING)


def speedups(rows: Sequence[Row]) -> tuple[list[str], dict[str, list[float]]]:
    """The models in row order, and for each candidate but eager its speed-up per model (NaN
    where it has none: it failed, or was not run for that model)."""
    models = list(dict.fromkeys(r.model for r in rows))
    candidates = list(dict.fromkeys(r.candidate for r in rows if r.candidate != "eager"))
    found = {(r.model, r.candidate): r.speedup for r in rows}
    table = {
        c: [math.nan if found.get((m, c)) is None else found[(m, c)] for m in models]
        for c in candidates
    }
    return models, table


def plot(rows: Sequence[Row], path: Path) -> Path:
    """Draw the speed-ups of `rows` (from `fxopt.bench.bench`) into the image file `path`."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot

    models, table = speedups(rows)
    if not models or not table:
        raise InputError("nothing to plot: the bench has no candidate besides eager")
    first = rows[0]
    width = 0.8 / len(table)
    width_in = min(14.0, max(6.0, 0.45 * len(models) * (len(table) + 1) + 1))
    figure, axes = pyplot.subplots(figsize=(width_in, 4.5))
    for k, (candidate, values) in enumerate(table.items()):
        offsets = [i + (k - (len(table) - 1) / 2) * width for i in range(len(models))]
        bars = axes.bar(
            offsets, [0 if math.isnan(v) else v for v in values], width, label=candidate
        )
        for bar, value in zip(bars, values, strict=True):
            text = "n/a" if math.isnan(value) else f"{value:.2f}"
            axes.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="eager")
    axes.set_xticks(range(len(models)), [m.split(":")[-1] for m in models], rotation=20)
    axes.set_ylabel("speed-up over eager (median)")
    axes.set_title(
        f"fxopt bench: batch {first.batch}, {first.dtype}, {first.threads} thread(s), "
        f"{first.device}; higher is faster",
        fontsize=10,
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return Path(path)
