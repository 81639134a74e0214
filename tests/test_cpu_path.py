"""The fast CPU implementation (fastbn.cpu) behind the "torch" backend, against the float64
truth and the explicit-formula oracle (fastbn.reference): its exactness rule on both sides,
the large-mean cases where fastbn beats torch's CPU BatchNorm, NaN/Inf propagation, the
activation mask's format, every dtype and layout on odd shapes, and no float64 tensors of
the input's size."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPES,
    LOW_PRECISION,
    activation64,
    assert_close_to_truth,
    away_from_kinks,
    batch_norm_truth,
    grads_truth,
    make_input,
    tolerance,
)
from torch.utils._python_dispatch import TorchDispatchMode

import fastbn
from fastbn import cpu, ops, reference

CPU = torch.device("cpu")
# Odd shapes: C = 1 and 3, N = 2, primes, spatial size 1, every rank.
ODD_SHAPES = [(2, 1, 7, 5), (3, 3, 1, 1), (2, 5, 3, 7), (13, 3), (2, 3, 5), (2, 3, 2, 3, 5)]


@pytest.fixture(autouse=True)
def torch_backend():
    with fastbn.use_backend("torch"):
        yield


@pytest.fixture(autouse=True, params=["small_nchw_native", "nchw_pilot"])
def nchw_statistics(request, monkeypatch):
    """Every test twice: with NATIVE_PLANES_MAX as shipped (the small float32 NCHW inputs
    here take torch's statistics kernel) and at 0 (they take the pilot sums, as larger ones
    do), so both float32 NCHW routes meet every specification in this file."""
    if request.param == "nchw_pilot":
        monkeypatch.setattr(cpu, "NATIVE_PLANES_MAX", 0)
    return request.param


def strided(x: torch.Tensor) -> torch.Tensor:
    """x's values in a non-dense layout (every other element of a wider buffer)."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    view = wide[..., ::2]
    view.copy_(x)
    return view


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "channels_last" and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    return strided(x) if name == "strided" else x


class TensorSizes(TorchDispatchMode):
    """Records the dtype and size of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((t.dtype, t.numel()))
        return out


def test_torch_backend_runs_fastbn_cpu_and_the_oracle_stays_importable():
    assert ops.implementation("torch") is cpu
    for name in ("batch_stats_", "normalize", "normalize_backward", "normalize_grad_sums",
                 "normalize_grad_input"):
        assert callable(getattr(cpu, name)) and callable(getattr(reference, name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_scalar_reads_the_value_item_reads(dtype):
    """The rule's host read (cpu.host_scalar, tolist) gives item()'s Python number, the
    sign of zero, infinities, NaN and subnormals included."""
    tiny = torch.finfo(dtype).tiny
    for value in (0.0, -0.0, 1.5, -3.25e7, tiny / 4, -tiny / 8, math.inf, -math.inf):
        t = torch.tensor(value, dtype=dtype).min()
        read = cpu.host_scalar(t)
        assert type(read) is float and read == t.item()
        assert math.copysign(1.0, read) == math.copysign(1.0, t.item())
    assert math.isnan(cpu.host_scalar(torch.tensor(math.nan, dtype=dtype).min()))


def test_exactness_rule_thresholds_follow_the_rounding_budget():
    assert cpu.FAST_RATIO[torch.float32] == 16
    assert cpu.FAST_RATIO[torch.float16] == 1024
    assert cpu.FAST_RATIO[torch.bfloat16] == 8192
    assert cpu.FAST_RATIO[torch.float64] == 4096


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cheap_side_of_the_rule_uses_torchs_kernels_and_matches_truth(monkeypatch,
                                                                      channels_last):
    """|mean| / std ~ 3: the cheap form x * scale + shift runs (no call reaches the
    oracle), within float32 tolerance of the truth."""
    x = make_input((4, 3, 6, 5), offset=3.0, channels_last=channels_last).requires_grad_(True)
    weight = torch.tensor([1.5, 0.5, -1.0], requires_grad=True)
    bias = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    truth = batch_norm_truth(x, running_mean, running_var, weight, bias, True)

    def oracle_called(*args, **kwargs):
        raise AssertionError("the cheap side must not fall back to fastbn.reference")

    for name in ("batch_mean_var", "normalize", "normalize_backward"):
        monkeypatch.setattr(reference, name, oracle_called)
    y = fastbn.batch_norm(x, running_mean, running_var, weight, bias, True)
    grad_out = make_input(x.shape, seed=5, channels_last=channels_last)
    grads = torch.autograd.grad(y, [x, weight, bias], grad_out)
    expected = grads_truth(truth, grad_out)
    assert_close_to_truth("output", y, truth["y"])
    assert_close_to_truth("running_var", running_var, truth["running_var"])
    for name, grad in zip(("x", "weight", "bias"), grads, strict=True):
        assert_close_to_truth(f"grad {name}", grad, expected[name])


class FullSizeOps(TorchDispatchMode):
    """Records the name of every op that returns a tensor of ``numel`` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel = numel
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(first, torch.Tensor) and first.numel() == self.numel:
            self.names.append(func.__name__)
        return out


@pytest.mark.parametrize("shape", [(4, 16, 32, 32), (4, 16, 31, 32), (4096, 16), (4095, 16)],
                         ids=str)
def test_channels_innermost_affine_is_addcmul_only_from_addcmul_min_elements(shape):
    """A channels-innermost float32 eval call: addcmul for at least ADDCMUL_MIN elements,
    torch's eval kernel (one op) below; the truth's output on both sides."""
    x = make_input(shape, offset=3.0, channels_last=True)
    weight, bias = torch.rand(16) + 0.5, torch.randn(16)
    running_mean, running_var = torch.full((16,), 2.5), torch.rand(16) + 0.5
    with FullSizeOps(x.numel()) as passes:
        y, _ = cpu.normalize(x, running_mean, running_var, weight, bias, None, 1e-5, "none",
                             0.0, False)
    large = x.numel() >= cpu.ADDCMUL_MIN
    assert passes.names == ["addcmul.default" if large else "native_batch_norm.default"]
    assert y.stride() == x.stride()
    truth = batch_norm_truth(x, running_mean, running_var, weight, bias, False)
    assert_close_to_truth("output", y, truth["y"])


