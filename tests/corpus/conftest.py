"""The corpus harness: each model runs in its own process (run_model.py), a few at a time, and
the whole table is written to JSON and printed when the session ends.

Environment: FXOPT_CORPUS_JOBS (processes at once, default 2), FXOPT_CORPUS_TIMEOUT (seconds
per model, default 300), FXOPT_CORPUS_RESULTS (the JSON file, default corpus-results.json in
the repository root).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from fxopt.progress import table

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("run_model.py")
JOBS = int(os.environ.get("FXOPT_CORPUS_JOBS", "2"))
TIMEOUT = float(os.environ.get("FXOPT_CORPUS_TIMEOUT", "300"))
RESULTS = Path(os.environ.get("FXOPT_CORPUS_RESULTS", ROOT / "corpus-results.json"))
_ROWS: list[dict] = []  # every row a test asked for, in order


def run_model(name: str, deploy: bool) -> dict:
    """Run one model in a fresh process; its JSON row, or a row saying how the process ended."""
    command = [sys.executable, str(RUNNER), name, *(["--deploy"] if deploy else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"model": name, "status": f"timeout: over {TIMEOUT:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return {"model": name, "status": f"exception: runner failed: {last[:300]}"}


class Corpus:
    """Starts every selected model's process up front, `JOBS` at a time; `row` waits for one."""

    def __init__(self, jobs: dict[str, bool]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=JOBS)
        self._futures: dict[str, Future] = {
            name: self._pool.submit(run_model, name, deploy) for name, deploy in jobs.items()
        }

    def row(self, name: str) -> dict:
        """The model's row, once its process has finished; kept for the session's table."""
        row = self._futures[name].result()
        _ROWS.append(row)
        return row

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="session")
def corpus(request) -> Corpus:
    """The runs of every collected corpus test, in collection order (name -> deploy flag)."""
    jobs = {
        item.callspec.params["name"]: item.callspec.params["expect"].deploy
        for item in request.session.items
        if "corpus" in getattr(item, "fixturenames", ()) and hasattr(item, "callspec")
    }
    corpus = Corpus(jobs)
    yield corpus
    corpus.close()


def pytest_sessionfinish(session, exitstatus) -> None:
    if _ROWS:
        RESULTS.write_text(json.dumps(_ROWS, indent=1) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _ROWS:
        return
    terminalreporter.section("fxopt corpus")
    for line in format_table(_ROWS):
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"  written to {RESULTS}")


def format_table(rows: list[dict]) -> list[str]:
    """The rows as an aligned text table."""
    headers = ["model", "status", "BN", "conv", "linear", "ops", "deploy BN/conv/lin", "s"]
    headers += ["rolled back", "passes fired"]
    return table(headers, [_cells(r) for r in rows], right=(2, 3, 4, 5, 6, 7))


def _cells(row: dict) -> list[str]:
    before, after = row.get("before", {}), row.get("after", {})

    def change(key: str) -> str:
        return f"{before[key]} -> {after[key]}" if key in before else "-"

    deploy = row.get("deploy")
    deploy_text = "/".join(str(deploy[k]) for k in ("bn", "conv", "linear")) if deploy else "-"
    seconds = row.get("optimize_s")
    return [
        row["model"],
        row["status"][:50],
        change("bn"),
        change("conv"),
        change("linear"),
        change("ops"),
        deploy_text,
        "-" if seconds is None else f"{seconds:.1f}",
        ",".join(dict.fromkeys(row.get("rolled_back", []))) or "-",
        ",".join(row.get("fired", [])) or "-",
    ]
