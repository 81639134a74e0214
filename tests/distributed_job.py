"""One rank of tests/test_distributed.py's multi-process job: every check, one process group.

    python tests/distributed_job.py RANK WORLD INIT_METHOD COMM OUT_DIR

Spawning processes that import torch takes seconds, so each world size runs one job: the
rank joins the group (COMM is gloo on CPU tensors or nccl on cuda:RANK), runs every check in
CHECKS in the same order as the other ranks, and writes OUT_DIR/rank<RANK>.json mapping
each check's name to "ok" or its failure. A check makes all its collective calls before it
compares anything, so a mismatch on one rank does not leave the others waiting.

Each check is held against fastbn on one process: every rank builds the whole batch from
the same seed, runs a fastbn BatchNorm on all of it, and compares its own share. Parameter
gradients are each rank's own sums, as torch.nn.SyncBatchNorm's are: the one-process
gradient with grad_out zero outside the rank's share.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import conftest  # noqa: F401  (sets TRITON_INTERPRET=1 before triton loads, without a GPU)
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from helpers import assert_matches, make_input
from torch import nn

import fastbn

CHANNELS = 3
# Batch shares per world size: uneven, and with an empty rank.
UNEVEN = {2: [3, 5], 3: [2, 3, 4]}
WITH_EMPTY = {2: [0, 5], 3: [3, 0, 4]}
COLLECTIVE_TIMEOUT_S = 30  # a rank left waiting fails after this instead of hanging
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
               "broadcast", "reduce_scatter_tensor")


class Rank:
    """Where this process stands: rank, world size, device, and the fastbn backend."""

    def __init__(self, rank: int, world: int, comm: str) -> None:
        self.rank, self.world, self.comm = rank, world, comm
        self.device = torch.device(f"cuda:{rank}" if comm == "nccl" else "cpu")
        self.backend = "auto" if comm == "nccl" else "torch"

    def share(self, shares: dict[int, list[int]]) -> slice:
        """This rank's rows of a batch split into shares[world]."""
        sizes = shares[self.world]
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def total(self, shares: dict[int, list[int]]) -> int:
        return sum(shares[self.world])


# ---------------------------------------------------------------------------------------------
# One SyncBatchNorm layer against one-process fastbn on the whole batch
# ---------------------------------------------------------------------------------------------


