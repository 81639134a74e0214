"""Calls torch's BatchNorm accepts, made to fastbn: the same results, or torch's exception.

Each test makes one call to fastbn and the same call to torch (``F.batch_norm`` or torch's
module) and compares outputs, every gradient, the running statistics and
num_batches_tracked, or the exception type, with fastbn's state untouched (values and
``_version``) after a refused call. The expectations are computed from torch on the
installed version, not written down.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_truth, assert_matches, batch_norm_truth, make_input

import fastbn

C = 3


def outcome(function):
    """("ok", result) or ("error", exception type) of function()."""
    try:
        return "ok", function()
    except Exception as error:  # noqa: BLE001 (compared with torch's)
        return "error", type(error)


def assert_same(name, actual, expected):
    """Same shape, dtype and values (within the dtype's tolerance; integers exactly)."""
    assert actual.shape == expected.shape, f"{name}: {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: {actual.dtype} != {expected.dtype}"
    if actual.is_floating_point():
        assert_matches(name, actual, expected)
    else:
        assert torch.equal(actual.cpu(), expected.cpu()), f"{name}: {actual} != {expected}"


def memory_formats(t):
    """Whether t is contiguous in the standard, channels_last and channels_last_3d formats
    (what a memory format means; strides of size-1 dimensions aside)."""
    return (t.is_contiguous(),
            t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last),
            t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)


def compare_calls(fastbn_function, torch_function, tensors: dict, grad_seed: int = 9):
    """Call both on independent copies of tensors (a dict of name -> tensor or None):
    the same outcome; then the same output, gradients of every tensor that requires grad,
    and in-place state (running statistics, counter). A refused call changes nothing."""
    mine = {name: leaf(t) for name, t in tensors.items()}
    theirs = {name: leaf(t) for name, t in tensors.items()}
    versions = {name: t._version for name, t in mine.items() if t is not None}
    before = {name: t.detach().clone() for name, t in mine.items() if t is not None}
    expected = outcome(lambda: torch_function(**theirs))
    actual = outcome(lambda: fastbn_function(**mine))
    assert actual[0] == expected[0], f"fastbn {actual}, torch {expected}"
    if actual[0] == "error":
        assert actual[1] is expected[1], f"fastbn raised {actual[1]}, torch {expected[1]}"
        for name, t in mine.items():
            if t is not None:
                assert t._version == versions[name], f"{name} written by a refused call"
                assert torch.equal(t.detach(), before[name]), f"{name} changed"
        return None
    y, y_torch = actual[1], expected[1]
    assert_same("output", y, y_torch)
    assert memory_formats(y) == memory_formats(y_torch), (
        f"output strides {y.stride()}, torch's {y_torch.stride()}"
    )
    wanted = [name for name, t in theirs.items() if t is not None and t.requires_grad]
    if wanted and y_torch.requires_grad:
        grad_out = make_input(tuple(y.shape), y.dtype, seed=grad_seed, device=y.device) \
            if y.dim() >= 2 else torch.randn(y.shape, dtype=y.dtype, device=y.device)
        y.backward(grad_out)
        y_torch.backward(grad_out)
        for name in wanted:
            if theirs[name].grad is None:
                assert mine[name].grad is None or not mine[name].grad.any(), name
            else:
                assert_same(f"grad {name}", mine[name].grad, theirs[name].grad)
    for name, t in theirs.items():
        if t is not None and not t.requires_grad:
            assert_same(name, mine[name], t)
    return y


def functional_call_pair(extra=()):
    """fastbn.batch_norm and F.batch_norm as keyword functions of the same tensors."""
    def mine(input, running_mean=None, running_var=None, weight=None, bias=None, **rest):
        return fastbn.batch_norm(input, running_mean, running_var, weight, bias, **rest,
                                 **dict(extra))

    def theirs(input, running_mean=None, running_var=None, weight=None, bias=None, **rest):
        return F.batch_norm(input, running_mean, running_var, weight, bias, **rest)

    return mine, theirs


# ---------------------------------------------------------------------------------------------
# torch's own samples for nn.functional.batch_norm (OpInfo)
# ---------------------------------------------------------------------------------------------