def test_exact_side_of_the_rule_takes_the_hi_lo_path_and_matches_truth(monkeypatch):
    """|mean| / std = 1e4 > 16: the statistics and the normalization go to the oracle's
    hi/lo form, and the output keeps float32 precision."""
    x = make_input((4, 2, 5, 5), offset=1e4)
    calls = []
    original = reference.normalize
    monkeypatch.setattr(reference, "normalize",
                        lambda *args: calls.append("normalize") or original(*args))
    mean, var = cpu.batch_mean_var(x)
    assert not cpu.within_ratio(mean, var, 1e-5, cpu.FAST_RATIO[torch.float32])
    y = fastbn.batch_norm(x, None, None, None, None, True)
    assert calls == ["normalize"]
    assert_close_to_truth("output", y, batch_norm_truth(x, None, None, None, None, True)["y"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("offset", [3.0, 1e4], ids=["small_mean", "large_mean"])
def test_eager_statistics_are_float32_only_where_the_rule_allows(dtype, channels_last, offset):
    """batch_stats_as_computed_ (the eager training forward's statistics): float32 when
    |mean| / std <= STATS_RATIO, STATS_DTYPE beyond it; either way the truth's, and the
    ops' contract (batch_stats_) is STATS_DTYPE on both sides."""
    x = make_input((4, 3, 6, 5), dtype, offset=offset, channels_last=channels_last)
    mean, var = cpu.batch_stats_as_computed_(x, None, None, None, 0.1)
    expected = torch.float32 if offset < cpu.STATS_RATIO else torch.float64
    assert mean.dtype == var.dtype == expected
    assert cpu.batch_stats_(x, None, None, None, 0.1)[0].dtype == torch.float64
    truth = x.double()
    assert_close_to_truth("mean", mean, truth.mean((0, 2, 3)), dtype=torch.float32)
    assert_close_to_truth("var", var, truth.var((0, 2, 3), unbiased=False), dtype=torch.float32)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("offset", [3.0, 1e4], ids=["rule_holds", "rule_fails"])
def test_plain_training_forward_is_torchs_kernel_only_where_the_rule_holds(channels_last,
                                                                         offset):
    """bfloat16 (torch's statistics kernel): with |mean| / std <= STATS_RATIO one
    torch.native_batch_norm serves the call, differentiated by torch; beyond it nothing
    changes and the call goes on to the exact path."""
    x = make_input((4, 3, 6, 5), torch.bfloat16, offset=offset,
                   channels_last=channels_last).requires_grad_(True)
    z = make_input((4, 3, 6, 5), torch.bfloat16, seed=2, channels_last=channels_last)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    steps = torch.tensor(4)
    y = cpu.native_training_forward(x, running_mean, running_var, None, None, z, None, 1e-5,
                                    steps)
    if offset > cpu.STATS_RATIO:
        assert y is None
        assert torch.equal(running_mean, torch.zeros(3))
        assert torch.equal(running_var, torch.ones(3)) and int(steps) == 4
        return
    truth = batch_norm_truth(x, torch.zeros(3), torch.ones(3), None, None, True, None,
                             residual=z, num_batches_tracked=5)
    assert type(y.grad_fn).__name__ == "AddBackward0"  # in place on torch's own node
    assert y.stride() == torch.empty_like(x).stride() and int(steps) == 5
    assert_close_to_truth("output", y, truth["y"])
    assert_close_to_truth("running_mean", running_mean, truth["running_mean"])
    assert_close_to_truth("running_var", running_var, truth["running_var"])


def test_batch_normalize_of_other_statistics_is_not_torchs_training_kernel():
    """SyncBatchNorm hands normalize global statistics with use_batch_stats: they are not
    x's own, so the training kernel's output (which recomputes x's) is not used."""
    x = make_input((4, 3, 6, 5), torch.bfloat16, channels_last=True)
    mean, var = cpu.batch_mean_var(x)
    other_mean = mean + 0.25
    y, _ = cpu.normalize_batch(x, other_mean, var, None, None, None, 1e-5, "none", 0.0, False)
    expected, _ = cpu.normalize(x, other_mean, var, None, None, None, 1e-5, "none", 0.0, False)
    assert cpu.kernel_training_output(x, other_mean, var, None, None, 1e-5) is None
    assert torch.equal(y, expected)


@pytest.mark.parametrize("shape", [(4, 64, 16, 16), (4, 64, 16, 17), (2, 3, 5), (5, 3)],
                         ids=str)
def test_float32_nchw_takes_torchs_statistics_kernel_up_to_native_planes_max(shape):
    """A contiguous float32 x of at most NATIVE_PLANES_MAX elements is served natively (one
    torch.native_batch_norm, differentiated by torch), a larger one by the pilot sums; a 2-D
    x always natively (channels innermost); both within the truth's tolerance."""
    x = make_input(shape, offset=3.0).requires_grad_(True)
    small = x.numel() <= cpu.NATIVE_PLANES_MAX
    assert cpu.native_statistics(x) == (small or x.dim() == 2)
    running_mean, running_var = torch.zeros(shape[1]), torch.ones(shape[1])
    truth = batch_norm_truth(x, running_mean, running_var, None, None, True)
    y = fastbn.batch_norm(x, running_mean, running_var, None, None, True)
    node = type(y.grad_fn).__name__
    assert (node == "NativeBatchNormBackward0") == (small or x.dim() == 2), node
    grad_out = make_input(shape, seed=4)
    (grad,) = torch.autograd.grad(y, [x], grad_out)
    assert_close_to_truth("output", y, truth["y"])
    assert_close_to_truth("running_var", running_var, truth["running_var"])
    assert_close_to_truth("grad x", grad, grads_truth(truth, grad_out)["x"])


@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_backward_takes_torchs_invstd_bits_only_where_the_native_route_serves(
    monkeypatch, nchw_statistics, activation
):
    """The backward's 1 / sqrt(var + eps) is kernel_invstd (torch's float64-rounded bits)
    only for a call the native route serves (its traced route must give the eager route's
    bits); elsewhere rsqrt in float32. Both within the truth's tolerance."""
    calls = []
    kernel_invstd = cpu.kernel_invstd
    monkeypatch.setattr(cpu, "kernel_invstd", lambda *a: calls.append(a) or kernel_invstd(*a))
    x = make_input((4, 6, 5, 7), offset=3.0).requires_grad_(True)
    weight = torch.linspace(0.5, 2.0, 6, requires_grad=True)
    bias = torch.linspace(-1.0, 1.0, 6, requires_grad=True)
    served = cpu.serves_natively(x, None, None, weight, bias, activation or "none")
    assert served == (nchw_statistics == "small_nchw_native" and activation != "silu")
    truth = batch_norm_truth(x, None, None, weight, bias, True, activation=activation)
    y, _ = ops.call_normalize(x, *cpu.batch_mean_var(x.detach()), weight, bias, None, 1e-5,
                              True, activation or "none", 0.01, False, "torch", False)
    grad_out = make_input(x.shape, seed=4)
    calls.clear()  # (the forward's batch_output compares its bits with kernel_invstd's)
    grads = torch.autograd.grad(y, [x, weight, bias], grad_out)
    assert bool(calls) == served
    expected = grads_truth(truth, grad_out)
    for name, grad in zip(("x", "weight", "bias"), grads, strict=True):
        assert_close_to_truth(f"grad {name}", grad, expected[name])


def test_pilot_far_from_the_mean_falls_back_to_two_passes():
    """The channel's first element 1e3 standard deviations out: one-pass sums would cancel;
    the variance still matches the truth."""
    x = make_input((8, 2, 4, 4))
    x[0, :, 0, 0] = 1e3
    assert cpu.pilot_sums(x) is None
    _, var = cpu.batch_mean_var(x)
    assert_close_to_truth("var", var.float(), x.double().var((0, 2, 3), unbiased=False))


def errors_against_truth(x, running_mean, running_var, training, dtype=None):
    """Max |output - truth| for fastbn and for torch's CPU BatchNorm."""
    truth = batch_norm_truth(x, running_mean, running_var, None, None, training)["y"]
    errors = []
    for function in (fastbn.batch_norm, F.batch_norm):
        rm = None if running_mean is None else running_mean.clone()
        rv = None if running_var is None else running_var.clone()
        y = function(x, rm, rv, None, None, training)
        errors.append((y.double() - truth).abs().max().item())
    return errors


def test_fp32_mean_1e6_std_1_stays_at_fp32_precision():
    x = make_input((16, 3, 8, 8), offset=1e6)
    ours, theirs = errors_against_truth(x, None, None, True)
    assert ours <= tolerance(torch.float32)[0]
    assert ours < theirs  # torch's CPU kernel rounds the mean to float32: ~2e-2 here


def test_constant_channel_at_1e6_normalizes_to_exactly_zero():
    x = make_input((8, 3, 4, 4))
    x[:, 1] = 1e6
    y = fastbn.batch_norm(x, None, None, None, None, True)
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))


