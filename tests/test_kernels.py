"""The Triton kernels through every path the launchers take.

Without a GPU these run in Triton's interpreter on CPU tensors (small shapes); with one,
on CUDA at the sizes ``kernel_sizes`` picks. Each case of a table runs fastbn.batch_norm
on the triton backend beside torch through the shared runner (tests/cases.py): output,
gradients, running statistics and step count against the float64 truth and against
torch's own error on the same call. The plan tests say which kernels a case takes; the
launch-level tests (the activation bits, the backward's pieces, the one-launch training
forward) call fastbn.launch on tensors drawn by cases.draw and check them by the same
assertions.
"""

from __future__ import annotations

import pytest
import torch
from cases import (
    EPS,
    LEAVES,
    MEMORY_FORMATS,
    SLOPE,
    Case,
    assert_results_match_truth,
    cases,
    draw,
    draw_away_from_kinks,
    fastbn_call,
    fresh_state,
    run,
    run_side_by_side,
    torch_call,
    truth_of,
)
from conftest import DEVICE
from helpers import (
    DTYPES,
    ROUNDING_MARGIN,
    assert_close_to_truth,
    assert_matches,
    kernel_sizes,
    tolerance,
)

import fastbn
from fastbn import conventions, launch, reference
from fastbn.conventions import BackwardInputs

pytestmark = pytest.mark.skipif(
    bool(fastbn.backend.triton_problem()), reason="the Triton kernels cannot run here"
)


@pytest.fixture(autouse=True)
def triton_backend():
    """Every fastbn call here runs the kernels."""
    with fastbn.use_backend("triton"):
        yield


@pytest.fixture
def fresh_plans():
    """Plans made under a patched heuristic are not kept for later tests."""
    launch.clear_plans()
    yield
    launch.clear_plans()


# grad_out and the residual contiguous whatever x's layout, as a caller's fresh tensors come:
# the launchers plan each tensor's strides on its own.
KERNEL = Case((3, 4, 5, 5), grad_layout="contiguous", residual_layout="contiguous")


def x_of(case: Case) -> torch.Tensor:
    return draw(case, DEVICE)["x"]


def assert_same_bits(first: dict, second: dict) -> None:
    """Two runs' results (``cases.run``'s) bit for bit."""
    for name in ("y", "running_mean", "running_var"):
        assert (first[name] is None) == (second[name] is None), name
        assert first[name] is None or torch.equal(first[name], second[name]), name
    assert first["grads"].keys() == second["grads"].keys()
    for name, grad in first["grads"].items():
        assert torch.equal(grad, second["grads"][name]), f"grad {name}"


# ---------------------------------------------------------------------------------------------
# Layouts, dtypes, flags and fusions through fastbn.batch_norm
# ---------------------------------------------------------------------------------------------
LAYOUT_CASES = [
    KERNEL.but(shape=(4, 3, 8, 8)),
    KERNEL.but(shape=(4, 5, 6, 6), layout="channels_last"),
    KERNEL.but(shape=(37, 6)),
    KERNEL.but(shape=(37, 6), layout="transposed"),
    KERNEL.but(shape=(3, 5, 40)),
    KERNEL.but(shape=(2, 3, 3, 4, 5), layout="channels_last"),
    KERNEL.but(shape=(2, 3, 3, 4, 5)),
    KERNEL.but(shape=(4, 3, 5, 6), layout="sliced_channels"),
    KERNEL.but(shape=(3, 4, 5, 6), layout="strided_positions"),
    KERNEL.but(shape=(3, 4, 5, 6), layout="strided_rows"),
    KERNEL.but(shape=(5, 1, 7, 3)),
    KERNEL.but(shape=(6, 4, 1, 1)),
    KERNEL.but(shape=(2, 7, 5, 3), layout="channels_last"),
    KERNEL.but(shape=(3, 5, 40), layout="channels_last"),
    # grad_out and the residual in x's layout
    KERNEL.but(layout="channels_last", grad_layout=None, residual=True, residual_layout=None),
    KERNEL.but(shape=(37, 6), layout="transposed", grad_layout=None),
    KERNEL.but(shape=(4, 3, 5, 6), layout="sliced_channels", grad_layout=None,
               residual=True, residual_layout=None),
    KERNEL.but(shape=(3, 4, 5, 6), layout="strided_positions", grad_layout=None,
               residual=True, residual_layout=None, activation="relu"),
]


