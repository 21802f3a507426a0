"""`fxopt tune --rpc`: tuning measured on a device behind a TVM RPC tracker, here on loopback (a
tracker and a server in this test), with the records a build then uses."""

import json
import time

import pytest
import torch
from torch import nn

import fxopt
from fxopt import remote
from fxopt.cli import main
from fxopt.codegen.tuning_db import DATABASE_FILE
from fxopt.ir.errors import InputError, UnsupportedError
from fxopt.tune import tune

pytestmark = pytest.mark.tvm
KEY = "fxopt-loopback"
TRIALS = 4


@pytest.fixture(scope="module")
def tracker():
    """A TVM RPC tracker and one CPU server registered with it under KEY, on 127.0.0.1."""
    pytest.importorskip("tornado")  # the tracker's event loop
    from tvm import rpc
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9290, silent=True)
    server = Server(
        host="127.0.0.1",
        port=9300,
        port_end=9400,
        key=KEY,
        tracker_addr=("127.0.0.1", tracker.port),
        silent=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server registers itself in the background
        summary = rpc.connect_tracker("127.0.0.1", tracker.port).summary()
        if summary["queue_info"].get(KEY, {}).get("free"):
            break
        time.sleep(0.2)
    yield f"127.0.0.1:{tracker.port}:{KEY}"
    server.terminate()
    tracker.terminate()


def tiny_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    return model, torch.randn(1, 8, 16, 16)


def test_tuning_through_the_tracker_measures_remotely_and_builds_use_the_records(
    tracker, fast_llvm, tmp_path, monkeypatch
):
    timed = []
    original = remote.Remote.time

    def counting(self, *args):
        timed.append(str(self))
        return original(self, *args)

    monkeypatch.setattr(remote.Remote, "time", counting)
    model, x = tiny_conv()
    work_dir = tmp_path / "tuned"
    summary = tune(model, (x,), fast_llvm, work_dir, trials=TRIALS, progress=False, rpc=tracker)
    # every candidate and fxopt's own schedule were timed on the device behind the tracker
    assert timed == [tracker] * (TRIALS + 1)
    (task,) = summary.tasks
    assert summary.trials == TRIALS and task.best_seconds > 0 and task.fxopt_seconds > 0
    assert any(KEY in note for note in summary.notes)
    (record,) = json.loads((work_dir / DATABASE_FILE).read_text())["records"]
    assert record["seconds"] == task.best_seconds and record["fxopt_seconds"] > 0
    # a build reads them like any other records: here the tuned schedule is made to win
    data = json.loads((work_dir / DATABASE_FILE).read_text())
    data["records"][0]["fxopt_seconds"] = 1.0
    (work_dir / DATABASE_FILE).write_text(json.dumps(data))
    artifact = fxopt.compile(model, x, target=fast_llvm, tuning_db=work_dir)
    assert "1 tuned functions" in " ".join(artifact.report.notes)
    torch.testing.assert_close(artifact.module(x), model(x), rtol=1e-5, atol=1e-5)


def test_cli_tune_takes_rpc(tracker, tmp_path, capsys):
    source = tmp_path / "tiny.py"
    source.write_text(
        "import torch\nfrom torch import nn\n"
        "model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()).eval()\n"
        "example_inputs = (torch.randn(1, 4, 8, 8),)\n"
    )
    argv = ["tune", str(source), "--trials", "2", "--work-dir", str(tmp_path / "db")]
    assert main([*argv, "--rpc", tracker]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 trials" in out and f"measured on the device under key {KEY!r}" in out
    assert main([*argv, "--rpc", "nowhere"]) == 2
    assert "--rpc takes TRACKER_HOST:PORT:KEY" in capsys.readouterr().err


def test_a_bad_rpc_address_or_an_absent_tracker_says_so(tmp_path):
    with pytest.raises(InputError, match="TRACKER_HOST:PORT:KEY"):
        remote.parse("localhost:key")
    model, x = tiny_conv()
    with pytest.raises(UnsupportedError, match="no device under key 'nobody'"):
        tune(model, (x,), "llvm", tmp_path, trials=1, progress=False, rpc="127.0.0.1:1:nobody")


def test_bench_times_the_tvm_build_on_the_remote_device(tracker):
    from fxopt.bench import bench

    rows = bench(["espcn"], ["tvm"], repeats=3, warmup=1, progress=False, rpc=tracker)
    eager, tvm = rows
    assert (eager.candidate, tvm.candidate) == ("eager", "tvm")
    assert tvm.median_ms > 0 and tvm.p10_ms <= tvm.median_ms <= tvm.p90_ms
    assert tvm.speedup is None and KEY in tvm.note and tvm.build_s > 0
    assert eager.speedup == 1.0