def layer_pair(rank: Rank, dtype: torch.dtype, num_dims: int, **options):
    """(SyncBatchNorm, fastbn BatchNorm of the same rank), equal parameters and buffers."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    sync = fastbn.SyncBatchNorm(CHANNELS, device=rank.device, dtype=param_dtype, **options)
    options.pop("process_group", None)
    single = fastbn.BatchNorm(CHANNELS, num_dims, device=rank.device, dtype=param_dtype,
                              **options)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for tensor in single.state_dict().values():
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
                tensor.copy_(values + 0.5)
    sync.load_state_dict(single.state_dict())
    return sync, single


def layer_step(sync, single, x, grad_out, part, residual=None):
    """One training step of both layers: (name, SyncBatchNorm's, expected) triples."""
    leaves = [t for t in (sync.weight, sync.bias) if t is not None]
    x_part = x[part].detach().requires_grad_(True)
    z_part = None if residual is None else residual[part].detach().requires_grad_(True)
    y = sync(x_part, z_part)
    inputs = [x_part, *leaves] + ([] if z_part is None else [z_part])
    grads = torch.autograd.grad(y, inputs, grad_out[part])

    x_all = x.detach().requires_grad_(True)
    z_all = None if residual is None else residual.detach().requires_grad_(True)
    y_all = single(x_all, z_all)
    single_leaves = [t for t in (single.weight, single.bias) if t is not None]
    inputs_all = [x_all, *single_leaves] + ([] if z_all is None else [z_all])
    grads_all = torch.autograd.grad(y_all, inputs_all, grad_out, retain_graph=True)
    own_grad_out = torch.zeros_like(grad_out)
    own_grad_out[part] = grad_out[part]
    own_param_grads = torch.autograd.grad(y_all, single_leaves, own_grad_out) if leaves else ()

    pairs = [("output", y, y_all[part]), ("grad input", grads[0], grads_all[0][part])]
    for name, mine, theirs in zip(("grad weight", "grad bias"), grads[1:1 + len(leaves)],
                                  own_param_grads, strict=False):
        pairs.append((name, mine, theirs))
    if z_part is not None:
        pairs.append(("grad residual", grads[-1], grads_all[-1][part]))
    if sync.track_running_stats:
        pairs += [(name, getattr(sync, name).clone(), getattr(single, name).clone())
                  for name in ("running_mean", "running_var", "num_batches_tracked")]
    return pairs


def layer_pairs(rank: Rank, shape, shares, dtype=torch.float64, steps=2, channels_last=False,
                residual=False, offset=0.0, **options):
    """steps training steps of a SyncBatchNorm and of fastbn on the whole batch: the
    (name, SyncBatchNorm's, expected) triples to compare."""
    sync, single = layer_pair(rank, dtype, len(shape), **options)
    shape = (rank.total(shares), *shape[1:])
    part = rank.share(shares)
    pairs = []
    for step in range(steps):
        x = make_input(shape, dtype, seed=step, channels_last=channels_last, device=rank.device,
                       offset=offset)
        grad_out = make_input(shape, dtype, seed=100 + step, device=rank.device)
        z = make_input(shape, dtype, seed=200 + step, device=rank.device) if residual else None
        step_pairs = layer_step(sync, single, x, grad_out, part, z)
        pairs += [(f"step {step} {name}", *values) for name, *values in step_pairs]
    return pairs


def compare(pairs) -> None:
    for name, mine, theirs in pairs:
        if mine.dtype in (torch.int64, torch.int32):
            assert_true(torch.equal(mine, theirs), f"{name}: {mine} != {theirs}")
        else:
            assert_true(bool(torch.isfinite(mine).all()), f"{name}: not finite")
            assert_matches(name, mine, theirs)


def assert_true(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_uneven_shares(rank: Rank) -> None:
    compare(layer_pairs(rank, (0, CHANNELS, 4, 5), UNEVEN))


def check_empty_share(rank: Rank) -> None:
    compare(layer_pairs(rank, (0, CHANNELS, 4, 5), WITH_EMPTY))


def check_momentum_none(rank: Rank) -> None:
    compare(layer_pairs(rank, (0, CHANNELS, 4, 5), UNEVEN, steps=3, momentum=None))


def check_activation_residual(rank: Rank) -> None:
    # The derivative from the forward's bit mask, and recomputed; an empty share with a mask.
    compare(
        layer_pairs(rank, (0, CHANNELS, 4, 5), WITH_EMPTY, residual=True, activation="relu")
        + layer_pairs(rank, (0, CHANNELS, 4, 5), UNEVEN, residual=True, activation="silu")
    )


def check_residual_torch_adds(rank: Rank) -> None:
    """A residual that torch's + adds after the normalization (a Python number, a broadcast
    shape, another dtype: a float32 block input under autocast) with a fused relu, as one
    process on the whole batch gives it: output (dtype included) and running statistics."""
    shape = (rank.total(UNEVEN), CHANNELS, 4, 5)
    part = rank.share(UNEVEN)
    residuals = (1.5, make_input((1, CHANNELS, 1, 1), seed=300, device=rank.device),
                 make_input(shape, torch.float32, seed=301, device=rank.device))
    pairs = []
    for index, z in enumerate(residuals):
        sync, single = layer_pair(rank, torch.float64, len(shape), activation="relu")
        x = make_input(shape, torch.float64, seed=index, device=rank.device)
        own = z[part] if isinstance(z, torch.Tensor) and z.shape == shape else z
        y, y_all = sync(x[part], own), single(x, z)
        assert_true(y.dtype == y_all.dtype, f"residual {index}: {y.dtype} != {y_all.dtype}")
        pairs += [(f"residual {index} output", y, y_all[part])]
        pairs += [(f"residual {index} {name}", getattr(sync, name), getattr(single, name))
                  for name in ("running_mean", "running_var", "num_batches_tracked")]
    compare(pairs)


def check_channels_last(rank: Rank) -> None:
    pairs = layer_pairs(rank, (0, CHANNELS, 4, 5), UNEVEN, channels_last=True)
    compare(pairs)
    output = pairs[0][1]
    assert_true(output.is_contiguous(memory_format=torch.channels_last),
                "the output keeps the channels_last memory format")


def check_input_2d(rank: Rank) -> None:
    compare(layer_pairs(rank, (0, CHANNELS), {2: [5, 8], 3: [4, 1, 6]}))


def check_no_affine_no_running_stats(rank: Rank) -> None:
    compare(layer_pairs(rank, (0, CHANNELS, 6), UNEVEN, affine=False,
                        track_running_stats=False))


def check_float32(rank: Rank) -> None:
    compare(layer_pairs(rank, (0, CHANNELS, 4, 5), UNEVEN, dtype=torch.float32))


def check_large_mean(rank: Rank) -> None:
    """Mean 1e4 against std 1 in float32: a sum of squares would have no digit left."""
    compare(layer_pairs(rank, (0, CHANNELS, 4, 5), UNEVEN, dtype=torch.float32, offset=1e4))


class Skip(Exception):
    """A check that cannot run in this job; its verdict starts with SKIPPED."""


SKIPPED = "skipped: "


def check_triton_backend(rank: Rank) -> None:
    if rank.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise Skip("the kernels need CUDA tensors or the interpreter; gloo jobs on a GPU "
                   "machine do not use the interpreter (the nccl jobs run this check)")
    with fastbn.use_backend("triton"):
        pairs = layer_pairs(rank, (0, CHANNELS, 3, 4), WITH_EMPTY, steps=1, residual=True,
                            activation="relu")
    compare(pairs)


def check_double_backward_raises(rank: Rank) -> None:
    sync, _ = layer_pair(rank, torch.float64, 4)
    x = make_input((UNEVEN[rank.world][rank.rank], CHANNELS, 2, 3), torch.float64,
                   device=rank.device).requires_grad_(True)
    (grad,) = torch.autograd.grad(sync(x).square().sum(), x, create_graph=True)
    try:
        grad.sum().backward()
    except RuntimeError as error:
        assert_true("once_differentiable" in str(error) or "double backward" in str(error),
                    f"unexpected message: {error}")
    else:
        raise AssertionError("double backward through SyncBatchNorm did not raise")


def check_no_collective_in_eval_or_alone(rank: Rank) -> None:
    """Eval (with or without running statistics) and a one-rank group never communicate."""
    alone = [dist.new_group([r]) for r in range(rank.world)][rank.rank]
    shape = (UNEVEN[rank.world][rank.rank], CHANNELS, 4, 5)
    x = make_input(shape, torch.float64, seed=3, device=rank.device)
    grad_out = make_input(shape, torch.float64, seed=4, device=rank.device)
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def refuse(*args, **kwargs):
        raise AssertionError("a collective was called")

    pairs = []
    try:
        for name in originals:
            setattr(dist, name, refuse)
        cases = [("eval", {}, False), ("eval untracked", {"track_running_stats": False}, False),
                 ("one-rank group", {"process_group": alone}, True)]
        for label, options, training in cases:
            sync, single = layer_pair(rank, torch.float64, 4, **options)
            sync.train(training)
            single.train(training)
            part = slice(0, shape[0])
            pairs += [(f"{label} {name}", *values)
                      for name, *values in layer_step(sync, single, x, grad_out, part)]
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)
    compare(pairs)


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel
# ---------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """conv -> BN(relu) -> conv -> BN -> pool -> linear, with the BN layers given."""

    def __init__(self, bn1: nn.Module, bn2: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, CHANNELS, 3, padding=1)
        self.bn1 = bn1
        self.conv2 = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.bn2 = bn2
        self.fc = nn.Linear(CHANNELS, 4)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class AutogradSyncBatchNorm(nn.BatchNorm2d):
    """SyncBatchNorm written with torch's differentiable collectives and plain autograd, the
    second reference where torch.nn.SyncBatchNorm cannot run: it refuses CPU tensors."""

    def forward(self, x):
        dims = [0, 2, 3]
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
        dist.all_reduce(count)
        mean = dist_functional.all_reduce(x.sum(dims)) / count
        centered = x - mean.view(1, -1, 1, 1)
        var = dist_functional.all_reduce(centered.square().sum(dims)) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)
        y = centered / torch.sqrt(var + self.eps).view(1, -1, 1, 1)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def torch_sync_layers(rank: Rank) -> tuple[nn.Module, nn.Module]:
    if rank.comm == "nccl":
        return nn.Sequential(nn.SyncBatchNorm(CHANNELS), nn.ReLU()), nn.SyncBatchNorm(CHANNELS)
    return nn.Sequential(AutogradSyncBatchNorm(CHANNELS), nn.ReLU()), AutogradSyncBatchNorm(
        CHANNELS)