def test_eval_with_running_mean_1e6_plus_0_3_stays_at_fp32_precision():
    x = make_input((8, 3, 6, 6), offset=1e6 + 0.3)
    running_mean = torch.full((3,), 1e6 + 0.3, dtype=torch.float64).float()
    ours, theirs = errors_against_truth(x, running_mean, torch.ones(3), False)
    assert ours <= tolerance(torch.float32)[0]
    assert ours < theirs


def test_fp16_input_2x1_at_mean_5_std_0_01_is_fp16_accurate():
    x = (5 + 0.01 * torch.tensor([[1.0], [-1.0]])).half()
    truth = batch_norm_truth(x, None, None, None, None, True)["y"]
    y = fastbn.batch_norm(x, None, None, None, None, True)
    assert_close_to_truth("output", y, truth)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("where", ["element", "channel"])
def test_nan_propagates_to_stats_and_outputs_as_in_torch(channels_last, where):
    x = make_input((4, 3, 5, 5), channels_last=channels_last)
    if where == "element":
        x[1, 2, 3, 4] = float("nan")
    else:
        x[:, 2] = float("nan")
    results = []
    for function in (fastbn.batch_norm, F.batch_norm):
        rm, rv = torch.zeros(3), torch.ones(3)
        y = function(x, rm, rv, None, None, True)
        results.append((y, rm, rv))
    (y, rm, rv), (y_torch, rm_torch, rv_torch) = results
    assert torch.equal(torch.isnan(y), torch.isnan(y_torch))
    assert torch.isnan(y[:, 2]).all() and not torch.isnan(y[:, :2]).any()
    assert torch.equal(torch.isnan(rm), torch.isnan(rm_torch))
    assert torch.equal(torch.isnan(rv), torch.isnan(rv_torch))
    assert torch.isnan(rv[2])


def test_inf_gives_non_finite_results_where_torch_does():
    x = make_input((4, 3, 5, 5))
    x[0, 1, 0, 1] = float("inf")
    y = fastbn.batch_norm(x, None, None, None, None, True)
    y_torch = F.batch_norm(x, None, None, None, None, True)
    assert torch.equal(torch.isfinite(y), torch.isfinite(y_torch))
    assert torch.isfinite(y[:, [0, 2]]).all()


@pytest.mark.parametrize("momentum", [None, 1.0, 0.7, 0.1], ids=str)
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (2, 3, 128, 128)], ids=["small", "pilot"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_inf_batch_statistics_reach_the_running_statistics_as_in_torch(
    shape, channels_last, momentum
):
    """A channel with an inf (mean inf, variance NaN; the rule sends the call to the exact
    path): the running statistics are torch's, inf where torch's are inf, NaN where torch's
    are NaN, for every factor, momentum=None's first 1 / 1 included (a lerp gave NaN for a
    factor >= 0.5: inf - inf), the other channels finite."""
    x = make_input(shape, channels_last=channels_last)
    x[0, 1, 0, 1] = float("inf")
    ours, torchs = (layer(3, momentum=momentum) for layer in (fastbn.BatchNorm2d,
                                                               torch.nn.BatchNorm2d))
    ours(x)
    torchs(x)
    for name in ("running_mean", "running_var"):
        mine, theirs = getattr(ours, name), getattr(torchs, name)
        assert torch.equal(mine.isnan(), theirs.isnan()), name
        assert torch.equal(mine.isinf(), theirs.isinf()), name
        assert torch.isfinite(mine[[0, 2]]).all(), name
    assert torch.isinf(ours.running_mean[1])


@pytest.mark.parametrize("momentum", [None, 1.0, 0.7, 0.1, 0.0], ids=str)
@pytest.mark.parametrize("dtype", [*LOW_PRECISION, torch.float64], ids=str)
def test_rounded_running_update_is_torchs_formula_rounded_once_from_float64(dtype, momentum):
    """float16/bfloat16 (and float64) running buffers: (1 - factor) * running + factor *
    batch, the variance unbiased (M / (M - 1)), evaluated in float64 and rounded once into
    the buffer, for each factor (momentum=None: 1 / num_batches_tracked); float32
    statistics as the training forward hands them. Float64 buffers to within a few ulps of
    that evaluation (no rounding to another dtype follows)."""
    channels, count, steps = 257, 50, torch.tensor(3)
    generator = torch.Generator().manual_seed(5)
    running_mean = (3 * torch.randn(channels, generator=generator)).to(dtype)
    running_var = (torch.rand(channels, generator=generator) + 0.1).to(dtype)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    mean = (3 * torch.randn(channels, generator=generator)).to(stats_dtype)
    var = (2 * torch.rand(channels, generator=generator)).to(stats_dtype)
    factor = 1 / 3 if momentum is None else momentum
    truth = [(1 - factor) * running_mean.double() + factor * mean.double(),
             (1 - factor) * running_var.double() + factor * var.double() * count / (count - 1)]
    cpu.update_rounded_running_stats_(running_mean, running_var, steps, mean, var,
                                      count / (count - 1), momentum)
    assert running_mean.dtype == running_var.dtype == dtype
    for name, buffer, expected in zip(("mean", "var"), (running_mean, running_var), truth,
                                      strict=True):
        if dtype == torch.float64:
            scale = expected.abs().max()
            assert (buffer - expected).abs().max() <= 8 * 2.0**-53 * scale, name
        else:
            assert torch.equal(buffer, expected.to(dtype)), name
    assert steps.item() == 3  # (the caller counts the step)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_rounded_running_update_keeps_inf_and_propagates_nan_as_torchs_formula(dtype):
    """An inf batch mean makes the running mean inf (torch's formula, not a lerp's NaN), a
    NaN one NaN, in each low-precision buffer."""
    running_mean, running_var = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    mean = torch.tensor([float("inf"), 1.0, float("nan")])
    var = torch.tensor([1.0, float("inf"), 1.0])
    cpu.update_rounded_running_stats_(running_mean, running_var, None, mean, var, 4 / 3, 0.5)
    assert running_mean[0].item() == math.inf and math.isnan(running_mean[2].item())
    assert running_var[1].item() == math.inf
    assert torch.isfinite(running_mean[1]) and torch.isfinite(running_var[[0, 2]]).all()


def test_nan_running_variance_in_eval_propagates():
    x = make_input((4, 3, 5, 5))
    y = fastbn.batch_norm(x, torch.zeros(3), torch.tensor([1.0, float("nan"), 1.0]), None,
                          None, False)
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 2, 4, 4), (13, 3), (2, 3, 9),
                                   (2, 2, 3, 3, 3)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("rows_min", [None, 0], ids=["default_size_rule", "rows_path"])