@cases(*LAYOUT_CASES)
def test_training_forward_and_backward_in_every_layout(case):
    run_side_by_side(case, DEVICE)


@cases(*(KERNEL.but(shape=(4, 6, 5, 5), dtype=dtype, layout=layout)
         for dtype in DTYPES for layout in MEMORY_FORMATS))
def test_every_dtype_in_both_layouts(case):
    run_side_by_side(case, DEVICE)


FLAGS = [dict(weight=False, bias=False), dict(bias=False), dict(running_stats=False),
         dict(momentum=None), dict(residual=True)]


# (eval without running statistics is the training path, tested there)
@cases(*(KERNEL.but(shape=(3, 5, 4, 4), layout="channels_last", training=training, **flags)
         for flags in FLAGS for training in (True, False)
         if training or flags != dict(running_stats=False)))
def test_flags_in_training_and_eval(case):
    run_side_by_side(case, DEVICE)


@cases(*(KERNEL.but(spread=2.0, residual=residual, activation=activation)
         for activation in ("relu", "relu6", "leaky_relu", "silu", "hardswish")
         for residual in (False, True)))
def test_fused_activation_and_residual(case):
    run_side_by_side(case, DEVICE)


@cases(KERNEL.but(layout="channels_last"), KERNEL.but(grad_layout="channels_last"))
def test_grad_out_in_another_layout_than_the_input(case):
    run_side_by_side(case, DEVICE)


@cases(*(Case((3, 4, 5, 6), layout=layout, grad_layout="expanded", bias=False,
              running_stats=False, activation="silu") for layout in MEMORY_FORMATS))
def test_expanded_grad_out_from_sum_backward(case):
    """y.sum().backward() hands the backward a grad_out with every stride 0."""
    assert draw(case, DEVICE)["grad_out"].stride() == (0, 0, 0, 0)
    run_side_by_side(case, DEVICE)


@cases(KERNEL.but(shape=(3, 4, 5), bias=False), KERNEL.but(shape=(3, 4, 5)))
def test_strided_per_channel_vectors(case):
    """weight, bias and the running statistics as views of stride 2."""
    tensors = draw(case, DEVICE)
    for name in ("weight", "bias", "running_mean", "running_var"):
        if tensors[name] is not None:
            tensors[name] = tensors[name].new_zeros(2 * case.shape[1])[::2].copy_(tensors[name])
    assert not tensors["weight"].is_contiguous()
    run_side_by_side(case, DEVICE, tensors)


# ---------------------------------------------------------------------------------------------
# The statistics launch: chunks, merges, views
# ---------------------------------------------------------------------------------------------
def stats_plan(case: Case, x: torch.Tensor | None = None) -> launch.StatsPlan:
    x = x_of(case) if x is None else x
    return launch.plan_batch_stats(launch.geometry(x), x.dtype, case.running_stats,
                                   case.momentum is None, case.counter)


CHUNKED = KERNEL.but(shape=(kernel_sizes(16, 64), 3, 33, 33))


@cases(CHUNKED, CHUNKED.but(momentum=None))
def test_statistics_split_into_chunks_with_partial_tiles(case):
    constexprs = stats_plan(case).launch.constexprs
    assert constexprs["CHUNKED"], "this shape must take the chunked path"
    assert constexprs["MERGE_CHUNKS"] > 1, "the merge must be a tree"
    assert 33 * 33 % constexprs["BLOCK_S"] != 0, "this shape must have partial tiles"
    run_side_by_side(case, DEVICE)


