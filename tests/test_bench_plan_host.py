"""python -m fastbn.bench --plan and --suite host: what they print and write."""

import json

import pytest
import torch

import fastbn
from fastbn.bench import host
from fastbn.bench.cli import main
from fastbn.bench.plan import plan_rows
from fastbn.bench.shapes import SUITES

pytestmark = pytest.mark.skipif(
    bool(fastbn.backend.triton_problem()), reason="the Triton kernels cannot be imported"
)


def test_plan_lists_every_launch_of_every_point_without_running_anything(tmp_path, capsys):
    assert main(["--plan", "--suite", "quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    (written,) = tmp_path.glob("plan-quick-*.json")
    document = json.loads(written.read_text())
    assert document["notes"] == ["planned on meta tensors: nothing ran"]
    rows = document["rows"]
    points = {(tuple(r["shape"]), r["dtype"], r["layout"], r["fusion"]) for r in rows}
    assert len(points) == len(SUITES["quick"].points)
    for row in rows:
        assert row["kernel"] in printed
        assert row["grid"][0] >= 1 and row["bytes_read"] > 0 and row["compulsory_bytes"] > 0


def test_plan_has_one_or_two_launches_per_training_forward_one_per_eval_and_one_or_two_backward():
    """Training is one launch each way where a channel block's slice fits one program."""
    rows = plan_rows(list(SUITES["quick"].points))
    per_mode = {}
    for row in rows:
        key = (tuple(row["shape"]), row["dtype"], row["layout"], row["fusion"], row["mode"])
        per_mode.setdefault(key, []).append(row["kernel"])
    for (*_, mode), kernels in per_mode.items():
        if mode == "backward":
            assert kernels in (["slice_backward_kernel"],
                               ["partial_grad_sums_kernel", "grad_input_kernel"]), kernels
        elif mode == "forward-train":
            assert kernels in (["slice_forward_kernel"],
                               ["partial_stats_kernel", "normalize_kernel"]), kernels
        else:
            assert kernels == ["normalize_kernel"], mode


def test_plan_traffic_is_at_least_the_compulsory_traffic():
    rows = plan_rows(list(SUITES["quick"].points))
    totals = {}
    for row in rows:
        key = (tuple(row["shape"]), row["dtype"], row["layout"], row["fusion"], row["mode"])
        totals.setdefault(key, [0, row["compulsory_bytes"]])
        totals[key][0] += row["bytes_read"] + row["bytes_written"]
    for key, (moved, compulsory) in totals.items():
        assert moved >= compulsory, key


def test_host_suite_times_every_case_against_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(host, "HOST_CALLS", 2)
    threads = torch.get_num_threads()
    try:
        assert main(["--suite", "host", "--reps", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (written,) = tmp_path.glob("host-*.json")
    document = json.loads(written.read_text())
    if not torch.cuda.is_available():
        assert document["notes"] == [host.NO_OP_NOTE]
    assert {row["case"] for row in document["rows"]} == set(host.CASES)
    for row in document["rows"]:
        assert row["fastbn_us"] > 0 and row["torch_us"] > 0 and row["ratio"] > 0


def test_no_op_launches_leave_the_kernels_in_place():
    from fastbn.kernels import forward

    kernel = forward.normalize_kernel
    with host.no_op_launches():
        assert forward.normalize_kernel is not kernel
    assert forward.normalize_kernel is kernel