def test_packed_mask_matches_the_oracles_bit_for_bit(shape, channels_last, rows_min,
                                                     monkeypatch):
    """Both sides of ROWS_MASK_MIN: channels-innermost masks packed in their own layout
    (pack_rows, unpack_rows) or through the positions view give the oracle's bytes."""
    if rows_min is not None:
        monkeypatch.setattr(cpu, "ROWS_MASK_MIN", rows_min)
    bits = make_input(shape, seed=3, channels_last=channels_last) > 0
    assert torch.equal(cpu.pack_bits(bits.clone()), reference.pack_bits(bits))
    mask = reference.pack_bits(bits)
    x = bits.float() if not channels_last else layout(bits.float(), "channels_last")
    indicator = cpu.mask_indicator(mask, x)
    assert torch.equal(indicator > 0, bits) and indicator.stride() == x.stride()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_positive_is_u_greater_than_zero_with_nans_by_sign(dtype):
    """The mask's bits: u > 0 on every non-NaN value (-0.0, subnormals and infinities
    included), and a NaN counts as positive exactly when its sign bit is clear."""
    tiny = torch.finfo(dtype).smallest_normal / 4  # a subnormal
    values = [-float("inf"), -1.0, -tiny, -0.0, 0.0, tiny, 1.0, float("inf")]
    u = torch.tensor(values * 3, dtype=dtype)
    nans = torch.full((2,), float("nan"), dtype=dtype)
    bits = nans.view(cpu._SAME_WIDTH_INT[dtype])
    bits[1] += torch.iinfo(bits.dtype).min  # the sign bit set (negation may drop it)
    u = torch.cat([u, nans])
    expected = (u > 0) | (torch.isnan(u) & ~torch.signbit(u))
    assert torch.equal(cpu.positive(u, "relu"), expected)
    assert torch.equal(cpu.positive(u, "leaky_relu"), expected)
    assert expected[-2] and not expected[-1]