def test_merge_in_several_tree_steps(monkeypatch, fresh_plans):
    """More chunks than one tree step merges: the groups are merged in chunk order."""
    case = KERNEL.but(shape=(kernel_sizes(32, 512), 64, 5, 5), layout="channels_last")
    monkeypatch.setattr(launch, "MERGE_ELEMENTS", 2 * launch.MAX_REDUCTION_BLOCK_C)
    plan = stats_plan(case)
    chunks = plan.launch.ints[-1]
    assert chunks > plan.launch.constexprs["MERGE_CHUNKS"] > 1
    run_side_by_side(case, DEVICE)


def test_statistics_in_one_launch_when_one_chunk_suffices():
    case = KERNEL.but(shape=(4, 3, 8, 8))
    plan = stats_plan(case)
    assert not plan.launch.constexprs["CHUNKED"] and plan.workspace == 0
    run_side_by_side(case, DEVICE)


def test_chunking_depends_on_the_shape_only():
    """The same plan on every device: no SM count, so the bits agree across GPU models."""
    case = KERNEL.but(shape=(16, 3, 33, 33))
    assert "sm_count" not in dir(launch)
    assert stats_plan(case) == stats_plan(case, x_of(case).to("meta"))


def test_channels_last_folds_the_batch_into_positions():
    x = x_of(KERNEL.but(shape=(4, 5, 6, 6), layout="channels_last"))
    view = launch.plan_view([x])
    assert view.folded and view.batch == 1 and view.positions == 4 * 36
    assert view.strides(x)[1:] == (1, 5)


@pytest.mark.parametrize("layout", ["sliced_channels", "strided_positions"])
def test_sliced_channels_and_strided_positions_are_read_without_a_copy(layout):
    x = x_of(KERNEL.but(shape=(4, 3, 5, 6), layout=layout))
    assert not x.is_contiguous() and launch.readable(x) is x


def test_rows_that_do_not_flatten_are_copied_once():
    x = x_of(KERNEL.but(shape=(3, 4, 5, 6), layout="strided_rows"))
    copy = launch.readable(x)
    assert copy is not x and copy.is_contiguous() and torch.equal(copy, x)


# ---------------------------------------------------------------------------------------------
# Offsets, reproducibility, numerics
# ---------------------------------------------------------------------------------------------
def test_64_bit_offsets_give_the_same_bits(monkeypatch, fresh_plans):
    case = KERNEL.but(shape=(3, 5, 6, 6), layout="channels_last", activation="silu",
                      residual=True)
    tensors = draw(case, DEVICE)
    first = run(fastbn_call, case, tensors)
    monkeypatch.setattr(launch, "needs_int64", lambda geometries: True)
    launch.clear_plans()
    assert_same_bits(first, run(fastbn_call, case, tensors))


def test_needs_int64_only_past_two_to_the_31():
    small = torch.empty(0, device="meta").as_strided((2, 2), (1, 2**30))
    large = torch.empty(0, device="meta").as_strided((2, 3), (1, 2**30))
    assert not launch.needs_int64([launch.geometry(small)])
    assert launch.needs_int64([launch.geometry(large)])


def test_results_are_bitwise_reproducible():
    case = CHUNKED.but(dtype=torch.bfloat16, residual=True, activation="relu")
    tensors = draw(case, DEVICE)
    assert_same_bits(run(fastbn_call, case, tensors), run(fastbn_call, case, tensors))


def test_large_mean_keeps_variance_accurate():
    case = KERNEL.but(shape=(kernel_sizes(8, 64), 4, 16, 16), offset=1e4, momentum=1.0)
    ours, _, truth = run_side_by_side(case, DEVICE)
    true_var = truth["running_var"]
    relative = (ours["running_var"].double().cpu() - true_var).abs() / true_var
    assert relative.max() < 1e-5


