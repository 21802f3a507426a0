"""The optimization report: what each pass did, how long it took, the error it introduced, and
the model's ops, parameters and FLOPs before and after."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .analysis.cost import Stats


@dataclass
class PassRecord:
    name: str
    status: str  # "applied" | "no change" | "rolled back" | "failed"
    applied: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # the pass's own time: rewriting the graph
    verify_seconds: float = 0.0  # checking it against the graph before it (and rolling back)
    max_error: float | None = None
    message: str | None = None
    declined: dict[str, list[str]] = field(default_factory=dict)  # rule -> "node: reason"
    exact: bool = True  # False for an approximate pass (run only with approximate=True)
    # approximate passes: input set ("example", "random") -> {"max_abs": ..., "rel_l2": ...}
    error: dict[str, dict[str, float]] = field(default_factory=dict)
    summary: dict[str, object] = field(default_factory=dict)  # the pass's own account


@dataclass
class Report:
    model: str
    backend: str
    capture: str = "torch.export"  # or "dynamo fallback"
    dynamic_batch: bool = False
    notes: list[str] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    before: Stats | None = None
    after: Stats | None = None
    final_error: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # capture, passes, verify, total
    calibration: list[dict] = field(default_factory=list)  # one entry per fxopt.calibrate call

    def add_run(self, records: list[PassRecord]) -> None:
        """Add one pipeline run; a further run (another Dynamo graph) adds into the same rows."""
        if [p.name for p in self.passes] != [r.name for r in records]:
            self.passes.extend(records)
            return
        for old, new in zip(self.passes, records, strict=True):
            for rule, count in new.applied.items():
                old.applied[rule] = old.applied.get(rule, 0) + count
            for rule, misses in new.declined.items():
                known = old.declined.setdefault(rule, [])
                known += [m for m in misses if m not in known]
            old.seconds += new.seconds
            old.verify_seconds += new.verify_seconds
            old.max_error = _max(old.max_error, new.max_error)
            for key, error in new.error.items():
                known_error = old.error.setdefault(key, dict(error))
                for k, v in error.items():
                    known_error[k] = max(known_error.get(k, v), v)
            old.summary.update(new.summary)
            if new.status != "no change" and old.status in ("no change", "applied"):
                old.status, old.message = new.status, new.message

    @property
    def rolled_back(self) -> list[str]:
        return [p.name for p in self.passes if p.status in ("rolled back", "failed")]

    def to_dict(self) -> dict:
        return asdict(self)

    def explain(self) -> str:
        """The near-misses of each pass: per rule, the matches its check or build declined,
        grouped by reason (what ``fxopt optimize --explain`` prints)."""
        return "\n".join(_render_near_misses(self))

    def __str__(self) -> str:
        return "\n".join(_render(self))


def _max(a: float | None, b: float | None) -> float | None:
    values = [v for v in (a, b) if v is not None]
    return max(values) if values else None


def _render(r: Report) -> list[str]:
    batch = "dynamic batch" if r.dynamic_batch else "static batch"
    lines = [f"fxopt report: {r.model}  (backend {r.backend}, {r.capture}, {batch})"]
    lines += [f"  note: {n}" for n in r.notes]
    lines += [f"  graph break: {b}" for b in r.graph_breaks]
    w = max([22, *(len(p.name) for p in r.passes)])
    columns = (
        f"{'status':<12} {'rewrite':>8} {'verify':>8} {'max err':>9} {'declined':>8}  rules fired"
    )
    header = f"  {'pass':<{w}} {columns}"
    lines += ["", header]
    for p in r.passes:
        fired = ", ".join(f"{k} x{v}" for k, v in p.applied.items()) or "-"
        err = "-" if p.max_error is None else f"{p.max_error:.1e}"
        misses = sum(len(m) for m in p.declined.values()) or "-"
        time_ms = f"{_ms(p.seconds)} {_ms(p.verify_seconds)}"
        lines.append(f"  {p.name:<{w}} {p.status:<12} {time_ms} {err:>9} {misses:>8}  {fired}")
        if p.message:
            lines.append(f"  {'':<{w}} {p.message}")
        if not p.exact and (p.error or p.summary):
            lines.append(f"  {'':<{w}} approximate: {_describe_approximation(p)}")
    if r.before and r.after:
        lines += ["", *_render_stats(r.before, r.after)]
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in r.seconds.items())
    err = "-" if r.final_error is None else f"{r.final_error:.1e}"
    lines += ["", f"  end-to-end max error vs eager: {err};  {timing}"]
    for c in r.calibration:
        lines.append(f"  calibration: {_describe_calibration(c)}")
    return lines


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:>6.1f}ms" if seconds else f"{'-':>8}"


def _describe_approximation(p: PassRecord) -> str:
    parts = [
        f"{key} max abs {e['max_abs']:.1e}, rel L2 {e['rel_l2']:.1e}" for key, e in p.error.items()
    ]
    parts += [f"{k} {_short(v)}" for k, v in p.summary.items()]
    return "; ".join(parts)


def _describe_calibration(c: dict) -> str:
    text = f"{c['steps']} steps, {c['parameters']} parameters"
    for key in ("inputs", "held_out"):
        if c.get(key):
            e = c[key]
            text += f"; {key} rel L2 {e['before']:.2e} -> {e['after']:.2e}"
    return text


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _render_stats(before: Stats, after: Stats) -> list[str]:
    lines = [f"  {'':<36} {'before':>12} {'after':>12}"]
    lines.append(f"  {'parameters':<36} {before.params:>12,} {after.params:>12,}")
    lines.append(
        f"  {'MFLOPs (example batch)':<36} {before.flops / 1e6:>12.2f} {after.flops / 1e6:>12.2f}"
    )
    for op in sorted(set(before.op_counts) | set(after.op_counts)):
        b, a = before.op_counts.get(op, 0), after.op_counts.get(op, 0)
        mark = "" if a == b else "  *"
        label = op.replace("::", ".") if "::" in op else f"aten.{op}"  # fxopt::dw_pw_block
        lines.append(f"  {label:<36} {b:>12} {a:>12}{mark}")
    return lines


def _render_near_misses(r: Report, shown: int = 4) -> list[str]:
    lines = [f"near-misses: {r.model}  (a rule's pattern matched, its check or build declined)"]
    for p in r.passes:
        if not p.declined:
            continue
        lines.append(f"  {p.name}")
        for rule, misses in p.declined.items():
            by_reason: dict[str, list[str]] = {}
            for miss in misses:
                node, _, reason = miss.partition(": ")
                by_reason.setdefault(reason, []).append(node)
            for reason, nodes in by_reason.items():
                more = f", ... ({len(nodes) - shown} more)" if len(nodes) > shown else ""
                lines.append(f"    {rule}: {reason}  x{len(nodes)}")
                lines.append(f"      at {', '.join(nodes[:shown])}{more}")
    if len(lines) == 1:
        lines.append("  none: every match of every rule fired")
    return lines