def test_large_channels_last_mask_takes_the_rows_path():
    """At ROWS_MASK_MIN elements a channels_last mask is packed in its own layout."""
    bits = make_input((2, 16, 32, 32), seed=3, channels_last=True) > 0
    assert bits.numel() >= cpu.ROWS_MASK_MIN and cpu.fast_layout(bits) == "rows"
    assert torch.equal(cpu.pack_rows(bits), reference.pack_bits(bits))
    assert torch.equal(cpu.pack_bits(bits.clone()), reference.pack_bits(bits))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("memory", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_training_step_matches_truth_on_odd_shapes(shape, memory, dtype):
    """Output, running statistics and every gradient, each dtype and layout (weight, bias,
    and for the low-precision dtypes float32 parameters)."""
    x = layout(make_input(shape, dtype, offset=0.5), memory).requires_grad_(True)
    channels = shape[1]
    params = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.linspace(0.5, 1.5, channels, dtype=params).requires_grad_(True)
    bias = torch.linspace(-0.2, 0.2, channels, dtype=params).requires_grad_(True)
    running_mean = torch.zeros(channels, dtype=params)
    running_var = torch.ones(channels, dtype=params)
    truth = batch_norm_truth(x, running_mean, running_var, weight, bias, True)
    torch_stats = running_mean.clone(), running_var.clone()
    y_torch = F.batch_norm(x, *torch_stats, weight, bias, True)
    y = fastbn.batch_norm(x, running_mean, running_var, weight, bias, True)
    assert y.dtype == dtype and y.stride() == torch.empty_like(x).stride()
    assert_close_to_truth("output", y, truth["y"], y_torch)
    assert_close_to_truth("running_mean", running_mean, truth["running_mean"], torch_stats[0])
    assert_close_to_truth("running_var", running_var, truth["running_var"], torch_stats[1])
    grad_out = layout(make_input(shape, dtype, seed=7), memory)
    grads = torch.autograd.grad(y, [x, weight, bias], grad_out)
    torch_grads = torch.autograd.grad(y_torch, [x, weight, bias], grad_out)
    expected = grads_truth(truth, grad_out)
    for name, grad, torch_grad in zip(("x", "weight", "bias"), grads, torch_grads, strict=True):
        assert_close_to_truth(f"grad {name}", grad, expected[name], torch_grad, dtype=dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_low_precision_relu_and_residual_run_in_float32_statistics(dtype, residual):
    x = make_input((4, 3, 6, 6), dtype, offset=50.0, spread=2.0)
    z = make_input((4, 3, 6, 6), dtype, seed=2) if residual else None
    weight, bias = torch.ones(3), torch.zeros(3)
    truth = batch_norm_truth(x, None, None, weight, bias, True, residual=z, activation="relu")
    y = fastbn.batch_norm(x, None, None, weight, bias, True, residual=z, activation="relu")
    y_torch = F.relu(F.batch_norm(x, None, None, weight, bias, True) + (0 if z is None else z))
    assert y.dtype == dtype
    assert_close_to_truth("output", y, truth["y"], y_torch)


def test_momentum_none_is_the_cumulative_average_on_the_fast_path():
    layer = fastbn.BatchNorm2d(3, momentum=None)
    batches = [make_input((4, 3, 5, 5), seed=seed, offset=seed) for seed in range(3)]
    for x in batches:
        layer(x)
    means = torch.stack([x.double().mean((0, 2, 3)) for x in batches]).mean(0)
    assert int(layer.num_batches_tracked) == 3
    assert_close_to_truth("running_mean", layer.running_mean, means)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_no_float64_tensor_of_the_inputs_size(channels_last):
    """Float64 appears at most in C-element statistics, never as a full-size temporary
    (the recorder does see the full-size float32 tensors)."""
    x = make_input((4, 8, 6, 6), channels_last=channels_last).requires_grad_(True)
    z = make_input((4, 8, 6, 6), seed=1, channels_last=channels_last).requires_grad_(True)
    weight = torch.ones(8, requires_grad=True)
    with TensorSizes() as recorder:
        y = fastbn.batch_norm(x, torch.zeros(8), torch.ones(8), weight, None, True,
                              residual=z, activation="relu")
        torch.autograd.grad(y, [x, weight, z], torch.ones_like(y))
    assert (torch.float32, x.numel()) in recorder.sizes
    assert max((n for dtype, n in recorder.sizes if dtype == torch.float64), default=0) <= 8


def test_results_are_bitwise_reproducible():
    x = make_input((6, 4, 7, 7), offset=2.0).requires_grad_(True)
    z = make_input((6, 4, 7, 7), seed=4).requires_grad_(True)
    runs = []
    for _ in range(2):
        rm, rv = torch.zeros(4), torch.ones(4)
        y = fastbn.batch_norm(x, rm, rv, None, None, True, residual=z, activation="relu")
        runs.append([y, rm, rv, *torch.autograd.grad(y, [x, z], torch.ones_like(y))])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


# The native route with an activation: torch.native_batch_norm, the residual and the
# activation in place, differentiated by torch's own nodes (cpu.native_training_forward).

NATIVE_NODES = {None: ("NativeBatchNormBackward0", "AddBackward0"),
                "relu": ("ReluBackward0",), "leaky_relu": ("LeakyReluBackward0",)}
"""The autograd node a natively served call's output has, per activation."""


def fused_leaves(shape, dtype, channels_last, residual, seed=0, offset=0.5,
                 params=torch.float32):
    """x, the residual (or None), weight, bias (in ``params``): leaves of a fused call."""
    x = make_input(shape, dtype, seed=seed, offset=offset,
                   channels_last=channels_last).requires_grad_(True)
    z = make_input(shape, dtype, seed=seed + 1, channels_last=channels_last
                   ).requires_grad_(True) if residual else None
    weight = torch.linspace(1.5, 3.0, shape[1], dtype=params).requires_grad_(True)
    bias = torch.linspace(-0.3, 0.4, shape[1], dtype=params).requires_grad_(True)
    return x, z, weight, bias


def fused_step(x, z, weight, bias, activation, grad_out, negative_slope=0.01):
    """Output, running statistics (in the weight's dtype), step counter and every gradient
    of one training call."""
    running_mean = torch.zeros(x.shape[1], dtype=weight.dtype)
    running_var = torch.ones(x.shape[1], dtype=weight.dtype)
    steps = torch.tensor(2)
    y = fastbn.batch_norm(x, running_mean, running_var, weight, bias, True, None, 1e-5,
                          residual=z, activation=activation, negative_slope=negative_slope,
                          num_batches_tracked=steps)
    leaves = [t for t in (x, weight, bias, z) if t is not None]
    grads = torch.autograd.grad(y, leaves, grad_out)
    return type(y.grad_fn).__name__, [y, running_mean, running_var, steps, *grads]


@pytest.mark.parametrize("dtype,params", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
], ids=["float32", "bfloat16-float32-params", "bfloat16", "float16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", [None, "relu", "relu6", "leaky_relu"])
def test_native_route_and_the_ops_route_give_the_same_bits(activation, residual,
                                                           channels_last, dtype, params,
                                                           monkeypatch):
    """The eager call (torch's nodes where it serves natively) and the ops' route (what
    torch.compile and export trace: normalize_batch, normalize_backward) agree bit for bit
    on the output, the state and every gradient, with float32 per-channel tensors and with
    per-channel tensors in a float16/bfloat16 input's dtype (the native route converts the
    weight and bias to float32 for torch's kernel, rounds the running update once); the
    native route serves exactly the calls serves_natively names (not float32 NCHW,
    leaky_relu on float16/bfloat16, relu6)."""
    shape = (3, 4, 5, 6)
    x, z, weight, bias = fused_leaves(shape, dtype, channels_last, residual, params=params)
    grad_out = make_input(shape, dtype, seed=9, channels_last=channels_last)
    native = cpu.serves_natively(x, None, None, weight, bias, activation or "none", 0.01)
    assert native == (cpu.native_statistics(x) and activation != "relu6" and (
        dtype == torch.float32 or activation != "leaky_relu"))
    node, eager = fused_step(x, z, weight, bias, activation, grad_out)
    assert (node in NATIVE_NODES.get(activation, ())) == native, node
    monkeypatch.setattr(ops, "direct_uncompiled", lambda x: False)
    ops_node, through_ops = fused_step(x, z, weight, bias, activation, grad_out)
    assert ops_node == "_TrainForwardBackward", ops_node  # (the custom ops' route ran)
    for mine, theirs in zip(eager, through_ops, strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("dtype,params", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
], ids=["float32", "bfloat16-float32-params", "bfloat16"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_routes_agree_where_only_the_unbiased_variance_passes_the_rule(activation, dtype,
                                                                       params, monkeypatch):
    """Two values per channel at |mean| / std = 20 (biased), 14.1 (unbiased): torch's
    statistics kernel is accepted on the unbiased variance (<= STATS_RATIO = 16), so the
    eager call is the native route; the ops' route (what torch.compile traces) must give its
    bits too: its output, state and every gradient, though the biased ratio is beyond 16."""
    spread = torch.tensor([[-1.0], [1.0]]) * torch.tensor([1.0, 0.5, 2.0])
    x = (20 * torch.tensor([1.0, -0.5, 2.0]) + spread).to(dtype).requires_grad_(True)
    mean, var = x.detach().float().mean(0), x.detach().float().var(0, unbiased=False)
    assert (mean.abs() / var.sqrt()).min() > cpu.STATS_RATIO
    weight = torch.linspace(1.5, 3.0, 3, dtype=params).requires_grad_(True)
    bias = torch.linspace(-0.3, 0.4, 3, dtype=params).requires_grad_(True)
    grad_out = torch.tensor([[0.3, -0.7, 1.1], [-0.2, 0.9, 0.4]]).to(dtype)
    node, eager = fused_step(x, None, weight, bias, activation, grad_out)
    assert node in NATIVE_NODES[activation], node
    monkeypatch.setattr(ops, "direct_uncompiled", lambda x: False)
    ops_node, through_ops = fused_step(x, None, weight, bias, activation, grad_out)
    assert ops_node == "_TrainForwardBackward", ops_node
    for mine, theirs in zip(eager, through_ops, strict=True):
        assert torch.equal(mine, theirs)


def same_bits_nan_aware(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit where finite, NaN at the same places."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("dtype,channels_last", [
    (torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False),
    (torch.float32, False),  # the native route, or ("nchw_pilot") the Function's
], ids=["float32-channels_last", "bfloat16-channels_last", "bfloat16-nchw", "float32-nchw"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_relu_routes_agree_on_a_channel_with_nan_statistics(residual, channels_last, dtype,
                                                            monkeypatch):
    """A NaN in one channel fails the rule (the exact path): the eager call's backward
    differentiates relu from the output it keeps, torch's convention (the gradient passes at
    a NaN), and the ops' route (what torch.compile traces, which keeps no output) must give
    the same output, state and gradients, d bias of the NaN channel included (it summed 0
    there, the reference's convention). A residual on a call the native route could not
    serve keeps relu's mask on the ops' route instead (README, limits)."""
    shape = (3, 4, 5, 6)
    x, z, weight, bias = fused_leaves(shape, dtype, channels_last, residual)
    if residual and not cpu.serves_natively(x, None, None, weight, bias, "relu", 0.0):
        pytest.skip("the ops' route keeps relu's mask here (its sign test at a NaN differs)")
    with torch.no_grad():
        x[1, 2, 3, 4] = float("nan")
    grad_out = make_input(shape, dtype, seed=9, channels_last=channels_last)
    node, eager = fused_step(x, z, weight, bias, "relu", grad_out)
    monkeypatch.setattr(ops, "direct_uncompiled", lambda x: False)
    ops_node, through_ops = fused_step(x, z, weight, bias, "relu", grad_out)
    assert ops_node == "_TrainForwardBackward", ops_node
    grad_bias = eager[6]  # (the whole NaN channel passes: d bias is the sum of grad_out)
    torch.testing.assert_close(grad_bias[2], grad_out[:, 2].float().sum(), rtol=1e-5, atol=1e-5)
    assert torch.isnan(eager[1][2]) and torch.isfinite(eager[1][[0, 1, 3]]).all()
    for mine, theirs in zip(eager, through_ops, strict=True):
        assert same_bits_nan_aware(mine, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_native_fused_training_step_matches_truth(activation, residual, dtype):
    """Output, running statistics and every gradient of a natively served fused call
    (channels_last: torch's statistics kernel for float32 too) within the dtype's tolerance
    of the float64 truth, pre-activations kept off the kinks by more than the dtype's
    rounding."""
    if dtype == torch.bfloat16 and activation == "leaky_relu":
        pytest.skip("leaky_relu does not commute with the bfloat16 rounding: the ops' route")
    shape = (2, 3, 5, 4)
    margin = 2e-2 if dtype == torch.bfloat16 else 1e-4

    def pre_activation(leaves):
        x, z, weight, bias = leaves
        return batch_norm_truth(x, None, None, weight, bias, True, residual=z)["y"]

    x, z, weight, bias = away_from_kinks(
        lambda seed: fused_leaves(shape, dtype, True, residual, seed=seed),
        pre_activation, activation, margin)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    truth = batch_norm_truth(x, running_mean, running_var, weight, bias, True, residual=z,
                             activation=activation)
    y = fastbn.batch_norm(x, running_mean, running_var, weight, bias, True, residual=z,
                          activation=activation)
    assert type(y.grad_fn).__name__ in NATIVE_NODES[activation]
    assert y.dtype == dtype and y.stride() == x.stride()
    assert_close_to_truth("output", y, truth["y"])
    assert_close_to_truth("running_mean", running_mean, truth["running_mean"])
    assert_close_to_truth("running_var", running_var, truth["running_var"])
    grad_out = make_input(shape, dtype, seed=7, channels_last=True, scaled_channels=False)
    leaves = [t for t in (x, weight, bias, z) if t is not None]
    grads = torch.autograd.grad(y, leaves, grad_out)
    expected = grads_truth(truth, grad_out)
    for name, grad in zip(("x", "weight", "bias", "residual"), grads, strict=False):
        assert_close_to_truth(f"grad {name}", grad, expected[name], dtype=dtype)


def test_native_route_leaves_out_relu6_and_negative_slopes():
    """relu6 (torch's hardtanh_backward at NaN depends on the element's position), leaky_relu
    with a negative slope (its output's sign no longer gives the derivative) or on bfloat16
    (it does not commute with the rounding), silu and hardswish take the ops' route."""
    x = make_input((3, 4, 5, 6), channels_last=True)
    assert cpu.serves_natively(x, None, None, None, None, "relu", 0.0)
    assert cpu.serves_natively(x, None, None, None, None, "leaky_relu", 0.0)
    for activation, slope in (("relu6", 0.0), ("leaky_relu", -0.5), ("silu", 0.0),
                              ("hardswish", 0.0)):
        assert not cpu.serves_natively(x, None, None, None, None, activation, slope)
    assert not cpu.serves_natively(x.bfloat16(), None, None, None, None, "leaky_relu", 0.01)
    assert cpu.serves_natively(x.bfloat16(), None, None, None, None, "relu", 0.0)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_native_fused_call_beyond_the_rule_changes_nothing_and_stays_exact(activation):
    """|mean| / std = 1e4: native_training_forward declines (None, state untouched) and the
    call takes the exact path, at float32 precision where torch's kernel is not."""
    x = make_input((4, 3, 6, 5), offset=1e4, channels_last=True)
    z = make_input((4, 3, 6, 5), seed=2, channels_last=True)
    running_mean, running_var, steps = torch.zeros(3), torch.ones(3), torch.tensor(4)
    assert cpu.native_training_forward(x, running_mean, running_var, None, None, z, 0.1, 1e-5,
                                       steps, activation, 0.01) is None
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))
    assert int(steps) == 4
    y = fastbn.batch_norm(x, running_mean, running_var, None, None, True, residual=z,
                          activation=activation, num_batches_tracked=steps)
    truth = batch_norm_truth(x, torch.zeros(3), torch.ones(3), None, None, True, residual=z,
                             activation=activation)
    assert_close_to_truth("output", y, truth["y"])
    assert_close_to_truth("running_mean", running_mean, truth["running_mean"])
    assert int(steps) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("activation,slope", [("relu", 0.0), ("leaky_relu", 0.01),
                                              ("leaky_relu", 0.0)])
def test_derivative_at_the_kinks_zeros_infinities_and_nan_is_torchs(activation, slope, dtype):
    """With weight 0 and bias 0 the pre-activation is the residual itself (u = +-0 + z):
    the residual's gradient is grad_out * act'(z), which must be the reference's derivative
    at 0, -0.0, +-inf, beside the kinks and on subnormals; at NaN relu passes the gradient
    (torch's backward: NaN <= 0 is false), leaky_relu gives the slope, as the reference.
    The forward gives act(z) as the reference does. float32 and bfloat16 channels_last: the
    native route's nodes; float64 NCHW: the Function's, relu from its kept output."""
    if dtype == torch.bfloat16 and activation == "leaky_relu":
        pytest.skip("leaky_relu does not commute with the bfloat16 rounding: the ops' route")
    if dtype == torch.float64 and activation == "leaky_relu":
        pytest.skip("the Function's route keeps leaky_relu's mask, whose NaN test differs")
    native = dtype != torch.float64
    tiny = torch.finfo(dtype).smallest_normal / 4
    specials = [0.0, -0.0, 6.0, float("inf"), -float("inf"), float("nan"), 1.0, -1.0,
                tiny, -tiny, 5.96875, 6.0625, 0.0078125, -0.0078125]
    z = torch.tensor(specials * 2, dtype=dtype).reshape(1, 4, 7, 1).expand(2, 4, 7, 1)
    z = z.contiguous(memory_format=torch.channels_last if native else torch.contiguous_format)
    z.requires_grad_(True)
    x = make_input(tuple(z.shape), dtype, channels_last=native).requires_grad_(True)
    weight = torch.zeros(4, dtype=cpu.param_dtype(x), requires_grad=True)
    bias = torch.zeros(4, dtype=cpu.param_dtype(x))
    y = fastbn.batch_norm(x, None, None, weight, bias, True, residual=z, activation=activation,
                          negative_slope=slope)
    nodes = NATIVE_NODES[activation] if native else ("_NormalizeBackward",)
    assert type(y.grad_fn).__name__ in nodes
    u = z.detach()
    expected_y = reference.activation_forward(u, activation, slope)
    assert torch.equal(y.isnan(), expected_y.isnan())
    assert torch.equal(y.nan_to_num(), expected_y.nan_to_num())
    grad_out = torch.full_like(u, 3.0)
    (grad_z,) = torch.autograd.grad(y, [z], grad_out)
    derivative = reference.activation_derivative(u, activation, slope)
    if activation == "relu":
        derivative = torch.where(u.isnan(), 1.0, derivative).to(dtype)
    assert torch.equal(grad_z, grad_out * derivative)


@pytest.mark.parametrize("dtype,channels_last", [
    (torch.float32, True), (torch.bfloat16, True),  # the native route
    (torch.float32, False), (torch.float64, False),  # the Function's ("nchw_pilot": float32)
], ids=["float32-channels_last", "bfloat16-channels_last", "float32-nchw", "float64-nchw"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", [None, "relu", "relu6", "leaky_relu"])
def test_modifying_the_output_in_place_raises_as_in_torch(activation, residual, dtype,
                                                          channels_last):
    """Changing the output in place before the backward raises autograd's version error
    exactly where it does after torch's unfused BatchNorm and activation, on every route:
    relu keeps its output for the backward (torch's nodes on the native route,
    ops.keeps_output on the Function's), leaky_relu its input on the native route, relu6
    and leaky_relu their mask or recomputed pre-activation on the Function's (torch: their
    input); never without an activation."""
    if dtype == torch.bfloat16 and activation == "leaky_relu":
        pytest.skip("leaky_relu does not commute with the bfloat16 rounding: the ops' route")

    def step(function):
        x = make_input((3, 4, 5, 6), dtype, channels_last=channels_last).requires_grad_(True)
        z = make_input((3, 4, 5, 6), dtype, seed=1, channels_last=channels_last
                       ) if residual else None
        y = function(x, z)
        y.mul_(2)
        try:
            torch.autograd.grad(y, [x], torch.ones_like(y))
        except RuntimeError as error:
            assert "modified by an inplace operation" in str(error)
            return True
        return False

    def unfused(x, z):
        y = F.batch_norm(x, None, None, None, None, True)
        y = y if z is None else y + z
        return y if activation is None else activation64(y, activation)

    raised = step(lambda x, z: fastbn.batch_norm(x, None, None, None, None, True, residual=z,
                                                 activation=activation))
    assert raised == step(unfused)
    assert raised == (activation == "relu")


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_function_route_relu_keeps_its_output_and_nothing_else_full_size(residual):
    """float64 (never the native route): the Function's node keeps x and the output (no
    activation mask, no residual), and its backward is torch's relu backward of that
    output followed by torch's BatchNorm backward: the gradients of the unfused torch
    layers, d residual included, in x's format for a gradient given in another."""
    x, z, _, _ = fused_leaves((3, 4, 5, 6), torch.float64, False, residual)
    weight = torch.linspace(1.5, 3.0, 4, dtype=torch.float64).requires_grad_(True)
    bias = torch.linspace(-0.3, 0.4, 4, dtype=torch.float64).requires_grad_(True)
    y = fastbn.batch_norm(x, None, None, weight, bias, True, residual=z, activation="relu")
    assert type(y.grad_fn).__name__ == "_NormalizeBackward"
    full = [t for t in y.grad_fn.saved_tensors if t is not None and t.numel() == x.numel()]
    assert len(full) == 2
    assert full[0] is x and torch.equal(full[1], y)
    grad_out = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
    leaves = [x, weight, bias] + ([z] if residual else [])
    ours = torch.autograd.grad(y, leaves, grad_out)
    u = F.batch_norm(x, None, None, weight, bias, True)
    theirs = torch.autograd.grad(F.relu(u if z is None else u + z), leaves, grad_out)
    for name, mine, torchs in zip(["x", "weight", "bias", "residual"][:len(ours)], ours, theirs,
                                  strict=True):
        assert_close_to_truth(name, mine, torchs)
    assert ours[0].is_contiguous() and (z is None or ours[3].is_contiguous())


def _native_kernel_grad_strides(x, y, weight, grad_out):
    """The strides of the gradient torch's BatchNorm backward node receives, and the
    gradients of x and weight."""
    node = y.grad_fn
    while type(node).__name__ != "NativeBatchNormBackward0":
        node = node.next_functions[0][0]
    seen = []
    node.register_prehook(lambda grads: seen.append(grads[0].stride()))
    grads = torch.autograd.grad(y, [x, weight], grad_out)
    return seen, grads


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
def test_native_backward_kernel_gets_a_low_precision_gradient_in_the_inputs_format(
        activation, dtype):
    """An NCHW grad_out for a float16/bfloat16 channels_last input: the pre-hook hands every
    backward node after the first, torch's BatchNorm backward kernel included, x's format
    (torch's mixed-format path would sum in the low-precision dtype)."""
    activation = None if activation == "leaky_relu" and dtype != torch.float32 else activation
    x, z, weight, bias = fused_leaves((3, 4, 5, 6), dtype, True, True)
    y = fastbn.batch_norm(x, None, None, weight, bias, True, residual=z, activation=activation)
    seen, grads = _native_kernel_grad_strides(x, y, weight, make_input(tuple(x.shape), dtype,
                                                                       seed=3))
    assert seen == [x.stride()] and grads[0].stride() == x.stride()


@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("grad_format", ["contiguous", "expanded"])
def test_native_float32_backward_takes_the_gradient_as_torchs_model_does(activation,
                                                                          grad_format):
    """A float32 channels_last call's gradient in another format (contiguous, or the
    expanded one a global average pool hands back) reaches torch's nodes as it comes, as in
    torch's own model: the same bits as torch's BatchNorm + add + activation (whose relu
    backward hands the kernel x's format in both), and without an activation d x and
    d bias within the float32 tolerance of the float64 truth (torch's mixed-format kernel
    sums in float64; x's format would give its float32 row sums, 2.7e-5 off in d bias at
    this shape)."""
    shape = (32, 16, 16, 16)
    x, z, weight, bias = fused_leaves(shape, torch.float32, True, True)
    grad_out = make_input(shape, seed=3) if grad_format == "contiguous" else (
        make_input(shape[:2] + (1, 1), seed=3).expand(shape))
    y = fastbn.batch_norm(x, None, None, weight, bias, True, residual=z, activation=activation)
    seen, grads = _native_kernel_grad_strides(x, y, weight, grad_out)
    reference_leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias, z)]
    rx, rw, rb, rz = reference_leaves
    expected = F.batch_norm(rx, None, None, rw, rb, True) + rz
    expected = {None: expected, "relu": F.relu(expected),
                "leaky_relu": F.leaky_relu(expected)}[activation]
    torch_seen, torch_grads = _native_kernel_grad_strides(rx, expected, rw, grad_out)
    assert seen == torch_seen
    assert torch.equal(y, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch_grads, strict=True))
    if activation is not None:  # (relu's backward hands torch's kernel x's format in both)
        return
    truth_leaves = [t.detach().double().requires_grad_(True) for t in (x, weight, bias, z)]
    tx, tw, tb, tz = truth_leaves
    truth = F.batch_norm(tx, None, None, tw, tb, True) + tz
    truth = {None: truth, "relu": F.relu(truth), "leaky_relu": F.leaky_relu(truth)}[activation]
    truth_grads = torch.autograd.grad(truth, [tx, tw, tb], grad_out.double())
    y_grads = torch.autograd.grad(fastbn.batch_norm(x, None, None, weight, bias, True,
                                                    residual=z, activation=activation),
                                  [x, weight, bias], grad_out)
    # (d weight, a sum of g * x_hat that cancels within each sample here, is torch's bits,
    # checked above: its float32 error relative to the small result exceeds the tolerance.)
    assert_close_to_truth("d x", y_grads[0], truth_grads[0])
    assert_close_to_truth("d bias", y_grads[2], truth_grads[2])


@pytest.mark.parametrize(("shape", "training", "activation"), [
    ((4, 16, 12, 12), False, None),       # eval: the ops' route's backward
    ((4, 16, 12, 12), False, "relu"),
    ((8, 16, 24, 24), True, None),        # float32 NCHW above 2^16: the pilot route
    ((8, 16, 24, 24), True, "relu"),      # (its relu keeps the output)
])
@pytest.mark.parametrize("channels_last", [True, False])
def test_float32_ops_route_backward_takes_the_gradient_as_torchs_layer_does(
        shape, training, activation, channels_last):
    """The ops' route's eager backward of a float32 layer (eval; an NCHW input above 2^16
    elements) hands torch's kernels the expanded gradient of a global average pool as it
    comes, as torch's BatchNorm2d (+ ReLU) does: in eval torch's bits for d x, d weight and
    d bias (converting it to x's format gave channels_last float32 row sums, d bias 4e-5
    off where torch's is 6e-8); in training (the pilot sums' statistics, not torch's bits)
    d x and d bias within the float32 tolerance of the float64 truth."""
    torch.manual_seed(0)
    x = make_input(shape, offset=0.5, channels_last=channels_last)
    if not training and not channels_last:
        x = x.contiguous()
    torch_layer = torch.nn.BatchNorm2d(shape[1])
    with torch.no_grad():
        torch_layer.weight.uniform_(0.5, 1.5)
        torch_layer.bias.uniform_(-0.5, 0.5)
        torch_layer.running_mean.uniform_(-0.2, 0.2)
        torch_layer.running_var.uniform_(0.5, 1.5)
    layer = fastbn.BatchNorm2d(shape[1], activation=activation)
    layer.load_state_dict(torch_layer.state_dict())
    layer.train(training), torch_layer.train(training)
    truth_layer = copy.deepcopy(torch_layer).double()
    grads = []
    for net, parameters, dtype in ((layer, layer, torch.float32),
                                   (torch_layer, torch_layer, torch.float32),
                                   (truth_layer, truth_layer, torch.float64)):
        leaf = x.to(dtype).clone().requires_grad_(True)
        y = net(leaf)
        y = y if net is layer or activation is None else F.relu(y)
        loss = y.mean((2, 3)).pow(2).sum()
        grads.append(torch.autograd.grad(loss, [leaf, parameters.weight, parameters.bias]))
    ours, theirs, truth = grads
    if not training:
        for name, a, b in zip(("d x", "d weight", "d bias"), ours, theirs, strict=True):
            assert torch.equal(a, b), name
        return
    assert_close_to_truth("d x", ours[0], truth[0])
    assert_close_to_truth("d bias", ours[2], truth[2])


@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
def test_native_double_backward_matches_truth(activation):
    """torch's nodes give the double backward too (NativeBatchNormBackward0's own): the
    gradient of |d x|^2 through a natively served float32 channels_last call is the float64
    truth's, pre-activations off the kinks."""
    shape = (2, 3, 5, 4)

    def pre_activation(leaves):
        x, z, weight, bias = leaves
        return batch_norm_truth(x, None, None, weight, bias, True, residual=z)["y"]

    x, z, weight, bias = away_from_kinks(
        lambda seed: fused_leaves(shape, torch.float32, True, True, seed=seed),
        pre_activation, activation, 1e-4)
    grad_out = make_input(shape, seed=7, channels_last=True, scaled_channels=False)
    y = fastbn.batch_norm(x, None, None, weight, bias, True, residual=z, activation=activation)
    assert type(y.grad_fn).__name__ in NATIVE_NODES[activation]
    (grad_x,) = torch.autograd.grad(y, [x], grad_out, create_graph=True)
    mine = torch.autograd.grad(grad_x.square().sum(), [x, weight])
    truth = batch_norm_truth(x, None, None, weight, bias, True, residual=z,
                             activation=activation)
    (grad_x64,) = torch.autograd.grad(truth["y"], [truth["x"]], grad_out.double(),
                                      create_graph=True)
    expected = torch.autograd.grad(grad_x64.square().sum(), [truth["x"], truth["weight"]])
    for name, grad, grad64 in zip(("x", "weight"), mine, expected, strict=True):
        assert_close_to_truth(f"grad grad {name}", grad, grad64)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["+nan", "-nan"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_ops_route_differentiates_a_nan_pre_activation_as_the_native_route(
    activation, sign, monkeypatch
):
    """A residual of NaNs of either sign (inf - inf gives the sign-set NaN on x86): the ops'
    route of a natively servable call keeps the residual and differentiates the activation
    by torch's kernels, as the native route's nodes do (relu passes the gradient at NaN,
    leaky_relu gives the slope), not by the mask's sign test."""

    def residual_grad():
        x = make_input((8, 4), offset=0.5).requires_grad_(True)
        residual = torch.full((8, 4), math.copysign(math.nan, sign)).requires_grad_(True)
        y = fastbn.batch_norm(x, None, None, None, None, True, residual=residual,
                              activation=activation, negative_slope=0.1)
        grad, = torch.autograd.grad(y, [residual], torch.ones_like(y))
        return type(y.grad_fn).__name__, grad

    native_node, native = residual_grad()
    monkeypatch.setattr(ops, "direct_uncompiled", lambda x: False)
    ops_node, through_ops = residual_grad()
    assert native_node in NATIVE_NODES[activation] and ops_node == "_TrainForwardBackward"
    expected = 1.0 if activation == "relu" else 0.1
    assert torch.equal(native, torch.full((8, 4), expected))
    assert torch.equal(through_ops, native)


@pytest.mark.parametrize("shape", [(524288, 2, 2), (16384, 4, 4, 4)], ids=str)
def test_large_batch_of_small_planes_keeps_float32_statistics_exact(shape):
    """A float32 NCHW input with many samples of a few positions each (a BatchNorm1d over
    short sequences, a late 4 x 4 stage at a large batch), above NATIVE_PLANES_MAX, takes
    the pilot sums: as exact as torch's kernel (whose sums are float64), where one sum over
    N and S together accumulated along N one value at a time (running_var 2.6e-5 off at
    (524288, 2, 2))."""
    x = make_input(shape, spread=3.0, offset=2.0)
    running = (torch.zeros(shape[1]), torch.ones(shape[1]))
    truth = batch_norm_truth(x, *running, None, None, True)
    results = []
    for function in (fastbn.batch_norm, F.batch_norm):
        running_mean, running_var = (t.clone() for t in running)
        y = function(x, running_mean, running_var, None, None, True)
        results.append({"y": y, "running_mean": running_mean, "running_var": running_var})
    ours, theirs = results
    for name in ("y", "running_mean", "running_var"):
        assert_close_to_truth(name, ours[name], truth[name], theirs[name])