def test_constant_channel_gives_finite_output_equal_to_bias():
    case = KERNEL.but(shape=(4, 3, 5, 5))
    tensors = draw(case, DEVICE)
    tensors["x"][:, 1] = 7.0
    ours, _, _ = run_side_by_side(case, DEVICE, tensors)
    assert torch.isfinite(ours["y"]).all()


def test_empty_batch_leaves_running_stats_and_counts_the_step():
    case = KERNEL.but(shape=(0, 3, 4, 4), bias=False)
    tensors = draw(case, DEVICE)
    ours, _, _ = run_side_by_side(case, DEVICE, tensors)
    assert ours["y"].shape == case.shape
    for name in ("running_mean", "running_var"):
        assert torch.equal(ours[name], tensors[name]), name
    assert torch.equal(ours["grads"]["weight"], torch.zeros(3, device=DEVICE))


def poisoned(case: Case, where: str) -> dict:
    """The case's tensors, without grad_out (a forward only), with non-finite values placed
    in x as ``where`` says (channel 0 unless noted)."""
    tensors = draw(case, DEVICE) | {"grad_out": None}
    x = tensors["x"]
    middle = (x.shape[0] // 2, 0, *(size // 2 for size in x.shape[2:]))
    if where == "nan_element":
        x[middle] = float("nan")
    elif where == "inf_element":
        x[middle] = float("inf")
    elif where == "neg_inf_first_element":  # the anchor and the first tile's shift
        x[(0, 0, *([0] * (x.dim() - 2)))] = float("-inf")
    elif where == "nan_channel":
        x[:, 0] = float("nan")
    elif where == "inf_channel":
        x[:, 0] = float("inf")
    elif where == "sum_of_squares_overflows":  # every value finite, their squares' sum not
        x[:, 0] = x[:, 0] * 3e19
    return tensors


def assert_same_as_torchs_cpu_batch_norm(ours: dict, case: Case, tensors: dict) -> None:
    """Output and running statistics as torch's own CPU BatchNorm gives them: NaN where
    torch has NaN, inf where it has inf; the step counted."""
    theirs = run(torch_call, case, {name: None if t is None else t.cpu()
                                    for name, t in tensors.items()})
    atol, rtol = tolerance(torch.float32)
    for name in ("y", "running_mean", "running_var"):
        torch.testing.assert_close(ours[name].cpu(), theirs[name], atol=atol, rtol=rtol,
                                   equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")
    assert int(ours["num_batches_tracked"]) == int(theirs["num_batches_tracked"]) == 5


NON_FINITE = ["nan_element", "inf_element", "neg_inf_first_element", "nan_channel",
              "inf_channel", "sum_of_squares_overflows"]
PLAIN = KERNEL.but(shape=(4, 3, 5, 5), weight=False, bias=False)
PLAIN_CHUNKED = PLAIN.but(shape=(kernel_sizes(4, 64), 3, 33, 33))


@pytest.mark.parametrize(
    "where,case",
    [(where, PLAIN) for where in NON_FINITE] + [(where, PLAIN_CHUNKED) for where in NON_FINITE]
    + [("inf_element", PLAIN_CHUNKED.but(momentum=None))],
    ids=lambda v: v.id if isinstance(v, Case) else v,
)
def test_non_finite_values_propagate_like_torch(where, case):
    """Statistics, running statistics and output as torch's own BatchNorm gives them (CPU):
    NaN where torch has NaN, inf where it has inf, 0 where an overflowing variance gives 0;
    in one chunk and merged from several."""
    assert stats_plan(case).launch.constexprs["CHUNKED"] == (case.shape[2] == 33)
    tensors = poisoned(case, where)
    assert_same_as_torchs_cpu_batch_norm(run(fastbn_call, case, tensors), case, tensors)


# ---------------------------------------------------------------------------------------------
# The backward's pieces and the activation bits (fastbn.launch against fastbn.reference)
# ---------------------------------------------------------------------------------------------
def backward_inputs(tensors: dict, case: Case, activation_mask=None) -> BackwardInputs:
    """normalize_backward's inputs for the case's tensors, with x's batch statistics; the
    residual, unless the activation bits stand in for it."""
    x = tensors["x"]
    mean, var = reference.batch_mean_var(x)
    residual = tensors["residual"] if activation_mask is None else None
    return BackwardInputs(tensors["grad_out"], x, mean, var, tensors["weight"], tensors["bias"],
                          residual, activation_mask, EPS, case.activation, SLOPE)


@pytest.mark.parametrize(
    "output_mask", [[True, False, False, False], [False, True, True, False],
                    [False, False, False, True]],
    ids=["input", "params", "residual"],
)
@pytest.mark.parametrize("use_batch_stats", [True, False], ids=["batch", "running"])
def test_backward_computes_only_what_the_mask_asks(output_mask, use_batch_stats):
    case = Case((3, 4, 6, 6), layout="channels_last", residual=True, activation="leaky_relu")
    args = (backward_inputs(draw(case, DEVICE), case), use_batch_stats, output_mask)
    ours = launch.normalize_backward(*args)
    expected = reference.normalize_backward(*args)
    for name, wanted, mine, theirs in zip(LEAVES, output_mask, ours, expected, strict=True):
        if wanted:
            assert_matches(f"grad {name}", mine, theirs)
        else:
            assert mine is None, name  # (the op layer makes the empty tensor)


MASK_SHAPES = [
    Case((3, 4, 5, 5)), Case((3, 4, 5, 5), layout="channels_last"), Case((37, 6)),
    Case((2, 3, 17)), Case((2, 3, 17), layout="channels_last"),
    Case((2, 3, 2, 3, 4), layout="channels_last"), Case((5, 2, 1, 1)),
]


@cases(*(shape.but(bias=False, residual=True, spread=4.0, activation=activation)
         for activation in conventions.SIGN_ACTIVATIONS for shape in MASK_SHAPES))
def test_activation_mask_packs_the_same_bits_as_the_reference(case):
    tensors = draw(case, DEVICE)
    x, weight, residual = tensors["x"], tensors["weight"], tensors["residual"]
    mean, var = reference.batch_mean_var(x)
    args = (x, mean, var, weight, None, residual, EPS, case.activation, SLOPE, True)
    y, mask = launch.normalize(*args)
    expected_y, expected_mask = reference.normalize(*args)
    assert mask.shape == conventions.mask_shape(x) and mask.dtype == torch.uint8
    assert torch.equal(mask, expected_mask)
    hi, _, _, scale, shift = reference.channel_constants(x, mean, var, weight, None, EPS)
    u = reference.pre_activation(x, hi, scale, shift, residual)
    assert torch.equal(reference.unpack_bits(mask, x),
                       reference.derivative_is_one(u, case.activation))
    assert_matches("y", y, expected_y)


@cases(*(Case((3, 4, 6, 5), layout=layout, residual=True, spread=3.0, activation=activation)
         for activation in ("relu", "leaky_relu") for layout in MEMORY_FORMATS))
def test_backward_from_the_mask_equals_backward_from_the_residual(case):
    tensors = draw(case, DEVICE)
    inputs = backward_inputs(tensors, case)
    _, mask = launch.normalize(inputs.x, inputs.mean, inputs.var, inputs.weight, inputs.bias,
                               inputs.residual, EPS, case.activation, SLOPE, True)
    flags = (True, [True, True, True, True])
    from_mask = launch.normalize_backward(backward_inputs(tensors, case, mask), *flags)
    from_residual = launch.normalize_backward(inputs, *flags)
    for name, a, b in zip(LEAVES, from_mask, from_residual, strict=True):
        assert_matches(f"grad {name}", a, b)


# ---------------------------------------------------------------------------------------------
# The backward's plans: one launch or two, tiles or the flat range
# ---------------------------------------------------------------------------------------------
def backward_kernels(case: Case) -> list[str]:
    """The kernels that the backward of the case's call launches (recorded, not run)."""
    with launch.recording() as records:
        run(fastbn_call, case, draw(case, DEVICE))
    return [planned.kernel for planned, _, _ in records if planned.module == "backward"]


BACKWARD = {"one_launch": ["slice_backward_kernel"],
            "two_launches": ["partial_grad_sums_kernel", "grad_input_kernel"]}
# Shapes whose channel slices fit one program, and shapes whose slices do not (NCHW: 4 x
# 4096 padded positions; channels_last: 4 channels x 4096 folded positions).
BACKWARD_PATHS = [("one_launch", KERNEL), ("one_launch", KERNEL.but(layout="channels_last")),
                  ("two_launches", KERNEL.but(shape=(3, 4, 60, 60))),
                  ("two_launches", KERNEL.but(shape=(3, 4, 30, 30), layout="channels_last"))]
BACKWARD_FLAGS = [dict(), dict(weight=False, bias=False), dict(bias=False), dict(training=False),
                  dict(activation="silu", residual=True), dict(activation="relu6"),
                  dict(activation="relu", residual=True)]  # the last: activation bits


@pytest.mark.parametrize("path,case", [
    pytest.param(path, base.but(**flags), id=f"{path}-{base.but(**flags).id}")
    for path, base in BACKWARD_PATHS for flags in BACKWARD_FLAGS
])
def test_backward_in_one_launch_and_in_two(path, case):
    """Both backward plans with every flag: one program per channel block holding its whole
    slice, or the sums then d input."""
    assert backward_kernels(case) == BACKWARD[path]
    run_side_by_side(case, DEVICE)


@cases(*(KERNEL.but(shape=(3, 6, 4, 4), dtype=dtype, layout="channels_last",
                    activation="relu", residual=True)
         for dtype in (torch.float16, torch.bfloat16, torch.float64)))
def test_one_launch_backward_in_every_dtype(case):
    assert backward_kernels(case) == BACKWARD["one_launch"]
    run_side_by_side(case, DEVICE)


def flat_normalize(case: Case) -> bool:
    """Whether normalize walks the case's x's flat range."""
    x = x_of(case)
    g = launch.geometry(x)
    return launch.plan_normalize(g, g, g if case.residual else None, x.dtype,
                                 x.dtype if case.residual else None, True, True,
                                 case.activation or "none", False).constexprs["FLAT"]


FLAT_FUSIONS = [dict(), dict(activation="silu", residual=True),
                dict(activation="relu", residual=True)]  # the last: activation bits
FLAT_SHAPES = [KERNEL.but(shape=(2, 64, 7, 7)),
               KERNEL.but(shape=(3, 13, 14, 14), dtype=torch.bfloat16),
               KERNEL.but(shape=(2, 45, 7, 7), dtype=torch.float64),
               KERNEL.but(shape=(2, 100, 3, 7), dtype=torch.float16)]


@cases(*(shape.but(training=training, **fusion) for shape in FLAT_SHAPES
         for fusion in FLAT_FUSIONS for training in (True, False)))
def test_contiguous_small_spatial_walks_the_flat_range(case):
    """NCHW with S = 49 or 196: normalize walks the flat range, every slice boundary inside
    a channel or between channels and samples (the backward holds whole slices)."""
    assert flat_normalize(case)
    assert backward_kernels(case) == BACKWARD["one_launch"]
    run_side_by_side(case, DEVICE)


@cases(*(KERNEL.but(shape=(33, 12, 14, 14), dtype=torch.bfloat16, **fusion)
         for fusion in FLAT_FUSIONS))
def test_two_launch_backward_walks_the_flat_range(case):
    """Too large a slice for one program (33 samples x 196 positions): d input walks the
    flat range; the forward writes the activation bits by tiles, the backward reads them
    flat."""
    assert flat_normalize(case)
    g = launch.geometry(x_of(case))
    plan = launch.plan_backward(g, g, None, g, None, case.dtype, True, True,
                                case.activation or "none", case.residual, True, True, True,
                                True)
    assert plan.one_launch is None and plan.grad_input.constexprs["FLAT"]
    run_side_by_side(case, DEVICE)


def test_channel_slice_with_rows_of_196_in_two_launches():
    """A slice of channels at 14x14: rows of known length (ROW) in every tile kernel,
    d input by tiles (x is not contiguous, so nothing walks the flat range)."""
    case = KERNEL.but(shape=(33, 5, 14, 14), layout="sliced_channels", grad_layout=None,
                      activation="relu")
    x = x_of(case)
    g = launch.geometry(x)
    plan = launch.plan_backward(g, g, None, launch.geometry(torch.empty_like(x)), None,
                                x.dtype, True, True, "relu", False, True, True, True, True)
    assert plan.one_launch is None
    assert plan.sums.constexprs["ROW"] == plan.grad_input.constexprs["ROW"] == 196
    assert not plan.grad_input.constexprs["FLAT"]
    run_side_by_side(case, DEVICE)


# ---------------------------------------------------------------------------------------------
# The one-launch training forward (launch.batch_norm_train_)
# ---------------------------------------------------------------------------------------------
def train_forward(case: Case, tensors: dict, save_mask: bool) -> tuple[dict, dict]:
    """launch.batch_norm_train_ on the case's tensors and fresh state: its results as
    ``cases.run`` gives them (no gradients), and the batch mean and variance, the
    activation bits and the kernels it launches (recorded on a first call, not run)."""
    def call(state):
        return launch.batch_norm_train_(
            tensors["x"], state["running_mean"], state["running_var"],
            state["num_batches_tracked"], case.momentum, tensors["weight"], tensors["bias"],
            tensors["residual"], EPS, case.activation or "none", SLOPE, save_mask)

    with launch.recording() as records:
        call(fresh_state(tensors))
    state = fresh_state(tensors)
    y, mean, var, mask = call(state)
    return ({"y": y, "grads": {}, **state},
            {"mean": mean, "var": var, "mask": mask,
             "kernels": [planned.kernel for planned, _, _ in records]})


def check_train_forward(case: Case, save_mask: bool) -> tuple[dict, dict, dict]:
    """train_forward on the case's tensors (drawn away from the kinks) against the truth
    and torch, as run_side_by_side holds fastbn.batch_norm; the batch statistics against
    x's, and the activation bits those of u recomputed from the statistics. Returns the
    tensors and train_forward's results."""
    tensors = draw_away_from_kinks(case, DEVICE, ROUNDING_MARGIN)
    forward = tensors | {"grad_out": None}
    ours, launched = train_forward(case, forward, save_mask)
    truth, _ = truth_of(case, forward)
    assert_results_match_truth("", ours, run(torch_call, case, forward), truth, {},
                               {"x": tensors["x"]})
    x = tensors["x"]
    x64 = x.double().cpu()
    dims = [0, *range(2, x.dim())]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert_close_to_truth("mean", launched["mean"], x64.mean(dims), dtype=compute)
    assert_close_to_truth("var", launched["var"], x64.var(dims, unbiased=False), dtype=compute)
    if save_mask:
        hi, _, _, scale, shift = reference.channel_constants(
            x, launched["mean"], launched["var"], tensors["weight"], tensors["bias"], EPS)
        u = reference.pre_activation(x, hi, scale, shift, tensors["residual"])
        assert launched["mask"].shape == conventions.mask_shape(x)
        assert torch.equal(launched["mask"], reference.pack_bits(
            reference.derivative_is_one(u, case.activation)))
    else:
        assert launched["mask"] is None  # (the op layer makes the empty tensor)
    return tensors, ours, launched


FORWARD = {"one_launch": ["slice_forward_kernel"],
           "two_launches": ["partial_stats_kernel", "normalize_kernel"]}
FORWARD_PATHS = [("one_launch", KERNEL.but(offset=2.0)),
                 ("one_launch", KERNEL.but(offset=2.0, layout="channels_last")),
                 ("one_launch", KERNEL.but(offset=2.0, shape=(37, 6))),
                 ("one_launch", KERNEL.but(offset=2.0, shape=(3, 5, 40),
                                           layout="sliced_channels")),
                 ("two_launches", KERNEL.but(offset=2.0, shape=(3, 4, 60, 60))),
                 ("two_launches", KERNEL.but(offset=2.0, shape=(3, 4, 30, 30),
                                             layout="channels_last"))]
# (changes to the path's case, whether the forward writes the activation bits)
FORWARD_FLAGS = [(dict(), False), (dict(weight=False, bias=False), False),
                 (dict(bias=False), False), (dict(running_stats=False), False),
                 (dict(momentum=None), False), (dict(activation="silu", residual=True), False),
                 (dict(activation="relu6"), False),
                 (dict(activation="leaky_relu", residual=True), False),
                 (dict(activation="relu", residual=True), True),
                 (dict(activation="hardswish", residual=True), False)]


@pytest.mark.parametrize("path,case,save_mask", [
    pytest.param(path, base.but(**flags), save_mask,
                 id=f"{path}-{base.but(**flags).id}" + ("-save_mask" if save_mask else ""))
    for path, base in FORWARD_PATHS for flags, save_mask in FORWARD_FLAGS
])
def test_training_forward_in_one_launch_and_in_two(path, case, save_mask):
    """Both forward plans with every flag: one program per channel block holding its whole
    slice, or the statistics then normalize."""
    _, _, launched = check_train_forward(case, save_mask)
    assert launched["kernels"] == FORWARD[path]


@cases(*(KERNEL.but(shape=(3, 6, 4, 4), dtype=dtype, layout=layout, activation="relu",
                    residual=True) for dtype in DTYPES for layout in MEMORY_FORMATS))
def test_one_launch_training_forward_in_every_dtype(case):
    _, _, launched = check_train_forward(case, save_mask=True)
    assert launched["kernels"] == FORWARD["one_launch"]


def test_one_launch_forward_statistics_survive_a_large_mean():
    """The two-pass over registers: mean 1e4, spread 1, in float32."""
    _, _, launched = check_train_forward(KERNEL.but(shape=(4, 3, 5, 5), offset=1e4), False)
    assert launched["kernels"] == FORWARD["one_launch"]


def test_one_launch_forward_is_bitwise_reproducible():
    case = KERNEL.but(shape=(5, 3, 7, 7), layout="channels_last", activation="relu",
                      residual=True)
    tensors = draw(case, DEVICE)
    (first, first_launched), (second, second_launched) = (
        train_forward(case, tensors, save_mask=True) for _ in range(2))
    assert_same_bits(first, second)
    for name in ("mean", "var", "mask"):
        assert torch.equal(first_launched[name], second_launched[name]), name


@pytest.mark.parametrize("where", NON_FINITE)
@pytest.mark.parametrize("case", [PLAIN.param(), PLAIN.but(momentum=None).param()])
def test_one_launch_forward_propagates_non_finite_values_like_torch(where, case):
    tensors = poisoned(case, where)
    ours, _ = train_forward(case, tensors, save_mask=False)
    assert_same_as_torchs_cpu_batch_norm(ours, case, tensors)


def test_one_launch_forward_then_backward_matches_the_truth():
    """The statistics the one-launch forward writes serve the one-launch backward."""
    case = KERNEL.but(activation="relu", residual=True)
    tensors, _, launched = check_train_forward(case, save_mask=True)
    grads = launch.normalize_backward(
        BackwardInputs(tensors["grad_out"], tensors["x"], launched["mean"], launched["var"],
                       tensors["weight"], tensors["bias"], None, launched["mask"], EPS,
                       case.activation, SLOPE),
        True, [True, True, True, True])
    _, grad_truth = truth_of(case, tensors)
    theirs = run(torch_call, case, tensors)
    for name, mine in zip(LEAVES, grads, strict=True):
        assert_close_to_truth(f"grad {name}", mine, grad_truth[name], theirs["grads"][name])
