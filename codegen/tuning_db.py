"""The tuning database: the JSON file `fxopt tune` (`fxopt.tune`) writes into its work
directory, and `apply_database`, which builds (`lower.lower`) use to take the tuned schedules.

Per function it holds the structural hash, TVMScript, target, best latency, fxopt's own latency
and the schedule trace (TVM 0.27's own JSONDatabase cannot be used, its serializer crashes on
TIR).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..ir.errors import InputError
from . import tvm_api as tv

DATABASE_FILE = "tuning_records.json"
DATABASE_FORMAT = 1


def check_database(path) -> Path:
    """`path` as a Path when it is a directory holding a tuning database fxopt can read, else
    InputError."""
    path = Path(path)
    if not (path / DATABASE_FILE).is_file():
        where = "does not exist" if not path.exists() else f"has no {DATABASE_FILE}"
        raise InputError(
            f"tuning database {str(path)!r} {where}; create one with `fxopt tune MODEL "
            f"--work-dir {path}` or fxopt.tune.tune(model, inputs, work_dir=...)"
        )
    load_records(path)
    return path


def save_records(work_dir: Path, target, records, baselines: dict) -> None:
    """Merge the best record of every workload into `work_dir`'s database file, with the
    latency of fxopt's own schedule of it (`baselines`, by workload key)."""
    stored = {
        (r["key"], json.dumps(r["target"], sort_keys=True)): r for r in load_records(work_dir)
    }
    for record in records:
        if not record.run_secs:
            continue
        seconds = sum(float(s) for s in record.run_secs) / len(record.run_secs)
        if seconds >= 1e9:  # MetaSchedule's mark of a failed run
            continue
        workload = record.workload.mod
        key = tv.workload_key(workload)
        entry = {
            "key": key,
            "target": tv.target_key(target),
            "seconds": seconds,
            "fxopt_seconds": baselines.get(key),
            "trace": tv.plain(record.trace.as_json(remove_postproc=False)),
            "workload": workload.script(),
        }
        slot = (entry["key"], json.dumps(entry["target"], sort_keys=True))
        if slot not in stored or seconds < stored[slot]["seconds"]:
            stored[slot] = entry
    data = {"format": DATABASE_FORMAT, "records": list(stored.values())}
    (work_dir / DATABASE_FILE).write_text(json.dumps(data, indent=1) + "\n")


def load_records(work_dir: Path) -> list[dict]:
    path = Path(work_dir) / DATABASE_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        if data.get("format") != DATABASE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {DATABASE_FORMAT}")
        return list(data["records"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(
            f"{str(path)!r} is not a tuning database fxopt wrote ({error}); delete it or tune "
            "into another directory"
        ) from None


def _beats_fxopt(record: dict) -> bool:
    baseline = record.get("fxopt_seconds")
    return baseline is None or record["seconds"] < baseline


def apply_database(mod, target, work_dir) -> tuple[object, list[str]]:
    """`mod` (legalized and fused) with the tuned schedules of `work_dir`'s database applied to
    the functions it holds a record for at `target`; (module, names of the tuned functions).

    A function matches when its structure (shapes included) is the one tuned and the record's
    target has the same kind and CPU / GPU architecture; other records are ignored, and so are
    records slower than fxopt's own schedule of the function (timed when tuning). Tuned
    functions carry `tirx.is_scheduled`, so fxopt's schedules and dlight leave them alone.
    """
    wanted = tv.target_key(target)
    records = {
        r["key"]: r
        for r in load_records(check_database(work_dir))
        if r["target"] == wanted and _beats_fxopt(r)
    }
    tuned = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tv.tirx.PrimFunc) or "tirx.is_scheduled" in func.attrs:
            continue
        record = records.get(tv.workload_key(tv.workload_of(func)))
        if record is not None:
            tuned[gv] = tv.apply_trace(func, record["trace"])
    return tv.with_functions(mod, tuned), sorted(gv.name_hint for gv in tuned)