def check_ddp_training(rank: Rank) -> None:
    """A few SGD steps under DDP equal one process on the whole batch, and torch's SyncBN.

    DDP averages gradients over ranks, so each rank's loss is its share of the whole batch's
    mean loss times the world size: sum over its samples * world / total batch.
    """
    torch.manual_seed(0)
    single = ConvNet(fastbn.BatchNorm2d(CHANNELS, activation="relu"), fastbn.BatchNorm2d(CHANNELS))
    single = single.to(rank.device, torch.float64)
    models = {
        "fastbn": ConvNet(fastbn.SyncBatchNorm(CHANNELS, activation="relu"),
                          fastbn.SyncBatchNorm(CHANNELS)),
        "torch": ConvNet(*torch_sync_layers(rank)),
    }
    state = single.state_dict()
    for model in models.values():
        model.to(rank.device, torch.float64)
        model.load_state_dict(_state_for(model, state))
    ddp = {name: nn.parallel.DistributedDataParallel(
        model, device_ids=[rank.device.index] if rank.comm == "nccl" else None)
        for name, model in models.items()}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=0.1)
                  for name, model in {**ddp, "single": single}.items()}
    total, part = rank.total(UNEVEN), rank.share(UNEVEN)
    for step in range(3):
        x = make_input((total, 3, 5, 5), torch.float64, seed=10 + step, device=rank.device)
        target = torch.randint(0, 4, (total,), generator=torch.Generator().manual_seed(step))
        target = target.to(rank.device)
        loss = nn.functional.cross_entropy(single(x), target)
        optimizers["single"].zero_grad()
        loss.backward()
        optimizers["single"].step()
        for name, model in ddp.items():
            out = model(x[part])
            share_loss = nn.functional.cross_entropy(out, target[part], reduction="sum")
            optimizers[name].zero_grad()
            (share_loss * rank.world / total).backward()
            optimizers[name].step()
    expected = single.state_dict()
    pairs = []
    for name, model in models.items():
        for key, tensor in _state_for(model, expected, reverse=True).items():
            pairs.append((f"{name} DDP vs one process: {key}", tensor, expected[key]))
    mine = _state_for(models["fastbn"], expected, reverse=True)
    theirs = _state_for(models["torch"], expected, reverse=True)
    pairs += [(f"fastbn vs torch SyncBatchNorm under DDP: {key}", mine[key], theirs[key])
              for key in mine]
    flat = torch.cat([p.detach().flatten() for p in models["fastbn"].parameters()])
    gathered = [torch.empty_like(flat) for _ in range(rank.world)]
    dist.all_gather(gathered, flat)
    compare(pairs)
    for other, values in enumerate(gathered):
        assert_true(torch.equal(values, flat), f"parameters on rank {other} differ from here")


