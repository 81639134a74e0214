"""The Triton kernels through every path the launchers take.

Without a GPU these run in Triton's interpreter on CPU tensors (small shapes); with one,
on CUDA at the sizes ``kernel_sizes`` picks. Each case runs fastbn.batch_norm on the
triton backend, forward and backward, and checks outputs, gradients and running
statistics against the float64 truth and against torch's own error on the same call.
"""

from __future__ import annotations

import helpers
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import (
    assert_close_to_truth,
    batch_norm_truth,
    grads_truth,
    kernel_sizes,
    tolerance,
)

import fastbn
from fastbn import launch, reference
from fastbn.conventions import BackwardInputs

pytestmark = pytest.mark.skipif(
    bool(fastbn.backend.triton_problem()), reason="the Triton kernels cannot run here"
)


def make_input(shape, dtype=torch.float32, layout="contiguous", mean=0.0, seed=0):
    """helpers.make_input's values in a layout: contiguous, channels_last, or one of the
    strided views below."""
    x = helpers.make_input(shape, dtype, seed=seed, offset=mean,
                           channels_last=layout == "channels_last", device=torch.device("cpu"))
    if layout == "sliced_channels":  # non-dense but flattenable: a slice of channels
        wide = torch.zeros(shape[0], shape[1] + 3, *shape[2:], dtype=dtype)
        wide[:, 1 : shape[1] + 1] = x
        x = wide[:, 1 : shape[1] + 1]
    elif layout == "strided_positions":  # spatial dims flatten to one stride of 2
        wide = torch.zeros(*shape[:-1], shape[-1] * 2, dtype=dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    elif layout == "strided_rows":  # spatial dims do not flatten: the launcher copies
        wide = torch.zeros(*shape[:2], shape[2] * 2, *shape[3:], dtype=dtype)
        wide[:, :, ::2] = x
        x = wide[:, :, ::2]
    elif layout == "transposed":  # 2-D (N, C) stored as (C, N)
        x = x.t().contiguous().t()
    return x.to(DEVICE)


def draw_call_tensors(x, affine, bias, track, residual, seed):
    """The generator (for what the caller draws next), weight, bias, running mean and
    variance, and residual of a call on x, drawn in that order from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    channels = x.shape[1]
    param_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    def vector(scale, shift):
        return (torch.rand(channels, generator=gen) * scale + shift).to(param_dtype).to(DEVICE)

    weight = vector(1.0, 0.5) if affine else None
    bias_t = vector(1.0, -0.5) if affine and bias else None
    running_mean = vector(0.2, -0.1) if track else None
    running_var = vector(0.5, 0.75) if track else None
    z = torch.randn(x.shape, generator=gen).to(x.dtype).to(DEVICE) if residual else None
    return gen, weight, bias_t, running_mean, running_var, z


def run_batch_norm(x, training=True, affine=True, bias=True, track=True, momentum=0.1,
                   residual=False, activation=None, grad_layout=None, seed=1):
    """fastbn (triton backend) and torch on the same call; returns both and the truth."""
    gen, weight, bias_t, running_mean, running_var, z = draw_call_tensors(
        x, affine, bias, track, residual, seed)
    grad_out = torch.randn(x.shape, generator=gen).to(x.dtype).to(DEVICE)
    if grad_layout == "contiguous":
        grad_out = grad_out.contiguous()
    elif grad_layout == "channels_last":
        grad_out = grad_out.to(memory_format=torch.channels_last)
    nbt = torch.tensor(4, device=DEVICE) if track else None

    results = {}
    for name in ("fastbn", "torch"):
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
                  for t in (x, weight, bias_t, z)]
        rm = running_mean.clone() if track else None
        rv = running_var.clone() if track else None
        if name == "fastbn":
            counter = nbt.clone() if track else None
            with fastbn.use_backend("triton"):
                y = fastbn.batch_norm(
                    leaves[0], rm, rv, leaves[1], leaves[2], training, momentum, 1e-5,
                    residual=leaves[3], activation=activation, num_batches_tracked=counter,
                )
                grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_out)
        else:
            factor = 1.0 / 5 if momentum is None else momentum
            u = F.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, factor, 1e-5)
            if leaves[3] is not None:
                u = u + leaves[3]
            y = _torch_activation(u, activation)
            grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_out)
        results[name] = {"y": y, "grads": grads, "running_mean": rm, "running_var": rv}
    truth = batch_norm_truth(
        x, running_mean, running_var, weight, bias_t, training, momentum, 1e-5, z, activation,
        num_batches_tracked=5,
    )
    truth_grads = grads_truth(truth, grad_out)
    return results, truth, truth_grads


def _torch_activation(u, activation):
    if activation is None:
        return u
    return {"relu": F.relu, "relu6": F.relu6, "leaky_relu": F.leaky_relu, "silu": F.silu,
            "hardswish": F.hardswish}[activation](u)


def check_all(results, truth, truth_grads, x_dtype):
    ours, theirs = results["fastbn"], results["torch"]
    assert ours["y"].stride() == torch.empty_like(ours["y"]).stride()
    assert_close_to_truth("y", ours["y"], truth["y"], theirs["y"])
    for name, mine, torch_grad in zip(truth_grads, ours["grads"], theirs["grads"], strict=True):
        assert_close_to_truth(f"grad {name}", mine, truth_grads[name], torch_grad, dtype=x_dtype)
    if truth["running_mean"] is not None:
        assert_close_to_truth("running_mean", ours["running_mean"], truth["running_mean"],
                              theirs["running_mean"])
        assert_close_to_truth("running_var", ours["running_var"], truth["running_var"],
                              theirs["running_var"])


LAYOUT_CASES = [
    ((4, 3, 8, 8), "contiguous"),
    ((4, 5, 6, 6), "channels_last"),
    ((37, 6), "contiguous"),
    ((37, 6), "transposed"),
    ((3, 5, 40), "contiguous"),
    ((2, 3, 3, 4, 5), "channels_last"),
    ((2, 3, 3, 4, 5), "contiguous"),
    ((4, 3, 5, 6), "sliced_channels"),
    ((3, 4, 5, 6), "strided_positions"),
    ((3, 4, 5, 6), "strided_rows"),
    ((5, 1, 7, 3), "contiguous"),
    ((6, 4, 1, 1), "contiguous"),
    ((2, 7, 5, 3), "channels_last"),
    ((3, 5, 40), "channels_last"),
]


@pytest.mark.parametrize("shape,layout", LAYOUT_CASES, ids=lambda v: str(v))
def test_training_forward_and_backward_in_every_layout(shape, layout):
    x = make_input(shape, layout=layout)
    check_all(*run_batch_norm(x), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_every_dtype_in_both_layouts(dtype, layout):
    x = make_input((4, 6, 5, 5), dtype=dtype, layout=layout)
    check_all(*run_batch_norm(x), dtype)


def stats_plan(x, momentum=0.1):
    return launch.plan_batch_stats(launch.geometry(x), x.dtype, True, momentum is None, True)


def test_statistics_split_into_chunks_with_partial_tiles():
    shape = (kernel_sizes(16, 64), 3, 33, 33)
    x = make_input(shape)
    plan = stats_plan(x)
    assert plan.launch.constexprs["CHUNKED"], "this shape must take the chunked path"
    assert plan.launch.constexprs["MERGE_CHUNKS"] > 1, "the merge must be a tree"
    assert 33 * 33 % plan.launch.constexprs["BLOCK_S"] != 0, "this shape must have partial tiles"
    check_all(*run_batch_norm(x), torch.float32)
    check_all(*run_batch_norm(x, momentum=None), torch.float32)


@pytest.fixture
def fresh_plans():
    """Plans made under a patched heuristic are not kept for later tests."""
    launch.clear_plans()
    yield
    launch.clear_plans()


def test_merge_in_several_tree_steps(monkeypatch, fresh_plans):
    """More chunks than one tree step merges: the groups are merged in chunk order."""
    x = make_input((kernel_sizes(32, 512), 64, 5, 5), layout="channels_last")
    monkeypatch.setattr(launch, "MERGE_ELEMENTS", 2 * launch.MAX_REDUCTION_BLOCK_C)
    plan = stats_plan(x)
    chunks = plan.launch.ints[-1]
    assert chunks > plan.launch.constexprs["MERGE_CHUNKS"] > 1
    check_all(*run_batch_norm(x), torch.float32)


def test_statistics_in_one_launch_when_one_chunk_suffices():
    x = make_input((4, 3, 8, 8))
    plan = stats_plan(x)
    assert not plan.launch.constexprs["CHUNKED"] and plan.workspace == 0
    check_all(*run_batch_norm(x), torch.float32)


def test_chunking_depends_on_the_shape_only():
    """The same plan on every device: no SM count, so the bits agree across GPU models."""
    x = make_input((16, 3, 33, 33))
    assert "sm_count" not in dir(launch)
    assert stats_plan(x) == stats_plan(x.to("meta"))


def test_channels_last_folds_the_batch_into_positions():
    x = make_input((4, 5, 6, 6), layout="channels_last")
    view = launch.plan_view([x])
    assert view.folded and view.batch == 1 and view.positions == 4 * 36
    assert view.strides(x)[1:] == (1, 5)


def test_sliced_channels_and_strided_positions_are_read_without_a_copy():
    for layout in ("sliced_channels", "strided_positions"):
        x = make_input((4, 3, 5, 6), layout=layout)
        assert not x.is_contiguous() and launch.readable(x) is x, layout


def test_rows_that_do_not_flatten_are_copied_once():
    x = make_input((3, 4, 5, 6), layout="strided_rows")
    copy = launch.readable(x)
    assert copy is not x and copy.is_contiguous() and torch.equal(copy, x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "flags",
    [
        dict(affine=False),
        dict(bias=False),
        dict(track=False),
        dict(momentum=None),
        dict(residual=True),
    ],
    ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()),
)
def test_flags_in_training_and_eval(flags, training):
    if not training and flags.get("track") is False:
        pytest.skip("eval without running statistics is the training path (tested there)")
    x = make_input((3, 5, 4, 4), layout="channels_last")
    check_all(*run_batch_norm(x, training=training, **flags), torch.float32)


@pytest.mark.parametrize("activation", ["relu", "relu6", "leaky_relu", "silu", "hardswish"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_fused_activation_and_residual(activation, residual):
    x = make_input((3, 4, 5, 5)) * 2
    check_all(*run_batch_norm(x, residual=residual, activation=activation), torch.float32)


def test_grad_out_in_another_layout_than_the_input():
    x = make_input((3, 4, 5, 5), layout="channels_last")
    check_all(*run_batch_norm(x, grad_layout="contiguous"), torch.float32)
    x = make_input((3, 4, 5, 5))
    check_all(*run_batch_norm(x, grad_layout="channels_last"), torch.float32)


def test_64_bit_offsets_give_the_same_bits(monkeypatch, fresh_plans):
    x = make_input((3, 5, 6, 6), layout="channels_last")
    first, _, _ = run_batch_norm(x, activation="silu", residual=True)
    monkeypatch.setattr(launch, "needs_int64", lambda geometries: True)
    launch.clear_plans()
    second, _, _ = run_batch_norm(x, activation="silu", residual=True)
    assert torch.equal(first["fastbn"]["y"], second["fastbn"]["y"])
    for a, b in zip(first["fastbn"]["grads"], second["fastbn"]["grads"], strict=True):
        assert torch.equal(a, b)


def test_needs_int64_only_past_two_to_the_31():
    small = torch.empty(0, device="meta").as_strided((2, 2), (1, 2**30))
    large = torch.empty(0, device="meta").as_strided((2, 3), (1, 2**30))
    assert not launch.needs_int64([launch.geometry(small)])
    assert launch.needs_int64([launch.geometry(large)])


def test_results_are_bitwise_reproducible():
    shape = (kernel_sizes(16, 64), 3, 33, 33)
    x = make_input(shape, dtype=torch.bfloat16)
    first, _, _ = run_batch_norm(x, residual=True, activation="relu")
    second, _, _ = run_batch_norm(x, residual=True, activation="relu")
    for key in ("y", "running_mean", "running_var"):
        assert torch.equal(first["fastbn"][key], second["fastbn"][key]), key
    for a, b in zip(first["fastbn"]["grads"], second["fastbn"]["grads"], strict=True):
        assert torch.equal(a, b)


def test_large_mean_keeps_variance_accurate():
    shape = (kernel_sizes(8, 64), 4, 16, 16)
    x = make_input(shape, mean=1e4)
    results, truth, truth_grads = run_batch_norm(x, momentum=1.0)
    check_all(results, truth, truth_grads, torch.float32)
    true_var = truth["running_var"]
    relative = (results["fastbn"]["running_var"].double().cpu() - true_var).abs() / true_var
    assert relative.max() < 1e-5


def test_constant_channel_gives_finite_output_equal_to_bias():
    x = make_input((4, 3, 5, 5))
    x[:, 1] = 7.0
    results, truth, truth_grads = run_batch_norm(x)
    y = results["fastbn"]["y"]
    assert torch.isfinite(y).all()
    check_all(results, truth, truth_grads, torch.float32)


def test_empty_batch_leaves_running_stats_and_counts_the_step():
    x = torch.randn(0, 3, 4, 4, device=DEVICE, requires_grad=True)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    nbt = torch.tensor(0, device=DEVICE)
    weight = torch.ones(3, device=DEVICE, requires_grad=True)
    with fastbn.use_backend("triton"):
        y = fastbn.batch_norm(x, rm, rv, weight, None, True, num_batches_tracked=nbt)
        (grad_weight,) = torch.autograd.grad(y.sum(), weight)
    assert y.shape == x.shape
    assert torch.equal(rm, torch.zeros(3, device=DEVICE))
    assert torch.equal(rv, torch.ones(3, device=DEVICE))
    assert nbt.item() == 1
    assert torch.equal(grad_weight, torch.zeros(3, device=DEVICE))


@pytest.mark.parametrize(
    "mask", [[True, False, False, False], [False, True, True, False], [False, False, False, True]],
    ids=["input", "params", "residual"],
)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_backward_computes_only_what_the_mask_asks(mask, batch_stats):
    x = make_input((3, 4, 6, 6), layout="channels_last")
    mean, var = reference.batch_mean_var(x)
    weight = torch.rand(4, device=DEVICE) + 0.5
    bias = torch.rand(4, device=DEVICE)
    z = torch.randn_like(x)
    grad_out = torch.randn_like(x)
    args = (BackwardInputs(grad_out, x, mean, var, weight, bias, z, None, 1e-5, "leaky_relu", 0.1),
            batch_stats, mask)
    ours = launch.normalize_backward(*args)
    expected = reference.normalize_backward(*args)
    for wanted, mine, theirs in zip(mask, ours, expected, strict=True):
        if wanted:
            atol, rtol = tolerance(torch.float32)
            torch.testing.assert_close(mine, theirs, atol=atol, rtol=rtol)
        else:
            assert mine.numel() == 0


MASK_SHAPES = [
    ((3, 4, 5, 5), "contiguous"), ((3, 4, 5, 5), "channels_last"), ((37, 6), "contiguous"),
    ((2, 3, 17), "contiguous"), ((2, 3, 17), "channels_last"), ((2, 3, 2, 3, 4), "channels_last"),
    ((5, 2, 1, 1), "contiguous"),
]


@pytest.mark.parametrize("activation", ["relu", "relu6", "leaky_relu"])
@pytest.mark.parametrize("shape,layout", MASK_SHAPES, ids=lambda v: str(v))
def test_activation_mask_packs_the_same_bits_as_the_reference(activation, shape, layout):
    x = make_input(shape, layout=layout) * 4
    mean, var = reference.batch_mean_var(x)
    weight = torch.rand(shape[1], device=DEVICE) + 0.5
    z = torch.randn_like(x)
    args = (x, mean, var, weight, None, z, 1e-5, activation, 0.1, True)
    y, mask = launch.normalize(*args)
    expected_y, expected_mask = reference.normalize(*args)
    assert mask.shape == reference.mask_shape(x) and mask.dtype == torch.uint8
    assert torch.equal(mask, expected_mask)
    assert torch.equal(reference.unpack_bits(mask, x), reference.derivative_is_one(
        reference.pre_activation(x, *_hi_scale_shift(x, mean, var, weight), z), activation))
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(y, expected_y, atol=atol, rtol=rtol)


def _hi_scale_shift(x, mean, var, weight):
    hi, _, _, scale, shift = reference.channel_constants(x, mean, var, weight, None, 1e-5)
    return hi, scale, shift


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_from_the_mask_equals_backward_from_the_residual(activation, layout):
    x = make_input((3, 4, 6, 5), layout=layout) * 3
    mean, var = reference.batch_mean_var(x)
    weight, bias = torch.rand(4, device=DEVICE) + 0.5, torch.randn(4, device=DEVICE)
    z = torch.randn_like(x)
    _, mask = launch.normalize(x, mean, var, weight, bias, z, 1e-5, activation, 0.1, True)
    grad_out = torch.randn_like(x)
    options, flags = (1e-5, activation, 0.1), (True, [True, True, True, True])
    from_mask = launch.normalize_backward(
        BackwardInputs(grad_out, x, mean, var, weight, bias, None, mask, *options), *flags)
    from_residual = launch.normalize_backward(
        BackwardInputs(grad_out, x, mean, var, weight, bias, z, None, *options), *flags)
    atol, rtol = tolerance(torch.float32)
    for a, b in zip(from_mask, from_residual, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_expanded_grad_out_from_sum_backward(layout):
    """y.sum().backward() hands the backward a grad_out with every stride 0."""
    x = make_input((3, 4, 5, 6), layout=layout)
    weight = torch.linspace(0.5, 1.5, 4, device=DEVICE)
    grad_out = torch.ones((), device=DEVICE).expand(x.shape)
    assert grad_out.stride() == (0, 0, 0, 0)
    truth = batch_norm_truth(x, None, None, weight, None, True, activation="silu")
    expected = grads_truth(truth, grad_out)
    leaf = x.clone().requires_grad_(True)
    with fastbn.use_backend("triton"):
        y = fastbn.batch_norm(leaf, None, None, weight, None, True, activation="silu")
        y.sum().backward()
    assert_close_to_truth("grad x", leaf.grad, expected["x"])


def test_strided_per_channel_vectors():
    x = make_input((3, 4, 5))
    weight = torch.linspace(0.5, 1.5, 8, device=DEVICE)[::2]
    running_mean = torch.linspace(-1, 1, 8, device=DEVICE)[1::2]
    running_var = torch.linspace(0.5, 2, 8, device=DEVICE)[::2]
    assert not weight.is_contiguous()
    truth = batch_norm_truth(x, running_mean, running_var, weight, None, True)
    with fastbn.use_backend("triton"):
        y = fastbn.batch_norm(x, running_mean, running_var, weight, None, True)
    assert_close_to_truth("y", y, truth["y"])
    assert_close_to_truth("running_mean", running_mean, truth["running_mean"])
    assert_close_to_truth("running_var", running_var, truth["running_var"])


def backward_kernels(x, **flags):
    """The kernels that the backward of run_batch_norm(x, **flags) launches (recorded, not
    run)."""
    with launch.recording() as records:
        run_batch_norm(x, **flags)
    return [planned.kernel for planned, _, _ in records if planned.module == "backward"]


ONE_LAUNCH = ["slice_backward_kernel"]
TWO_LAUNCHES = ["partial_grad_sums_kernel", "grad_input_kernel"]
# Shapes whose channel slices fit one program, and shapes whose slices do not (NCHW: 4 x
# 4096 padded positions; channels_last: 4 channels x 4096 folded positions).
BACKWARD_PATHS = [("one_launch", (3, 4, 5, 5), "contiguous"),
                  ("one_launch", (3, 4, 5, 5), "channels_last"),
                  ("two_launches", (3, 4, 60, 60), "contiguous"),
                  ("two_launches", (3, 4, 30, 30), "channels_last")]
BACKWARD_FLAGS = [dict(), dict(affine=False), dict(bias=False), dict(training=False),
                  dict(activation="silu", residual=True), dict(activation="relu6"),
                  dict(activation="relu", residual=True)]  # the last: activation bits


@pytest.mark.parametrize("path,shape,layout", BACKWARD_PATHS, ids=str)
@pytest.mark.parametrize("flags", BACKWARD_FLAGS,
                         ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "plain")
def test_backward_in_one_launch_and_in_two(path, shape, layout, flags):
    """Both backward plans with every flag: one program per channel block holding its whole
    slice, or the sums then d input."""
    x = make_input(shape, layout=layout)
    expected = ONE_LAUNCH if path == "one_launch" else TWO_LAUNCHES
    assert backward_kernels(x, **flags) == expected
    check_all(*run_batch_norm(x, **flags), torch.float32)


def test_one_launch_backward_in_every_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        x = make_input((3, 6, 4, 4), dtype=dtype, layout="channels_last")
        assert backward_kernels(x, activation="relu", residual=True) == ONE_LAUNCH
        check_all(*run_batch_norm(x, activation="relu", residual=True), dtype)


FLAT_CASES = [((2, 64, 7, 7), torch.float32), ((3, 13, 14, 14), torch.bfloat16),
              ((2, 45, 7, 7), torch.float64), ((2, 100, 3, 7), torch.float16)]


def flat_normalize(x, residual, activation):
    """Whether normalize walks x's flat range."""
    return launch.plan_normalize(launch.geometry(x), launch.geometry(x),
                                 launch.geometry(x) if residual else None, x.dtype,
                                 x.dtype if residual else None, True, True,
                                 activation or "none", False).constexprs["FLAT"]


@pytest.mark.parametrize("shape,dtype", FLAT_CASES, ids=str)
@pytest.mark.parametrize("activation,residual", [(None, False), ("silu", True), ("relu", True)],
                         ids=["plain", "silu+residual", "relu+residual(mask)"])
def test_contiguous_small_spatial_walks_the_flat_range(shape, dtype, activation, residual):
    """NCHW with S = 49 or 196: normalize walks the flat range, every slice boundary inside
    a channel or between channels and samples (the backward holds whole slices)."""
    x = make_input(shape, dtype=dtype)
    assert flat_normalize(x, residual, activation)
    assert backward_kernels(x, residual=residual, activation=activation) == ONE_LAUNCH
    check_all(*run_batch_norm(x, residual=residual, activation=activation), dtype)
    check_all(*run_batch_norm(x, training=False, residual=residual, activation=activation),
              dtype)


@pytest.mark.parametrize("activation,residual", [(None, False), ("silu", True), ("relu", True)],
                         ids=["plain", "silu+residual", "relu+residual(mask)"])
def test_two_launch_backward_walks_the_flat_range(activation, residual):
    """Too large a slice for one program (33 samples x 196 positions): d input walks the
    flat range; the forward writes the activation bits by tiles, the backward reads them
    flat."""
    x = make_input((33, 12, 14, 14), dtype=torch.bfloat16)
    assert flat_normalize(x, residual, activation)
    plan = launch.plan_backward(*[launch.geometry(x)] * 2, None, launch.geometry(x), None,
                                x.dtype, True, True, activation or "none", residual, True,
                                True, True, True)
    assert plan.one_launch is None and plan.grad_input.constexprs["FLAT"]
    check_all(*run_batch_norm(x, residual=residual, activation=activation), torch.bfloat16)


def test_channel_slice_with_rows_of_196_in_two_launches():
    """A slice of channels at 14x14: rows of known length (ROW) in every tile kernel,
    d input by tiles (x is not contiguous, so nothing walks the flat range)."""
    x = make_input((33, 5, 14, 14), layout="sliced_channels")
    g = launch.geometry(x)
    plan = launch.plan_backward(g, g, None, launch.geometry(torch.empty_like(x)), None,
                                x.dtype, True, True, "relu", False, True, True, True, True)
    assert plan.one_launch is None
    assert plan.sums.constexprs["ROW"] == plan.grad_input.constexprs["ROW"] == 196
    assert not plan.grad_input.constexprs["FLAT"]
    check_all(*run_batch_norm(x, activation="relu"), torch.float32)


def _poison(x, case):
    """x with non-finite values placed as ``case`` says (channel 0 unless noted)."""
    x = x.clone()
    middle = (x.shape[0] // 2, 0, *(size // 2 for size in x.shape[2:]))
    if case == "nan_element":
        x[middle] = float("nan")
    elif case == "inf_element":
        x[middle] = float("inf")
    elif case == "neg_inf_first_element":  # the anchor and the first tile's shift
        x[(0, 0, *([0] * (x.dim() - 2)))] = float("-inf")
    elif case == "nan_channel":
        x[:, 0] = float("nan")
    elif case == "inf_channel":
        x[:, 0] = float("inf")
    elif case == "sum_of_squares_overflows":  # every value finite, their squares' sum not
        x[:, 0] = x[:, 0] * 3e19
    return x


NON_FINITE = ["nan_element", "inf_element", "neg_inf_first_element", "nan_channel",
              "inf_channel", "sum_of_squares_overflows"]


@pytest.mark.parametrize(
    "case,shape,momentum",
    [(case, (4, 3, 5, 5), 0.1) for case in NON_FINITE]
    + [(case, (kernel_sizes(4, 64), 3, 33, 33), 0.1) for case in NON_FINITE]
    + [("inf_element", (kernel_sizes(4, 64), 3, 33, 33), None)],
    ids=str,
)
def test_non_finite_values_propagate_like_torch(case, shape, momentum):
    """Statistics, running statistics and output as torch's own BatchNorm gives them (CPU):
    NaN where torch has NaN, inf where it has inf, 0 where an overflowing variance gives 0;
    in one chunk and merged from several."""
    x = _poison(make_input(shape), case)
    assert stats_plan(x).launch.constexprs["CHUNKED"] == (shape[2] == 33)
    results = {}
    for name in ("fastbn", "torch"):
        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        nbt = torch.tensor(4, device=DEVICE)
        if name == "fastbn":
            with fastbn.use_backend("triton"):
                y = fastbn.batch_norm(x, rm, rv, None, None, True, momentum,
                                      num_batches_tracked=nbt)
        else:
            factor = 1 / 5 if momentum is None else momentum
            rm, rv = rm.cpu(), rv.cpu()
            y = F.batch_norm(x.cpu(), rm, rv, None, None, True, factor)
        results[name] = (y.cpu(), rm.cpu(), rv.cpu())
    atol, rtol = tolerance(torch.float32)
    for what, mine, theirs in zip(("y", "running_mean", "running_var"), results["fastbn"],
                                  results["torch"], strict=True):
        torch.testing.assert_close(mine, theirs, atol=atol, rtol=rtol, equal_nan=True,
                                   msg=lambda m, what=what: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# The one-launch training forward (launch.batch_norm_train_)
# ---------------------------------------------------------------------------------------------
TRAIN_FORWARD_FLAGS = [dict(), dict(affine=False), dict(bias=False), dict(track=False),
                       dict(momentum=None), dict(activation="silu", residual=True),
                       dict(activation="relu6"), dict(activation="leaky_relu", residual=True),
                       dict(activation="relu", residual=True, save_mask=True),
                       dict(activation="hardswish", residual=True)]


def train_forward(x, affine=True, bias=True, track=True, momentum=0.1, residual=False,
                  activation=None, save_mask=False, seed=1):
    """launch.batch_norm_train_ on x, the kernels it launched, and the float64 truth."""
    gen, weight, bias_t, running_mean, running_var, z = draw_call_tensors(
        x, affine, bias, track, residual, seed)
    nbt = torch.tensor(4, device=DEVICE) if track else None
    rm = None if running_mean is None else running_mean.clone()
    rv = None if running_var is None else running_var.clone()
    with launch.recording() as records:  # planned, not run: the kernels it would launch
        launch.batch_norm_train_(x, rm, rv, None if nbt is None else nbt.clone(), momentum,
                                 weight, bias_t, z, 1e-5, activation or "none", 0.01,
                                 save_mask)
    y, mean, var, mask = launch.batch_norm_train_(
        x, rm, rv, nbt, momentum, weight, bias_t, z, 1e-5, activation or "none", 0.01,
        save_mask)
    truth = batch_norm_truth(x, running_mean, running_var, weight, bias_t, True, momentum,
                             1e-5, z, activation, num_batches_tracked=5)
    return dict(y=y, mean=mean, var=var, mask=mask, running_mean=rm, running_var=rv,
                num_batches_tracked=nbt, kernels=[p.kernel for p, _, _ in records],
                weight=weight, bias=bias_t, residual=z), truth


def check_train_forward(result, truth, x, activation=None, save_mask=False):
    """y, the batch statistics, the running statistics and the step count against the
    float64 truth; the activation bits those of u recomputed from the statistics."""
    dtype = x.dtype
    assert_close_to_truth("y", result["y"], truth["y"].to(dtype), dtype=dtype)
    assert result["y"].stride() == torch.empty_like(x).stride()
    x64 = x.double().cpu()
    dims = [0, *range(2, x.dim())]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close_to_truth("mean", result["mean"], x64.mean(dims), dtype=compute)
    assert_close_to_truth("var", result["var"], x64.var(dims, unbiased=False), dtype=compute)
    if truth["running_mean"] is not None:
        assert_close_to_truth("running_mean", result["running_mean"], truth["running_mean"],
                              dtype=compute)
        assert_close_to_truth("running_var", result["running_var"], truth["running_var"],
                              dtype=compute)
        assert result["num_batches_tracked"].item() == 5
    if save_mask:
        hi, _, _, scale, shift = reference.channel_constants(
            x, result["mean"], result["var"], result["weight"], result["bias"], 1e-5)
        u = reference.pre_activation(x, hi, scale, shift, result["residual"])
        assert result["mask"].shape == reference.mask_shape(x)
        assert torch.equal(result["mask"], reference.pack_bits(
            reference.derivative_is_one(u, activation)))
    else:
        assert result["mask"].numel() == 0


ONE_LAUNCH_FORWARD = ["slice_forward_kernel"]
TWO_LAUNCH_FORWARD = ["partial_stats_kernel", "normalize_kernel"]
FORWARD_PATHS = [("one_launch", (3, 4, 5, 5), "contiguous"),
                 ("one_launch", (3, 4, 5, 5), "channels_last"),
                 ("one_launch", (37, 6), "contiguous"),
                 ("one_launch", (3, 5, 40), "sliced_channels"),
                 ("two_launches", (3, 4, 60, 60), "contiguous"),
                 ("two_launches", (3, 4, 30, 30), "channels_last")]


@pytest.mark.parametrize("path,shape,layout", FORWARD_PATHS, ids=str)
@pytest.mark.parametrize("flags", TRAIN_FORWARD_FLAGS,
                         ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "plain")
def test_training_forward_in_one_launch_and_in_two(path, shape, layout, flags):
    """Both forward plans with every flag: one program per channel block holding its whole
    slice, or the statistics then normalize."""
    x = make_input(shape, layout=layout, mean=2.0)
    result, truth = train_forward(x, **flags)
    assert result["kernels"] == (ONE_LAUNCH_FORWARD if path == "one_launch"
                                 else TWO_LAUNCH_FORWARD)
    check_train_forward(result, truth, x, flags.get("activation"), flags.get("save_mask"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_one_launch_training_forward_in_every_dtype(dtype, layout):
    x = make_input((3, 6, 4, 4), dtype=dtype, layout=layout)
    flags = dict(activation="relu", residual=True, save_mask=True)
    result, truth = train_forward(x, **flags)
    assert result["kernels"] == ONE_LAUNCH_FORWARD
    check_train_forward(result, truth, x, "relu", True)


def test_one_launch_forward_statistics_survive_a_large_mean():
    """The two-pass over registers: mean 1e4, spread 1, in float32."""
    x = make_input((4, 3, 5, 5), mean=1e4)
    result, truth = train_forward(x)
    assert result["kernels"] == ONE_LAUNCH_FORWARD
    check_train_forward(result, truth, x)


def test_one_launch_forward_is_bitwise_reproducible():
    x = make_input((5, 3, 7, 7), layout="channels_last")
    first, _ = train_forward(x, activation="relu", residual=True, save_mask=True)
    second, _ = train_forward(x, activation="relu", residual=True, save_mask=True)
    for name in ("y", "mean", "var", "mask", "running_mean", "running_var"):
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("case", NON_FINITE)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_launch_forward_propagates_non_finite_values_like_torch(case, momentum):
    x = _poison(make_input((4, 3, 5, 5)), case)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    nbt = torch.tensor(4, device=DEVICE)
    y, _, _, _ = launch.batch_norm_train_(x, rm, rv, nbt, momentum, None, None, None, 1e-5,
                                          "none", 0.01, False)
    trm, trv = torch.zeros(3), torch.ones(3)
    expected = F.batch_norm(x.cpu(), trm, trv, None, None, True,
                            1 / 5 if momentum is None else momentum)
    atol, rtol = tolerance(torch.float32)
    for what, mine, theirs in (("y", y, expected), ("running_mean", rm, trm),
                               ("running_var", rv, trv)):
        torch.testing.assert_close(mine.cpu(), theirs, atol=atol, rtol=rtol, equal_nan=True,
                                   msg=lambda m, what=what: f"{what}: {m}")
    assert nbt.item() == 5


def test_one_launch_forward_then_backward_matches_the_truth():
    """The statistics the one-launch forward writes serve the one-launch backward."""
    x = make_input((3, 4, 5, 5))
    result, truth = train_forward(x, activation="relu", residual=True, save_mask=True)
    grad_out = torch.randn_like(x)
    grads = launch.normalize_backward(
        BackwardInputs(grad_out, x, result["mean"], result["var"], result["weight"],
                       result["bias"], None, result["mask"], 1e-5, "relu", 0.01),
        True, [True, True, True, True])
    truth_grads = grads_truth(truth, grad_out)
    for name, mine in zip(("x", "weight", "bias", "residual"), grads, strict=True):
        assert_close_to_truth(f"grad {name}", mine, truth_grads[name], dtype=torch.float32)
