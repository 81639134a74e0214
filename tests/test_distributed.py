"""fastbn.SyncBatchNorm: statistics over every rank of a process group.

Multi-process cases run tests/distributed_job.py in one process per rank, once per
(collective backend, world size): gloo on CPU tensors always, nccl on GPUs when there are
enough of them. Each job runs every check (see CHECKS there) and reports per check, so each
test below reads its own verdict from the job. A job that hangs is killed after
JOB_TIMEOUT_S, and its collectives time out after 30 s, so a hang fails instead of blocking.
The remaining tests run in this process, outside any process group.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ON_GPU
from distributed_job import SKIPPED
from helpers import assert_matches, make_input, torch_batch_norm
from torch.nn.modules.batchnorm import _BatchNorm

import fastbn

JOB = Path(__file__).with_name("distributed_job.py")
JOB_TIMEOUT_S = 180
WORLDS = [("gloo", 2), ("gloo", 3), ("nccl", 2), ("nccl", 3)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_job(comm: str, world: int, out_dir: Path) -> dict[str, dict[int, str]]:
    """Run one job; {check: {rank: "ok" or the failure}}."""
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    env = dict(os.environ)
    if comm == "gloo" and not ON_GPU:
        # CPU tensors: without a GPU the triton check runs the kernels in the interpreter. On
        # a GPU machine no test relies on the interpreter; the job skips that check.
        env["TRITON_INTERPRET"] = "1"
    ranks = [
        subprocess.Popen(
            [sys.executable, str(JOB), str(rank), str(world), init_method, comm, str(out_dir)],
            cwd=JOB.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(world)
    ]
    logs = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        for process in ranks:
            logs.append(process.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        for process in ranks:
            process.kill()
            process.wait()
        pytest.fail(f"{comm} job with {world} ranks did not finish in {JOB_TIMEOUT_S} s")
    results: dict[str, dict[int, str]] = {}
    for rank, (process, log) in enumerate(zip(ranks, logs, strict=True)):
        report = out_dir / f"rank{rank}.json"
        if process.returncode != 0 or not report.exists():
            pytest.fail(f"rank {rank} of the {comm} job exited with {process.returncode}:\n{log}")
        for check, verdict in json.loads(report.read_text()).items():
            results.setdefault(check, {})[rank] = verdict
    return results


@pytest.fixture(scope="module", params=WORLDS, ids=[f"{c}-{w}ranks" for c, w in WORLDS])
def job(request, tmp_path_factory):
    """The verdicts of one job (run once per module and world)."""
    comm, world = request.param
    if comm == "nccl" and torch.cuda.device_count() < world:
        pytest.skip(f"nccl with {world} ranks needs {world} GPUs")
    return _run_job(comm, world, tmp_path_factory.mktemp(f"{comm}{world}"))


def assert_passed(job: dict[str, dict[int, str]], check: str) -> None:
    verdicts = job[check]
    skipped = {verdict for verdict in verdicts.values() if verdict.startswith(SKIPPED)}
    if skipped and len(skipped) == len(set(verdicts.values())):
        pytest.skip(skipped.pop()[len(SKIPPED):])
    failures = {rank: verdict for rank, verdict in verdicts.items() if verdict != "ok"}
    assert not failures, "\n".join(f"rank {rank}: {text}" for rank, text in failures.items())


# ---------------------------------------------------------------------------------------------
# Across processes: each against one-process fastbn on the concatenated batch
# ---------------------------------------------------------------------------------------------


def test_uneven_shares_match_one_process_on_the_whole_batch(job):
    assert_passed(job, "uneven_shares")


def test_rank_with_an_empty_batch_joins_and_gives_an_empty_output(job):
    assert_passed(job, "empty_share")


def test_momentum_none_is_the_cumulative_average_of_global_statistics(job):
    assert_passed(job, "momentum_none")


def test_fused_activation_and_residual_match(job):
    assert_passed(job, "activation_residual")


def test_residual_that_torchs_add_takes_matches(job):
    assert_passed(job, "residual_torch_adds")


def test_channels_last_input_matches_and_keeps_its_format(job):
    assert_passed(job, "channels_last")


def test_2d_input_matches(job):
    assert_passed(job, "input_2d")


def test_without_affine_or_running_stats_matches(job):
    assert_passed(job, "no_affine_no_running_stats")


def test_float32_matches(job):
    assert_passed(job, "float32")


def test_large_mean_in_float32_matches(job):
    assert_passed(job, "large_mean")


def test_triton_backend_matches(job):
    assert_passed(job, "triton_backend")


def test_double_backward_raises(job):
    assert_passed(job, "double_backward_raises")


def test_eval_and_one_rank_groups_call_no_collective(job):
    assert_passed(job, "no_collective_in_eval_or_alone")


def test_ddp_training_matches_one_process_and_torch_sync_batchnorm(job):
    assert_passed(job, "ddp_training")


# ---------------------------------------------------------------------------------------------
# In this process, outside any process group
# ---------------------------------------------------------------------------------------------


def test_without_a_process_group_equals_batchnorm2d(backend, device):
    options = dict(activation="leaky_relu", negative_slope=0.2, momentum=None)
    sync = fastbn.SyncBatchNorm(3, device=device, **options)
    single = fastbn.BatchNorm2d(3, device=device, **options)
    for training in (True, True, False):
        sync.train(training)
        single.train(training)
        x = make_input((4, 3, 5, 5), device=device, seed=int(training))
        z = make_input((4, 3, 5, 5), device=device, seed=2)
        grad_out = make_input((4, 3, 5, 5), device=device, seed=3)
        results = []
        for layer in (sync, single):
            leaves = [x.clone().requires_grad_(True), z.clone().requires_grad_(True),
                      layer.weight, layer.bias]
            y = layer(leaves[0], leaves[1])
            results.append([y, *torch.autograd.grad(y, leaves, grad_out)])
        for name, mine, theirs in zip(("y", "x", "residual", "weight", "bias"), *results,
                                      strict=True):
            assert_matches(f"{name} (training={training})", mine, theirs)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(sync, name), getattr(single, name)), name


@pytest.mark.parametrize("activation", ["none", "silu"])
def test_backward_pieces_pass_opcheck_and_compose_to_normalize_backward(backend, device,
                                                                        activation):
    """The sums piece, then the means (sums / count) into the d input piece: what
    normalize_backward gives, as SyncBatchNorm composes them."""
    from fastbn import ops, reference

    x = make_input((3, 4, 5, 5), torch.float64, device=device)
    grad_out, residual = torch.randn_like(x), torch.randn_like(x)
    mean, var = reference.batch_mean_var(x)
    weight = torch.rand(4, dtype=torch.float64, device=device)
    bias = torch.rand(4, dtype=torch.float64, device=device)
    common = (grad_out, x, mean, var, weight, bias, residual, None)
    options = (1e-5, True, activation, 0.01, [True, True], backend)
    sums_args = (*common, 1e-5, activation, 0.01, [True, True], backend)
    torch.library.opcheck(ops.normalize_grad_sums, sums_args)
    sums = ops.normalize_grad_sums(*sums_args)[0]
    torch.library.opcheck(ops.normalize_grad_input, (*common, sums / 75.0, *options))
    pieces = ops.normalize_grad_input(*common, sums / 75.0, *options)
    whole = ops.normalize_backward(*common, 1e-5, True, activation, 0.01, [True] * 4, backend)
    for name, mine, theirs in zip(("grad input", "grad residual"), pieces, whole[::3],
                                  strict=True):
        assert_matches(name, mine, theirs)


@pytest.mark.parametrize("options", [{}, dict(affine=False), dict(track_running_stats=False),
                                     dict(bias=False), dict(momentum=None, eps=1e-3)])
def test_has_torch_sync_batchnorms_constructor_and_state_dict(options):
    group = object()
    ours = fastbn.SyncBatchNorm(5, process_group=group, **options)
    theirs = torch_batch_norm(torch.nn.SyncBatchNorm, 5, process_group=group, **options)
    assert isinstance(ours, _BatchNorm)
    assert ours.process_group is group
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())


def test_constructor_takes_torchs_positional_arguments():
    layer = fastbn.SyncBatchNorm(4, 1e-3, 0.2, True, True, None, "cpu", torch.float64)
    assert (layer.eps, layer.momentum, layer.process_group) == (1e-3, 0.2, None)
    assert layer.weight.dtype == torch.float64


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 4), (2, 3, 4, 5), (2, 3, 2, 3, 4)])
def test_takes_every_rank_from_2_to_5(shape):
    layer = fastbn.SyncBatchNorm(3)
    assert layer(make_input(shape, device=torch.device("cpu"))).shape == shape


def test_rejects_1d_input_like_torch():
    with pytest.raises(ValueError, match="expected at least 2D input"):
        fastbn.SyncBatchNorm(3)(torch.randn(3))


def test_rejects_zero_channels_like_torch():
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        fastbn.SyncBatchNorm(0)(torch.randn(2, 0, 4))


# ---------------------------------------------------------------------------------------------
# fastbn.convert(..., sync=True)
# ---------------------------------------------------------------------------------------------


def sync_convert_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.SyncBatchNorm(4, momentum=None), torch.nn.Flatten(2), torch.nn.BatchNorm1d(4),
    )


def test_convert_with_sync_swaps_every_batchnorm_for_sync_batchnorm_sharing_its_tensors():
    model = sync_convert_model()
    tensors = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    group = object()
    converted = fastbn.convert(model, sync=True, process_group=group, fuse="safe")
    assert [type(converted[i]) for i in (1, 3, 5)] == [fastbn.SyncBatchNorm] * 3
    assert all(converted[i].process_group is group for i in (1, 3, 5))
    assert converted[1].activation == "relu" and type(converted[2]) is torch.nn.Identity
    assert converted[3].momentum is None
    for name, tensor in [*converted.named_parameters(), *converted.named_buffers()]:
        assert tensor is tensors[name], name


def test_model_converted_with_sync_computes_the_same_outside_a_process_group(device):
    model = sync_convert_model().to(device)
    reference = copy.deepcopy(model)
    converted = fastbn.convert(model, sync=True)
    for training in (True, False):
        converted.train(training)
        reference.train(training)
        x = make_input((4, 3, 6, 6), device=device, seed=int(training))
        assert_matches(f"output (training={training})", converted(x), reference(x))
    for (name, mine), theirs in zip(converted.named_buffers(), reference.buffers(), strict=True):
        if mine.is_floating_point():
            assert_matches(name, mine, theirs)
        else:
            assert torch.equal(mine, theirs), name


def test_convert_with_sync_also_swaps_fastbn_layers_keeping_their_activation():
    model = torch.nn.Sequential(fastbn.BatchNorm2d(4, activation="leaky_relu", negative_slope=0.2),
                                fastbn.BatchNorm1d(4, bias=False))
    weight = model[0].weight
    converted = fastbn.convert(model, sync=True)
    assert [type(layer) for layer in converted] == [fastbn.SyncBatchNorm] * 2
    assert (converted[0].activation, converted[0].negative_slope) == ("leaky_relu", 0.2)
    assert converted[0].weight is weight and converted[1].bias is None


def test_convert_sync_batchnorm_classmethod_is_torchs_contract():
    model = sync_convert_model()
    group = object()
    converted = fastbn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert [type(converted[i]) for i in (1, 3, 5)] == [fastbn.SyncBatchNorm] * 3
    assert converted[1].process_group is group
    assert converted[1].activation is None and type(converted[2]) is torch.nn.ReLU


class DoublingBatchNorm2d(torch.nn.BatchNorm2d):
    def forward(self, input):
        return super().forward(input) * 2


def test_convert_sync_batchnorm_warns_at_its_caller_naming_the_layers_it_leaves():
    model = torch.nn.Sequential(DoublingBatchNorm2d(3), torch.nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"left these BatchNorm layers as they were: "
                      r"0 \(DoublingBatchNorm2d\): its class has its own forward") as record:
        converted = fastbn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert [type(layer) for layer in converted] == [DoublingBatchNorm2d, fastbn.SyncBatchNorm]
    assert [w.filename for w in record] == [__file__]