# torch/testing/_internal/common_methods_invocations.py, sample_inputs_batch_norm (importing
# it needs expecttest, which is not a dependency): (input shape, keyword arguments).
OPINFO_CASES = (
    ((5, 5, 5), {"training": True, "momentum": 0.5, "eps": 0.6}),
    ((3, 2, 4), {"training": False, "momentum": -1.2}),
    ((3, 1), {"training": True, "momentum": 0.0}),
    ((0,), {"training": True}),
    ((0,), {"training": False}),
    ((3, 2, 3, 4), {"training": True, "momentum": -1.0, "eps": 0.5}),
    ((3, 2, 3, 4), {"training": False, "momentum": -1.0, "eps": 0.5}),
    ((2, 1), {}),
)


def opinfo_samples(dtype, device):
    """(tensors, keyword arguments) of each sample, made as the OpInfo makes them."""
    make = functools.partial(torch.testing.make_tensor, device=device, dtype=dtype)
    for shape, kwargs in OPINFO_CASES:
        channels = shape[1] if len(shape) > 1 else 0
        yield {
            "input": make(shape, requires_grad=True),
            "running_mean": make(channels, low=0), "running_var": make(channels, low=0),
            "weight": make(channels, requires_grad=True) if channels else None,
            "bias": make(channels, requires_grad=True) if channels else None,
        }, kwargs
    for training in (True, False, False):  # weight and bias given, last shape
        yield {
            "input": make((2, 1), requires_grad=True),
            "running_mean": make(1, low=0), "running_var": make(1, low=0),
            "weight": make(1, requires_grad=True), "bias": make(1, requires_grad=True),
        }, {"training": training}
    yield {"input": make((1, 2, 3), requires_grad=True)}, {"training": True}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torchs_own_batch_norm_samples_give_torchs_results(backend, device, dtype):
    """Every OpInfo sample of nn.functional.batch_norm: 0-element 1-D inputs (torch's
    empty-input shortcut), negative momentum, no weight or bias, eval and training."""
    torch.manual_seed(0)
    for index, (tensors, kwargs) in enumerate(opinfo_samples(dtype, device)):
        mine, theirs = functional_call_pair()
        try:
            compare_calls(functools.partial(mine, **kwargs), functools.partial(theirs, **kwargs),
                          tensors)
        except AssertionError as error:
            raise AssertionError(f"sample {index} {kwargs}: {error}") from error


EMPTY_CASES = {
    "1d": dict(shape=(0,), channels=0),
    "2d_float64_input_float32_parameters": dict(shape=(0, C), dtype=torch.float64,
                                                 parameter_dtype=torch.float32),
    "batch_of_none": dict(shape=(0, C, 4)),
    "no_channels": dict(shape=(2, 0, 4), channels=0),
    "wrong_sized_statistics": dict(shape=(0, C), channels=C + 2),
}


