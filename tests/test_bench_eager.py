"""The eager time beside the kernel time (CUDA suites), and the host suite's table, checked
on CPU with a stand-in eager timer."""

import json

import torch
import torch.nn.functional as F

from fastbn.bench import host, timing
from fastbn.bench.providers import FunctionalProvider
from fastbn.bench.report import geomean_speedups, table, write_json
from fastbn.bench.runner import Settings, run
from fastbn.bench.shapes import Point
from fastbn.bench.timing import time_cpu

TINY = Point((4, 3, 5, 5), "fp32", "nchw")
MODES = ("forward-train", "forward-eval")


def eager_settings(calls: list[int]) -> Settings:
    def fake_eager(step, reps):
        calls.append(reps)
        step()
        return 0.125

    return Settings(torch.device("cpu"), time_cpu, warmup=0, reps=3, copy_gbps=10.0,
                    time_eager=fake_eager)


def test_rows_carry_the_eager_time_of_reps_back_to_back_calls(tmp_path):
    calls: list[int] = []
    rows = run([TINY], MODES, [FunctionalProvider("torch", F.batch_norm)], eager_settings(calls))
    assert [(row.status, row.eager_ms) for row in rows] == [("ok", 0.125)] * len(MODES)
    assert calls == [3] * len(MODES)  # one eager measurement per row, of reps calls
    text = table(rows, ["torch"])
    assert "torch eager ms" in text.splitlines()[0]
    assert text.count("0.1250") == len(MODES)
    path = tmp_path / "run.json"
    write_json(path, {}, rows, geomean_speedups(rows))
    assert [row["eager_ms"] for row in json.loads(path.read_text())["rows"]] == [0.125] * 2


def test_without_an_eager_timer_there_is_no_eager_column():
    settings = Settings(torch.device("cpu"), time_cpu, warmup=0, reps=2, copy_gbps=10.0)
    rows = run([TINY], MODES, [FunctionalProvider("torch", F.batch_norm)], settings)
    assert all(row.status == "ok" and row.eager_ms is None for row in rows)
    assert "eager" not in table(rows, ["torch"])


def test_cuda_eager_timer_times_calls_back_to_back_with_one_synchronisation(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: events.append("sync"))
    per_call_ms = timing.time_eager_cuda(lambda: events.append("call"), 4)
    # One untimed call, a synchronisation, the four timed calls, one synchronisation.
    assert events == ["call", "sync", "call", "call", "call", "call", "sync"]
    assert per_call_ms > 0


def test_host_table_shows_the_direct_launches_off_column_where_rows_have_it():
    row = {"shape": [2, 8, 1, 1], "case": "train-forward", "dtype": "float32",
           "fastbn_us": 10.0, "torch_us": 20.0, "ratio": 0.5}
    assert "no-direct" not in host.format_host([row])
    text = host.format_host([dict(row, fastbn_ordinary_us=30.0, ordinary_ratio=1.5)])
    assert "no-direct us" in text.splitlines()[0] and "1.50" in text.splitlines()[1]
