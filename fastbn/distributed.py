"""SyncBatchNorm's statistics exchange: BatchNorm over the batch of every rank of a group.

Each rank holds a share of the batch (shares may differ in size; a share may be empty, but
its rank still joins every collective). A training step takes two collectives over
torch.distributed (NCCL on GPUs, gloo on CPUs), and nothing else waits for the host:

Forward. Each rank summarises its share per channel with fastbn's statistics path
(``ops.batch_stats_``): count M_r, mean and M2_r = M_r * biased variance, packed as one
[3, C] float64 tensor. One all_gather makes the [world, 3, C] table of every rank's summary,
and every rank merges it the same way (Chan's formula, see ``merge_summaries``) into the
global mean and biased variance and the global count M, a device tensor. The running
statistics take the global statistics (unbiased variance var * M / (M - 1)), and
``ops.normalize`` writes y = act((x - mean) * invstd * weight + bias + residual).

Why all_gather and not an all_reduce of (count, sum x, sum x^2): that sum cancels, since
var = (sum x^2 - (sum x)^2 / M) / M loses every digit the mean has over the spread (mean 1e4
and std 1 leave about 8 of float64's 16 digits, and nothing in float32), and shifting the
sums first would need the shift agreed on by another collective. The summaries merge
without cancellation and exactly for any counts, empty shares included. And each rank
merges the same table in the same order, so all ranks get bitwise the same statistics,
whatever order the collective library adds in (an all_reduce's order depends on its
algorithm and the world size). The price is a table of world * 3 * C float64 values
(48 KB at 8 ranks and C = 256) instead of 3 * C: small beside the activations, and one
collective's latency either way.

Backward. ``fastbn.reference.normalize_backward``'s two pieces, with one all_reduce (sum)
between them: of the packed [2, C] local sums (sum(g), sum(g * x_hat)), which divided by the
global count M are the means d input is made from (the formula is written out there).
d weight = sum(g * x_hat) and d bias = sum(g) are the *local* sums, as
torch.nn.SyncBatchNorm returns them: DistributedDataParallel then averages them
over the ranks like every other parameter gradient, so both train alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastbn import ops
from fastbn.backend import resolve_backend
from fastbn.conventions import STATS_DTYPE, reduced_count
from fastbn.functional import check_arguments, saves_activation_mask
from fastbn.reference import update_running_stats_


def sync_world_size(process_group: Any) -> int:
    """How many ranks SyncBatchNorm synchronises over: the size of process_group (the
    default group when None), or 1 outside an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    process_group: Any,
    *,
    residual: Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """fastbn.batch_norm in training, with the batch statistics of every rank of
    ``process_group`` (the default group when None); every rank must call it."""
    activation_name = "none" if activation is None else activation
    check_arguments(
        input, running_mean, running_var, weight, bias, True, momentum, eps, residual,
        activation_name, num_batches_tracked, whole_batch=False, negative_slope=negative_slope,
    )
    save_mask = saves_activation_mask(activation_name, input, weight, bias, residual)
    return _SyncBatchNorm.apply(
        input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
        momentum, eps, activation_name, negative_slope, save_mask, process_group,
        resolve_backend(input),
    )


class _SyncBatchNorm(torch.autograd.Function):
    """y = act(BatchNorm(input) + residual) with statistics over every rank; see the module
    docstring. Once differentiable, like torch.nn.SyncBatchNorm."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var,
                num_batches_tracked, momentum, eps, activation, negative_slope, save_mask,
                process_group, backend):
        mean, var, count = global_batch_stats_(
            input, running_mean, running_var, num_batches_tracked, momentum, process_group,
            backend,
        )
        output, activation_mask = ops.call_normalize(
            input, mean, var, weight, bias, residual, eps, True, activation, negative_slope,
            save_mask, backend,
        )
        # As fastbn::normalize keeps them (ops.kept_residual).
        ctx.save_for_backward(input, mean, var, count, weight, bias,
                              ops.kept_residual(residual, activation, save_mask),
                              activation_mask if save_mask else None)
        ctx.has_residual = residual is not None
        ctx.eps = eps
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.process_group = process_group
        ctx.backend = backend
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, mean, var, count, weight, bias, residual, activation_mask = ctx.saved_tensors
        needs = ctx.needs_input_grad
        want_input, want_weight, want_bias = needs[0], needs[1], needs[2]
        want_residual = needs[3] and ctx.has_residual
        common = (grad_output, x, mean, var, weight, bias, residual, activation_mask)
        sums = None
        grad_weight = grad_bias = x.new_empty(0)
        if want_input or want_weight or want_bias:
            sums, grad_weight, grad_bias = ops.call_normalize_grad_sums(
                *common, ctx.eps, ctx.activation, ctx.negative_slope, [want_weight, want_bias],
                ctx.backend,
            )
        grad_means = None
        if want_input:
            # Every rank joins, an empty share with zero sums; the global count is a device
            # tensor, so the means are taken on the device.
            dist.all_reduce(sums, dist.ReduceOp.SUM, group=ctx.process_group)
            grad_means = (sums / count).to(sums.dtype)
        grad_input, grad_residual = ops.call_normalize_grad_input(
            *common, grad_means, ctx.eps, True, ctx.activation, ctx.negative_slope,
            [want_input, want_residual], ctx.backend,
        )
        grads = (grad_input, grad_weight, grad_bias, grad_residual)
        wanted = (want_input, want_weight and weight is not None,
                  want_bias and bias is not None, want_residual)
        # One gradient per forward argument: four tensors, then ten that take none.
        return (*(g if w else None for g, w in zip(grads, wanted, strict=True)),) + (None,) * 10


def global_batch_stats_(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    process_group: Any,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance (STATS_DTYPE) over the shares of every rank, and their count
    (a float64 [C] tensor, the same in every channel); running statistics updated in place
    and num_batches_tracked incremented, as ``ops.batch_stats_`` does for one process."""
    mean, var = ops.call_batch_stats_(x.detach(), None, None, num_batches_tracked, momentum,
                                      backend)
    count = reduced_count(x)
    summary = torch.stack([torch.full_like(mean, count), mean, var * count])
    world = dist.get_world_size(process_group)
    table = summary.new_empty((world * 3, x.shape[1]))
    _all_gather_into_tensor(table, summary, process_group)
    mean, var, count = merge_summaries(table.view(world, 3, -1))
    if running_mean is not None and running_var is not None:
        update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var, count,
                              momentum)
    return mean, var, count


def merge_summaries(table: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's merge of per-rank summaries [world, (count, mean, M2), C] into the mean and
    biased variance of all ranks together, and the total count.

    All ranks at once: mean = sum(M_r mean_r) / M and M2 = sum(M2_r + M_r (mean_r - mean)^2),
    which for two ranks is Chan's pairwise formula. Reductions over the rank dimension of a
    fixed-shape tensor: the same order on every rank and in every run. Empty ranks weigh 0;
    with no values anywhere, mean and variance are 0.
    """
    counts, means, m2s = table.to(STATS_DTYPE).unbind(1)
    count = counts.sum(0)
    divisor = count.clamp_min(1)
    mean = (counts * means).sum(0) / divisor
    m2 = (m2s + counts * (means - mean).square()).sum(0)
    return mean, m2 / divisor, count


def _all_gather_into_tensor(output: Tensor, input: Tensor, process_group: Any) -> None:
    """All ranks' ``input`` concatenated along dimension 0 into ``output``, in rank order
    (torch >= 2.13 names this collective all_gather_single)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=process_group)