def _state_for(model: nn.Module, state: dict, reverse: bool = False) -> dict:
    """state (keyed like the one-process ConvNet) keyed like model's state_dict, or, with
    reverse, model's state keyed like state; torch's bn1 is a Sequential(BN, ReLU)."""
    keys = list(model.state_dict())
    mapped = {key.replace("bn1.0.", "bn1."): key for key in keys}
    if reverse:
        own = model.state_dict()
        return {plain: own[key] for plain, key in mapped.items()}
    return {key: state[plain] for plain, key in mapped.items()}


CHECKS = {
    "uneven_shares": check_uneven_shares,
    "empty_share": check_empty_share,
    "momentum_none": check_momentum_none,
    "activation_residual": check_activation_residual,
    "residual_torch_adds": check_residual_torch_adds,
    "channels_last": check_channels_last,
    "input_2d": check_input_2d,
    "no_affine_no_running_stats": check_no_affine_no_running_stats,
    "float32": check_float32,
    "large_mean": check_large_mean,
    "triton_backend": check_triton_backend,
    "double_backward_raises": check_double_backward_raises,
    "no_collective_in_eval_or_alone": check_no_collective_in_eval_or_alone,
    "ddp_training": check_ddp_training,
}


def main(rank: int, world: int, init_method: str, comm: str, out_dir: str) -> None:
    if comm == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(comm, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    here = Rank(rank, world, comm)
    results = {}
    try:
        for name, check in CHECKS.items():
            context = (contextlib.nullcontext() if name == "triton_backend"
                       else fastbn.use_backend(here.backend))
            try:
                with context:
                    check(here)
                results[name] = "ok"
            except Skip as reason:
                results[name] = SKIPPED + str(reason)
            except Exception:  # every failure is reported to the test, per check
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