@pytest.mark.parametrize("case", list(EMPTY_CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_input_is_served_like_torchs_empty_shortcut(backend, device, case, training):
    options = EMPTY_CASES[case]
    dtype = options.get("dtype", torch.float32)
    parameter_dtype = options.get("parameter_dtype", dtype)
    channels = options.get("channels", C)
    vector = functools.partial(torch.rand, channels, dtype=parameter_dtype, device=device)
    tensors = {
        "input": torch.randn(options["shape"], dtype=dtype, device=device).requires_grad_(True),
        "running_mean": vector(), "running_var": vector() + 0.5,
        "weight": vector().requires_grad_(True) if channels else None,
        "bias": vector().requires_grad_(True) if channels else None,
    }
    mine, theirs = functional_call_pair()
    compare_calls(functools.partial(mine, training=training),
                  functools.partial(theirs, training=training), tensors)


def test_empty_batch_counts_in_num_batches_tracked_like_torchs_module(backend, device):
    mine, theirs = fastbn.BatchNorm1d(C, device=device), torch.nn.BatchNorm1d(C, device=device)
    x = torch.randn(0, C, device=device)
    assert_same("output", mine(x), theirs(x))
    for name, buffer in theirs.named_buffers():
        assert_same(name, getattr(mine, name), buffer)


@pytest.mark.parametrize("shape", [(2, C, 2, 1, 2, 3), (2, C, 1, 2, 1, 2, 2)],
                         ids=["6d", "7d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_of_rank_6_or_more_is_accepted_like_f_batch_norm(backend, device, shape,
                                                                training):
    tensors = {
        "input": make_input(shape, device=device).requires_grad_(True),
        "running_mean": torch.rand(C, device=device), "running_var": torch.rand(C, device=device)
        + 0.5,
        "weight": torch.rand(C, device=device).requires_grad_(True),
        "bias": torch.rand(C, device=device).requires_grad_(True),
    }
    mine, theirs = functional_call_pair()
    compare_calls(functools.partial(mine, training=training),
                  functools.partial(theirs, training=training), tensors)


def test_modules_keep_torchs_rank_checks_for_rank_6():
    x = torch.randn(2, C, 2, 2, 2, 2)
    for mine, theirs in ((fastbn.BatchNorm3d(C), torch.nn.BatchNorm3d(C)),):
        expected = outcome(lambda theirs=theirs: theirs(x))
        assert expected[0] == "error"
        with pytest.raises(expected[1], match="6D input"):
            mine(x)


# ---------------------------------------------------------------------------------------------
# Output memory format
# ---------------------------------------------------------------------------------------------


LAYOUTS = {
    "3d_channels_innermost": lambda d: torch.randn(4, 7, C, device=d).transpose(1, 2),
    "2d_transposed": lambda d: torch.randn(C, 5, device=d).t(),
    "4d_contiguous": lambda d: torch.randn(2, C, 4, 5, device=d),
    "4d_channels_last": lambda d: torch.randn(2, C, 4, 5, device=d).to(
        memory_format=torch.channels_last),
    "4d_channels_last_sliced": lambda d: torch.randn(2, 8, 5, C, device=d).permute(
        0, 3, 1, 2)[:, :, ::2],
    "4d_permuted_other": lambda d: torch.randn(2, 5, 4, C, device=d).permute(0, 3, 2, 1),
    "5d_channels_last_3d": lambda d: torch.randn(2, C, 2, 3, 4, device=d).to(
        memory_format=torch.channels_last_3d),
    "5d_permuted_other": lambda d: torch.randn(2, 4, 3, 2, C, device=d).permute(
        0, 4, 3, 2, 1),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_output_memory_format_follows_torchs_rule(backend, device, layout, training):
    """Strides of the output (and values and gradients) as torch gives them."""
    tensors = {"input": LAYOUTS[layout](device).requires_grad_(True),
               "running_mean": torch.zeros(C, device=device),
               "running_var": torch.ones(C, device=device)}
    mine, theirs = functional_call_pair()
    compare_calls(functools.partial(mine, training=training),
                  functools.partial(theirs, training=training), tensors)


def test_batchnorm1d_output_of_a_transposed_input_can_be_viewed_flat(backend, device):
    """The issue's example: torch's output is contiguous, so .view(4, -1) works."""
    x = torch.randn(4, 7, C, device=device).transpose(1, 2)
    expected = torch.nn.BatchNorm1d(C, device=device)(x).view(4, -1)
    assert_same("output", fastbn.BatchNorm1d(C, device=device)(x).view(4, -1), expected)


# ---------------------------------------------------------------------------------------------
# Tensors that are not plain
# ---------------------------------------------------------------------------------------------


def two_tensor_call_compares(device, training, name):
    from torch.testing._internal.two_tensor import TwoTensor

    generator = torch.Generator().manual_seed(3)
    parts = [torch.randn(C, generator=generator).to(device) for _ in range(2)]
    tensors = {"input": make_input((4, C, 2, 2), device=device),
               "running_mean": torch.zeros(C, device=device),
               "running_var": torch.ones(C, device=device),
               "weight": torch.rand(C, generator=generator).to(device) + 0.5,
               "bias": torch.zeros(C, device=device)}
    tensors[name] = TwoTensor(*parts)
    results = []
    for function in functional_call_pair():
        copies = {k: v.clone() for k, v in tensors.items()}
        results.append((function(**copies, training=training), copies))
    (y, mine), (y_torch, theirs) = results
    assert type(y) is type(y_torch)
    for part in ("a", "b"):
        assert_same(f"output.{part}", getattr(y, part), getattr(y_torch, part))
    # torch's call runs once per half, so its running statistics take the batch twice;
    # they do not depend on weight or bias, and fastbn's take it once, as a plain call does.
    plain = {k: getattr(v, "a", v).clone() for k, v in tensors.items()}
    F.batch_norm(**plain, training=training)
    for state in ("running_mean", "running_var"):
        assert_same(state, mine[state], plain[state])


@pytest.mark.parametrize("name", ["bias", "weight"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_tensor_subclass_parameter_gives_torchs_result(backend, device, training, name):
    """A TwoTensor weight or bias: the kernels never see it (the call goes through the
    custom ops, whose implementations see plain tensors); both halves as torch's."""
    two_tensor_call_compares(device, training, name)


NEGATED = ["input", "weight", "bias", "residual"]


@pytest.mark.parametrize("name", NEGATED)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_negative_bit_view_gives_torchs_result(backend, device, name, training):
    """torch._neg_view tensors hold their values negated in memory: resolved before the
    kernels (a copy), so values and gradients are torch's."""
    tensors = {"input": make_input((4, C, 2, 2), device=device),
               "running_mean": torch.zeros(C, device=device) + 0.2,
               "running_var": torch.ones(C, device=device),
               "weight": torch.rand(C, device=device) + 0.5,
               "bias": torch.rand(C, device=device),
               "residual": make_input((4, C, 2, 2), seed=4, device=device)}
    tensors[name] = torch._neg_view(tensors[name])
    for key in ("input", "weight", "bias", "residual"):
        tensors[key].requires_grad_(True)
    mine, _ = functional_call_pair()

    def theirs(input, running_mean, running_var, weight, bias, residual, training):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training) + residual

    compare_calls(functools.partial(mine, training=training),
                  functools.partial(theirs, training=training), tensors)


def test_negative_bit_running_statistics_are_updated_as_their_values(backend, device):
    """torch's CPU kernel leaves a negative-bit running_mean unchanged (it writes memory
    without the bit); fastbn updates the values the view shows, as the definition says."""
    x = make_input((4, C, 2, 2), device=device)
    running_mean = torch._neg_view(torch.full((C,), 0.25, device=device))
    running_var = torch._neg_view(torch.full((C,), -1.5, device=device))
    truth = batch_norm_truth(x, running_mean, running_var, None, None, True)
    y = fastbn.batch_norm(x, running_mean, running_var, training=True)
    assert_close_to_truth("output", y, truth["y"])
    assert_close_to_truth("running_mean", running_mean, truth["running_mean"])
    assert_close_to_truth("running_var", running_var, truth["running_var"])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_meta_tensors_go_through_the_fake_implementations(backend, training):
    """Shapes, dtypes and strides of torch's meta result, on every backend (the forced
    "triton" one included), for the function and the module."""
    def meta(*shape, **kw):
        return torch.randn(*shape, device="meta", **kw)

    x = meta(4, C, 2, 2).to(memory_format=torch.channels_last)
    args = (meta(C), meta(C), meta(C), meta(C), training)
    for name, y, y_torch in (
        ("function", fastbn.batch_norm(x, *args), F.batch_norm(x, *args)),
        ("module", fastbn.BatchNorm2d(C, device="meta").train(training)(x),
         torch.nn.BatchNorm2d(C, device="meta").train(training)(x)),
    ):
        assert y.device.type == "meta", name
        assert (y.shape, y.dtype, memory_formats(y)) == (
            y_torch.shape, y_torch.dtype, memory_formats(y_torch)), name


# ---------------------------------------------------------------------------------------------
# Running statistics that require grad
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_with_running_stats_requiring_grad_is_refused_before_any_change(
    backend, device, name, training
):
    """torch refuses (RuntimeError), after its module counted the batch; fastbn refuses
    with the same type before anything changes: values and _version of every buffer."""
    mine = fastbn.BatchNorm1d(C, device=device).train(training)
    theirs = torch.nn.BatchNorm1d(C, device=device).train(training)
    for module in (mine, theirs):
        getattr(module, name).requires_grad_(True)
    x = make_input((4, C), device=device)
    expected = outcome(lambda: theirs(x))
    assert expected[0] == "error"
    buffers = {k: (v.detach().clone(), v._version) for k, v in mine.named_buffers()}
    with pytest.raises(expected[1], match=name):
        mine(x)
    for key, (value, version) in buffers.items():
        buffer = getattr(mine, key)
        assert torch.equal(buffer.detach(), value) and buffer._version == version, key


def test_running_stats_requiring_grad_are_accepted_under_no_grad(backend, device):
    """Without grad mode torch's autograd check does not run; nor does fastbn's."""
    tensors = {"input": make_input((4, C), device=device),
               "running_mean": torch.zeros(C, device=device).requires_grad_(True),
               "running_var": torch.ones(C, device=device).requires_grad_(True)}
    mine, theirs = functional_call_pair()
    with torch.no_grad():
        y = fastbn.batch_norm(**{k: v.detach().clone().requires_grad_(True)
                                 for k, v in tensors.items() if k != "input"},
                              input=tensors["input"], training=True)
        y_torch = F.batch_norm(**{k: v.detach().clone().requires_grad_(True)
                                  for k, v in tensors.items() if k != "input"},
                               input=tensors["input"], training=True)
    assert_same("output", y, y_torch)


# ---------------------------------------------------------------------------------------------
# A NaN pre-activation through a fused hardswish
# ---------------------------------------------------------------------------------------------


def unfused_hardswish(u):
    """hardswish by its definition in torch's elementwise ops, u * relu6(u + 3) / 6; the
    vectorised CPU kernel of F.hardswish's backward agrees (NaN at NaN), its scalar tail
    does not, so the definition is the reference here."""
    return u * F.relu6(u + 3) / 6


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_hardswish_at_a_nan_pre_activation_gives_nan_gradients(backend, device,
                                                                      training):
    x = make_input((4, C, 3), device=device)
    residual = make_input((4, C, 3), seed=2, device=device)
    residual[1, 0, 1] = float("nan")
    grads = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (x, residual)]
        running = (torch.zeros(C, device=device), torch.ones(C, device=device))
        if fused:
            y = fastbn.batch_norm(leaves[0], *running, training=training, residual=leaves[1],
                                  activation="hardswish")
        else:
            y = unfused_hardswish(F.batch_norm(leaves[0], *running, training=training)
                                  + leaves[1])
        y.backward(make_input((4, C, 3), seed=3, device=device))
        grads.append([leaf.grad for leaf in leaves])
    for name, mine, theirs in zip(("x", "residual"), *grads, strict=True):
        assert torch.equal(mine.isnan(), theirs.isnan()), f"grad {name}: NaN pattern differs"
        assert torch.isnan(mine[1, 0, 1]), f"grad {name} is finite at the NaN pre-activation"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fake_tensors_go_through_the_fake_implementations(backend, device, training):
    """Under FakeTensorMode (what torch.compile and export trace with): the shape, dtype and
    memory format of the real result, which is torch's eager one (torch's own meta function
    keeps this input's strides, unlike its kernels), on every backend, without a kernel."""
    from torch._subclasses import FakeTensorMode

    def call(function):
        x = torch.randn(4, 7, C, device=device).transpose(1, 2)
        args = (torch.zeros(C, device=device), torch.ones(C, device=device),
                torch.ones(C, device=device), torch.zeros(C, device=device), training)
        return function(x, *args)

    expected = call(F.batch_norm)
    with FakeTensorMode():
        y = call(fastbn.batch_norm)
    assert (y.shape, y.dtype, memory_formats(y)) == (
        expected.shape, expected.dtype, memory_formats(expected))
