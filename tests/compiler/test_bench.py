"""`fxopt bench`: rows, baseline, settings and output. Speed itself is never asserted."""

import io
import json

import pytest
import torch
from torch import nn

import fxopt
from fxopt.bench import CANDIDATES, bench, format_rows, peak_memory_bytes
from fxopt.cli import main
from fxopt.ir.errors import InputError
from fxopt.progress import Progress, table

MODEL = "resnet18_like"


@pytest.fixture(scope="module")
def rows():
    if MODEL not in fxopt.models.list():
        pytest.skip(f"the zoo has no {MODEL} yet")
    return bench([MODEL], ["eager", "optimized"], repeats=3, warmup=1, progress=False)


def test_bench_returns_a_row_per_candidate_with_positive_medians(rows):
    assert [(r.model, r.candidate) for r in rows] == [(MODEL, "eager"), (MODEL, "optimized")]
    for row in rows:
        assert row.median_ms > 0 and row.p10_ms <= row.median_ms <= row.p90_ms
        assert row.speedup > 0


def test_bench_speedup_is_relative_to_eager(rows):
    eager, optimized = rows
    assert eager.speedup == 1.0 and eager.build_s is None
    assert optimized.speedup == pytest.approx(eager.median_ms / optimized.median_ms)
    assert optimized.build_s > 0


def test_bench_table_states_what_the_speedup_means(rows):
    text = format_rows(rows)
    assert "speed-up = eager median / candidate median" in text
    assert f"{torch.get_num_threads()} threads" in text and "3 timed calls" in text
    assert MODEL in text and "1.00x" in text


def test_bench_always_times_eager_and_restores_threads():
    name = fxopt.models.list()[0]
    before = torch.get_num_threads()
    rows = bench(name, ["deploy"], threads=1, repeats=1, warmup=0, progress=False)
    assert torch.get_num_threads() == before
    assert rows[0].threads == 1 and rows[0].repeats == 1
    assert rows[0].candidate == "eager" and rows[0].speedup == 1.0
    if not fxopt.models.info(name).has_deploy:
        assert rows[1].median_ms is None and "no deploy form" in rows[1].note


@pytest.mark.parametrize(
    "models, backends, message",
    [
        (["no_such_model"], ["eager"], "unknown model"),
        ([MODEL], ["tensorrt"], "unknown candidate"),
        ([], ["eager"], "no models"),
    ],
)
def test_bench_rejects_unknown_names_before_running_anything(models, backends, message):
    with pytest.raises(InputError, match=message):
        bench(models, backends, progress=False)
    assert "optimized+inductor" in CANDIDATES


def test_peak_memory_covers_the_output_of_one_call():
    layer, x = nn.Linear(256, 256), torch.randn(64, 256)
    peak = peak_memory_bytes(layer, (x,))
    if peak is None:
        pytest.skip("this torch's profiler exposes no memory events")
    assert peak >= 64 * 256 * 4


def test_progress_rewrites_one_line_on_a_terminal_and_prints_lines_otherwise():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log, terminal = io.StringIO(), Terminal()
    for stream in (log, terminal):
        progress = Progress(stream=stream)
        progress.show("model [eager] build")
        progress.show("model [eager] run 1/3", transient=True)
        progress.close()
    assert log.getvalue() == "model [eager] build\n"
    assert terminal.getvalue().startswith("\rmodel [eager] build\r")
    assert "run 1/3" in terminal.getvalue() and "\n" not in terminal.getvalue()


def test_table_aligns_columns():
    lines = table(["a", "number"], [["long name", "1.5"], ["x", "10.25"]], right=(1,))
    assert lines == ["  a          number", "  long name     1.5", "  x           10.25"]


def test_cli_bench_prints_the_table_and_writes_json(capsys, tmp_path):
    if MODEL not in fxopt.models.list():
        pytest.skip(f"the zoo has no {MODEL} yet")
    path = tmp_path / "bench.json"
    argv = [
        "bench",
        "--models",
        MODEL,
        "--backends",
        "eager,optimized",
        "--repeats",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
        str(path),
        "--plot",
        str(tmp_path / "bench.png"),
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "speed-up" in captured.out and "optimized" in captured.out
    assert f"speed-ups drawn in {tmp_path / 'bench.png'}" in captured.out
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert f"{MODEL} [optimized] build" in captured.err  # progress, plain lines off a terminal
    data = json.loads(path.read_text())
    assert {r["threads"] for r in data["rows"]} == {1}
    assert [r["candidate"] for r in data["rows"]] == ["eager", "optimized"]
    assert all(r["median_ms"] > 0 for r in data["rows"])


def test_bench_runs_in_another_dtype_and_another_sample_shape():
    rows = bench(
        "espcn", ["eager"], repeats=1, warmup=0, progress=False, dtype="bfloat16", shape=(1, 8, 8)
    )
    assert rows[0].dtype == "bfloat16" and rows[0].device == "cpu" and rows[0].median_ms > 0
    assert "bfloat16" in format_rows(rows)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dtype": "int8"}, "unknown dtype"),
        ({"device": "tpu"}, "unknown device"),
        ({"shape": (8, 8)}, "has 2 dimensions instead of 3"),
    ],
)
def test_bench_rejects_bad_settings_with_a_clear_message(options, message):
    with pytest.raises(InputError, match=message):
        bench("espcn", ["eager"], repeats=1, warmup=0, progress=False, **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_bench_on_cuda_without_a_gpu_says_so():
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        bench("espcn", ["eager"], repeats=1, progress=False, device="cuda")


def test_plot_draws_a_bar_per_model_and_candidate_with_its_speedup(tmp_path):
    from matplotlib import image

    from fxopt.bench import Row
    from fxopt.plot import plot, speedups

    rows = [
        Row("timm:a", "eager", 2.0, speedup=1.0),
        Row("timm:a", "optimized", 1.0, speedup=2.0),
        Row("timm:a", "tvm", None, note="build failed"),
        Row("zoo_b", "eager", 3.0, speedup=1.0),
        Row("zoo_b", "optimized", 2.0, speedup=1.5),
        Row("zoo_b", "tvm", 1.0, speedup=3.0),
    ]
    models, table = speedups(rows)
    assert models == ["timm:a", "zoo_b"] and list(table) == ["optimized", "tvm"]
    assert table["optimized"] == [2.0, 1.5] and table["tvm"][1] == 3.0
    assert table["tvm"][0] != table["tvm"][0]  # NaN: no time for that model
    path = plot(rows, tmp_path / "speedups.png")
    height, width, _ = image.imread(path).shape
    assert width > 600 and height > 400


def test_cli_bench_plot_checks_matplotlib_and_the_path_before_timing(tmp_path, capsys, monkeypatch):
    argv = ["bench", "--models", MODEL, "--backends", "optimized", "--plot"]
    assert main([*argv, str(tmp_path / "missing" / "x.png")]) == 2
    assert "--plot" in capsys.readouterr().err
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert main([*argv, str(tmp_path / "x.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
