"""fastbn.BatchNorm1d/2d/3d and fastbn.BatchNorm: drop-ins for torch.nn.BatchNorm1d/2d/3d.

Each module is run side by side with torch's over several training steps and one eval
step; every output, gradient, running statistic and counter is held against the float64
truth (and against twice torch's own error) by tests/helpers.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import (
    COUNTER,
    MEMORY_FORMATS,
    Case,
    assert_results_match_truth,
    cases,
    laid_out_input,
    memory_formats,
    parameter_dtype,
)
from helpers import (
    ACTIVATIONS,
    DTYPES,
    TORCH_HAS_BIAS_KEYWORD,
    activation64,
    assert_close_to_truth,
    assert_matches,
    away_from_kinks,
    batch_norm_truth,
    grads_truth,
    make_input,
    torch_batch_norm,
)

import fastbn

TORCH_CLASS = {
    fastbn.BatchNorm1d: torch.nn.BatchNorm1d,
    fastbn.BatchNorm2d: torch.nn.BatchNorm2d,
    fastbn.BatchNorm3d: torch.nn.BatchNorm3d,
}
CLASS_FOR_RANK = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d,
                  5: fastbn.BatchNorm3d}
STEPS = 3


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Give a module non-trivial parameters, running statistics and counter (4 batches seen)."""
    generator = torch.Generator().manual_seed(seed)
    c = module.num_features

    def fill_(tensor, values):
        if tensor is not None:
            tensor.copy_(values.to(tensor.dtype))

    with torch.no_grad():
        fill_(module.weight, 1 + 0.5 * torch.randn(c, generator=generator))
        fill_(module.bias, 0.5 * torch.randn(c, generator=generator))
        fill_(module.running_mean, 0.3 * torch.randn(c, generator=generator))
        fill_(module.running_var, 0.5 + torch.rand(c, generator=generator))
        fill_(module.num_batches_tracked, torch.tensor(COUNTER))


def make_pair(
    fast_class, num_features, device, dtype=torch.float32, seed=0, fast_options=None, **options
):
    """A randomized fastbn module and torch's module of the same class in the same state.

    options go to both constructors, fast_options (activation, ...) to fastbn's only.
    """
    fast = fast_class(num_features, device=device, dtype=dtype, **options, **(fast_options or {}))
    ref = torch_batch_norm(TORCH_CLASS[fast_class], num_features, device=device, dtype=dtype,
                           **options)
    randomize_(fast, seed)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def pair_for(case: Case, device, seed=0):
    """make_pair for a case: the class of its rank, its flags as module options (a module
    without weight has no bias either), parameters in the case's parameter dtype."""
    return make_pair(
        CLASS_FOR_RANK[len(case.shape)], case.shape[1], device, parameter_dtype(case.dtype),
        seed, momentum=case.momentum, affine=case.weight, bias=case.bias or not case.weight,
        track_running_stats=case.running_stats,
    )


def forward_backward(module, x, grad_out, **kwargs):
    """Output and gradients (input, weight, bias) of one call of module on a fresh leaf x,
    with the running statistics and counter after it: ``cases.run``'s results."""
    for p in module.parameters():
        p.grad = None
    leaf = x.detach().clone().requires_grad_(True)
    y = module(leaf, **kwargs)
    y.backward(grad_out)
    grads = {"x": leaf.grad}
    for name in ("weight", "bias"):
        if getattr(module, name) is not None:
            grads[name] = getattr(module, name).grad
    state = {name: getattr(module, name)
             for name in ("running_mean", "running_var", "num_batches_tracked")}
    return {"y": y.detach(), "grads": grads, **state}


def state_before(module):
    """(running_mean, running_var, num_batches_tracked) as they are now, copied."""
    def copy(t):
        return None if t is None else t.detach().clone()

    return copy(module.running_mean), copy(module.running_var), copy(module.num_batches_tracked)


def assert_call_matches_truth(label, fast, ref, x, grad_out, training):
    """One call of fast and ref on x: fast's results are within tolerance of the truth."""
    running_mean, running_var, counter = state_before(fast)
    tracking = training and fast.track_running_stats
    counter_after = None if counter is None else int(counter) + int(tracking)
    truth = batch_norm_truth(
        x, running_mean, running_var, fast.weight, fast.bias, training, fast.momentum, fast.eps,
        num_batches_tracked=counter_after,
    )
    ours = forward_backward(fast, x, grad_out)
    theirs = forward_backward(ref, x, grad_out)
    leaves = {"x": x, "weight": fast.weight, "bias": fast.bias}
    assert_results_match_truth(
        f"{label}: ", ours, theirs, truth | {"num_batches_tracked": counter_after},
        grads_truth(truth, grad_out), {k: v for k, v in leaves.items() if v is not None},
    )


def assert_train_then_eval_matches_truth(fast, ref, case: Case, device):
    """STEPS training calls, then one eval call, each on the case's inputs and held against
    the truth."""
    def inputs(seed):
        x = laid_out_input(case.shape, case.dtype, case.layout, seed=seed, device=device)
        grad_out = laid_out_input(case.shape, case.dtype, case.grad_layout or case.layout,
                                  seed=seed + 1000, device=device)
        return x, grad_out

    fast.train()
    ref.train()
    for step in range(STEPS):
        assert_call_matches_truth(f"train step {step}", fast, ref, *inputs(step), training=True)
    fast.eval()
    ref.eval()
    assert_call_matches_truth("eval", fast, ref, *inputs(STEPS), training=False)


# ---------------------------------------------------------------------------------------------
# Parity with torch's modules against the float64 truth: STEPS training calls, then one eval
# call, of a module made for each case (its class by rank, its flags as module options)
# ---------------------------------------------------------------------------------------------


def odd_cases():
    """Shapes with a dimension of one or an odd size, each in each layout; float64 where a
    channel holds only two values."""
    for shape in [
        (2, 1),  # C = 1, N = 2
        (5, 7),
        (2, 3, 1),  # S = 1
        (5, 7, 11),
        (2, 1, 3, 3),
        (5, 7, 3, 11),
        (2, 3, 1, 1),
        (1, 3, 2, 1),  # N = 1, S = 2
        (2, 1, 1, 1, 1),
        (3, 5, 1, 3, 1),
        (2, 3, 5, 3, 7),
    ]:
        dtype = torch.float64 if shape[0] * math.prod(shape[2:]) == 2 else torch.float32
        for layout in MEMORY_FORMATS if len(shape) > 2 else ("contiguous",):
            yield Case(shape, dtype, layout)


MODULE_CASES = [
    # each dtype and memory format
    *(Case((4, 3, 5, 6), dtype, layout) for dtype in DTYPES for layout in MEMORY_FORMATS),
    # BatchNorm1d and 3d in each layout
    *(Case(shape, dtype, layout) for dtype in (torch.float32, torch.float16)
      for shape, layout in [((6, 3), "contiguous"), ((4, 3, 7), "contiguous"),
                            ((4, 3, 7), "channels_last"), ((2, 3, 3, 4, 5), "contiguous"),
                            ((2, 3, 3, 4, 5), "channels_last")]),
    # each option: momentum, affine (with and without bias), tracking
    *(Case((3, 3, 4, 5), momentum=momentum, weight=weight, bias=bias, running_stats=tracked)
      for momentum in (0.1, None) for weight, bias in ((True, True), (True, False), (False, False))
      for tracked in (True, False)),
    # odd shapes: two values per channel in float64 (two values normalize to +-1 whatever they
    # are, so the input gradient is pure cancellation of size eps / var, below what float32
    # resolves; torch's own float32 error exceeds the table there too)
    *odd_cases(),
]


@cases(*MODULE_CASES)
def test_module_matches_truth_over_training_steps_and_eval(backend, device, case):
    fast, ref = pair_for(case, device)
    assert_train_then_eval_matches_truth(fast, ref, case, device)


# ---------------------------------------------------------------------------------------------
# Semantics, one at a time
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(2, 3, 4), (2, 3, 4, 5), (2, 3, 2, 3, 4)], ids=["3d", "4d", "5d"]
)
def test_output_and_input_grad_take_torchs_memory_formats_for_channels_last_input(
    backend, device, shape
):
    """Channels innermost: the output in torch's format (channels_last / channels_last_3d
    for 4-D / 5-D, contiguous for 3-D, as torch's), the input gradient in the input's."""
    module = {3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d, 5: fastbn.BatchNorm3d}[len(shape)]
    reference_module = getattr(torch.nn, module.__name__)
    results = []
    for cls in (module, reference_module):
        x = make_input(shape, channels_last=True, device=device).requires_grad_(True)
        y = cls(shape[1], device=device)(x)
        y.backward(torch.ones_like(y))
        results.append((y, x.grad, x))
    (y, grad, x), (y_torch, grad_torch, _) = results
    assert memory_formats(y) == memory_formats(y_torch)
    assert memory_formats(grad) == memory_formats(grad_torch) == memory_formats(x)
    if len(shape) == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)
    if len(shape) == 5:
        assert y.is_contiguous(memory_format=torch.channels_last_3d)


def test_attributes_changed_between_calls_take_effect_on_the_next_call(backend, device):
    """momentum, eps, training and the backend are read on every call (nothing per module is
    cached): each change between calls shows in the next call's results, against the truth."""
    fast, ref = make_pair(fastbn.BatchNorm2d, 3, device)
    changes = [
        ("first", lambda m: None),
        ("momentum 0.5", lambda m: setattr(m, "momentum", 0.5)),
        ("eps 0.1", lambda m: setattr(m, "eps", 0.1)),
        ("eval", lambda m: m.eval()),
        ("momentum None", lambda m: (m.train(), setattr(m, "momentum", None))),
        ("eval, eps 1e-3", lambda m: (m.eval(), setattr(m, "eps", 1e-3))),
        ("train", lambda m: m.train()),
    ]
    other = "torch" if backend == "triton" or fastbn.backend.triton_problem() else "triton"
    for step, (label, change) in enumerate(changes):
        change(fast)
        change(ref)
        x = make_input((4, 3, 3, 3), seed=step, spread=1 + step, device=device)
        grad_out = make_input((4, 3, 3, 3), seed=100 + step, device=device)
        with fastbn.use_backend(other if step % 2 else backend):  # the backend changes too
            assert_call_matches_truth(label, fast, ref, x, grad_out, training=fast.training)


def test_momentum_none_is_cumulative_average(backend, device):
    module = fastbn.BatchNorm2d(3, momentum=None, device=device)
    batches = [make_input((4, 3, 3, 3), seed=s, spread=1 + s, device=device) for s in range(3)]
    for x in batches:
        module(x)
    stacked = torch.stack([x.double().cpu() for x in batches])
    expected_mean = stacked.mean(dim=(0, 1, 3, 4))
    expected_var = torch.stack([x.var(dim=(0, 2, 3)) for x in stacked]).mean(0)
    assert int(module.num_batches_tracked) == 3
    assert_close_to_truth("running_mean", module.running_mean, expected_mean)
    assert_close_to_truth("running_var", module.running_var, expected_var)


def test_running_var_takes_unbiased_batch_variance(backend, device):
    module = fastbn.BatchNorm2d(3, momentum=1.0, device=device)
    x = make_input((2, 3, 2, 2), spread=2.0, device=device)
    module(x)
    assert_close_to_truth("running_var", module.running_var, x.double().cpu().var(dim=(0, 2, 3)))


def test_eval_leaves_running_stats_and_counter_unchanged(backend, device):
    module, _ = make_pair(fastbn.BatchNorm2d, 3, device)
    before = state_before(module)
    module.eval()
    module(make_input((4, 3, 2, 2), device=device))
    names = ("running_mean", "running_var", "num_batches_tracked")
    for name, old in zip(names, before, strict=True):
        assert torch.equal(getattr(module, name), old), f"{name} changed in eval"


def test_untracked_module_normalizes_with_batch_statistics_in_eval(backend, device):
    module = fastbn.BatchNorm2d(3, track_running_stats=False, device=device).eval()
    x = make_input((4, 3, 2, 2), spread=3.0, offset=5.0, device=device)
    truth = batch_norm_truth(x, None, None, module.weight, module.bias, training=True)
    assert module.running_mean is None and module.num_batches_tracked is None
    assert_close_to_truth("output", module(x), truth["y"])


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentum_none"])
@pytest.mark.parametrize(
    "fast_class, shape, channels_last",
    [
        (fastbn.BatchNorm1d, (0, 3), False),
        (fastbn.BatchNorm2d, (0, 3, 4, 4), False),
        (fastbn.BatchNorm2d, (0, 3, 4, 4), True),
    ],
    ids=["1d", "2d", "2d-channels_last"],
)
def test_zero_size_batch_behaves_like_torch(
    backend, device, fast_class, shape, channels_last, momentum
):
    """N = 0: empty output, running stats unchanged, counter incremented, zero param grads."""
    fast, ref = make_pair(fast_class, shape[1], device, momentum=momentum)
    before = state_before(fast)
    x = make_input(shape, channels_last=channels_last, device=device)
    grad_out = torch.empty_like(x)
    ours, theirs = forward_backward(fast, x, grad_out), forward_backward(ref, x, grad_out)
    y, grads, grads_ref = ours["y"], ours["grads"], theirs["grads"]
    assert y.shape == x.shape and y.stride() == torch.empty_like(x).stride()
    assert torch.equal(fast.running_mean, before[0]) and torch.equal(fast.running_var, before[1])
    assert int(fast.num_batches_tracked) == int(before[2]) + 1 == int(ref.num_batches_tracked)
    for name in ("weight", "bias"):
        assert torch.equal(grads[name], torch.zeros_like(grads[name]))
        assert torch.equal(grads[name], grads_ref[name])
    assert grads["x"].shape == x.shape


def test_zero_size_batch_in_eval_gives_empty_output(backend, device):
    module = fastbn.BatchNorm2d(3, device=device).eval()
    x = make_input((0, 3, 2, 2), device=device)
    assert module(x).shape == (0, 3, 2, 2)


@pytest.mark.parametrize("shape", [(0, 3, 5), (0, 3, 4, 4)], ids=["1d", "2d"])
def test_zero_size_batch_with_residual_and_relu_packs_an_empty_mask(backend, device, shape):
    module = fastbn.BatchNorm(3, len(shape), device=device, activation="relu")
    x = make_input(shape, device=device).requires_grad_(True)
    z = make_input(shape, device=device).requires_grad_(True)
    y = module(x, z)
    grads = torch.autograd.grad(y, [x, z, module.weight], torch.empty_like(y))
    assert y.shape == grads[0].shape == grads[1].shape == shape
    assert torch.equal(grads[2], torch.zeros(3, device=device))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_residual_and_activation_match_truth(backend, device, activation, mode):
    """m(x, residual=z) = activation(BN(x) + z); pre-activations kept 1e-3 away from kinks."""
    shape = (4, 3, 3, 5)
    training = mode == "train"

    def draw(seed):
        fast, ref = make_pair(
            fastbn.BatchNorm2d, 3, device, seed=seed,
            fast_options={"activation": activation, "negative_slope": 0.2},
        )
        x = make_input(shape, seed=seed, spread=2.0, device=device)
        return seed, fast, ref, x, make_input(shape, seed=seed + 500, device=device)

    def pre_activation(drawn):
        _, fast, _, x, residual = drawn
        return batch_norm_truth(x, fast.running_mean, fast.running_var, fast.weight, fast.bias,
                                training, residual=residual)["y"]

    seed, fast, ref, x, residual = away_from_kinks(draw, pre_activation, activation)
    fast.train(training)
    ref.train(training)
    grad_out = make_input(shape, seed=seed + 1000, device=device)
    truth = batch_norm_truth(
        x, fast.running_mean, fast.running_var, fast.weight, fast.bias, training,
        residual=residual, activation=activation, negative_slope=0.2,
        num_batches_tracked=int(fast.num_batches_tracked) + int(training),
    )
    leaves = {
        "x": x.clone().requires_grad_(True), "residual": residual.clone().requires_grad_(True)
    }
    y = fast(leaves["x"], residual=leaves["residual"])
    y.backward(grad_out)
    x_ref = x.clone().requires_grad_(True)
    z_ref = residual.clone().requires_grad_(True)
    y_ref = activation64(ref(x_ref) + z_ref, activation, 0.2)
    y_ref.backward(grad_out)
    assert_close_to_truth("output", y, truth["y"], y_ref)
    expected = grads_truth(truth, grad_out)
    actual = {**{k: v.grad for k, v in leaves.items()}, "weight": fast.weight.grad,
              "bias": fast.bias.grad}
    torch_grads = {"x": x_ref.grad, "residual": z_ref.grad, "weight": ref.weight.grad,
                   "bias": ref.bias.grad}
    for name, grad_truth in expected.items():
        assert_close_to_truth(f"grad {name}", actual[name], grad_truth, torch_grads[name])
    assert_close_to_truth("running_mean", fast.running_mean, truth["running_mean"])


@pytest.mark.parametrize(
    "convert, dtype",
    [
        (lambda m: m.to(torch.float64), torch.float64),
        (lambda m: m.double(), torch.float64),
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    ],
    ids=["to_float64", "double", "to_bfloat16"],
)
def test_dtype_conversion_converts_state_and_module_still_matches_truth(
    backend, device, convert, dtype
):
    fast, ref = make_pair(fastbn.BatchNorm2d, 3, device)
    convert(fast)
    convert(ref)
    for name, tensor in fast.state_dict().items():
        expected = torch.long if name == "num_batches_tracked" else dtype
        assert tensor.dtype == expected, f"{name} is {tensor.dtype}"
    assert_train_then_eval_matches_truth(fast, ref, Case((3, 3, 4, 5), dtype), device)


# ---------------------------------------------------------------------------------------------
# Failed module calls change nothing either (torch's module counts the batch before checking)
# ---------------------------------------------------------------------------------------------


def trained_module(device, module_class=fastbn.BatchNorm2d, num_features=3):
    module = module_class(num_features, device=device)
    module(make_input((4, num_features, 2, 2), device=device))
    return module


def module_state(module):
    return {name: tensor.clone() for name, tensor in module.named_buffers()}


def assert_state_unchanged(module, before):
    for name, tensor in module.named_buffers():
        assert torch.equal(tensor, before[name]), f"{name} changed by a failed call"


def torch_module_error(module_class, num_features, x, **kwargs):
    try:
        module_class(num_features, device=x.device)(x, **kwargs)
    except Exception as error:
        return type(error)
    raise AssertionError("torch's module accepts the call")


def assert_refused_like_torch_without_counting(device, num_features, shape, match):
    """A trained BatchNorm2d(num_features) refuses an input of shape with torch's exception
    type (and a message matching match), its buffers unchanged."""
    module = trained_module(device, num_features=num_features)
    before = module_state(module)
    x = make_input(shape, device=device)
    expected = torch_module_error(torch.nn.BatchNorm2d, num_features, x)
    with pytest.raises(expected, match=match):
        module(x)
    assert_state_unchanged(module, before)


@pytest.mark.parametrize("shape", [(4, 3, 2), (4, 3, 2, 2, 2)], ids=["3d", "5d"])
def test_module_rejects_wrong_rank_like_torch_without_counting_the_batch(backend, device, shape):
    assert_refused_like_torch_without_counting(device, 3, shape, "expected 4D input")


def test_module_rejects_wrong_channel_count_like_torch_without_counting_the_batch(
    backend, device
):
    assert_refused_like_torch_without_counting(device, 4, (4, 3, 2, 2), "3 elements")


def test_module_rejects_one_value_per_channel_without_counting_the_batch(backend, device):
    assert_refused_like_torch_without_counting(device, 3, (1, 3, 1, 1),
                                               "more than 1 value per channel")


def test_generic_module_rejects_wrong_rank_without_counting_the_batch(backend, device):
    module = fastbn.BatchNorm(3, 4, device=device)
    module(make_input((4, 3, 2, 2), device=device))
    before = module_state(module)
    with pytest.raises(ValueError, match="expected 4D input"):
        module(make_input((4, 3, 2), device=device))
    assert_state_unchanged(module, before)


def test_module_rejects_wrong_residual_shape_without_counting_the_batch(backend, device):
    module = trained_module(device)
    before = module_state(module)
    with pytest.raises(RuntimeError, match="residual"):
        module(
            make_input((4, 3, 2, 2), device=device),
            residual=make_input((4, 3, 2, 3), device=device),
        )
    assert_state_unchanged(module, before)


@pytest.mark.parametrize("number", [1.5, 2, True], ids=["float", "int", "bool"])
def test_module_adds_a_number_residual_as_torchs_plus_does(backend, device, number):
    """bn(x, residual=1.5) is relu(bn(x) + 1.5), as torch's layers plus its + compute."""
    module = fastbn.BatchNorm2d(3, activation="relu", device=device)
    plain = torch.nn.BatchNorm2d(3, device=device)
    x = make_input((4, 3, 2, 2), device=device)
    assert_matches("output", module(x, residual=number), torch.relu(plain(x) + number))
    assert_matches("running_var", module.running_var, plain.running_var)


@pytest.mark.parametrize("residual, message", [
    ("1.5", "residual must be a Tensor or a number, got str"),
    (1j, "complex residual makes the sum complex, and relu takes real tensors"),
], ids=["str", "complex"])
def test_module_rejects_a_residual_it_cannot_add_without_counting_the_batch(
        backend, device, residual, message):
    module = trained_module(device)
    module.activation = "relu"
    before = module_state(module)
    with pytest.raises(TypeError, match=message):
        module(make_input((4, 3, 2, 2), device=device), residual=residual)
    assert_state_unchanged(module, before)


@pytest.mark.parametrize("slope", ["0.1", None, 0.1j], ids=["str", "None", "complex"])
def test_a_negative_slope_that_is_no_real_number_is_refused_at_construction(slope):
    """A TypeError naming it when the layer is built (torch's nn.LeakyReLU would refuse it
    at its first forward, in F.leaky_relu), not a comparison error at the first call."""
    with pytest.raises(TypeError, match="BatchNorm2d: negative_slope must be a number"):
        fastbn.BatchNorm2d(3, activation="leaky_relu", negative_slope=slope)


def test_a_negative_slope_set_to_a_string_later_raises_before_counting_the_batch(
        backend, device):
    module = trained_module(device)
    module.activation, module.negative_slope = "leaky_relu", "0.1"
    before = module_state(module)
    with pytest.raises(TypeError, match="negative_slope must be a float, got str"):
        module(make_input((4, 3, 2, 2), device=device))
    assert_state_unchanged(module, before)


# ---------------------------------------------------------------------------------------------
# The nn.Module contract: class, state_dict, resets, repr, hooks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast_class", list(TORCH_CLASS), ids=lambda c: c.__name__)
def test_module_is_an_instance_of_torchs_class(fast_class):
    assert isinstance(fast_class(3), TORCH_CLASS[fast_class])


@pytest.mark.parametrize(
    "options",
    [{}, {"bias": False}, {"affine": False}, {"track_running_stats": False}],
    ids=["default", "bias_false", "not_affine", "untracked"],
)
def test_state_dict_has_torchs_keys(options):
    fast = fastbn.BatchNorm2d(3, **options)
    ref = torch_batch_norm(torch.nn.BatchNorm2d, 3, **options)
    assert list(fast.state_dict()) == list(ref.state_dict())


def trained_pair(device):
    """A fastbn module trained two steps, and a torch module with fresh default state."""
    fast = fastbn.BatchNorm2d(3, device=device)
    randomize_(fast, seed=1)
    for seed in range(2):
        fast(make_input((2, 3, 2, 2), seed=seed, device=device))
    return fast, torch.nn.BatchNorm2d(3, device=device)


def test_fastbn_state_dict_loads_strictly_into_torch_module(backend, device):
    fast, ref = trained_pair(device)
    ref.load_state_dict(fast.state_dict(), strict=True)
    for name, tensor in fast.state_dict().items():
        assert torch.equal(ref.state_dict()[name], tensor), f"{name} not preserved"


def test_torch_state_dict_loads_strictly_into_fastbn_module(backend, device):
    trained, _ = trained_pair(device)
    ref = torch.nn.BatchNorm2d(3, device=device)
    ref.load_state_dict(trained.state_dict())
    fast = fastbn.BatchNorm2d(3, device=device)
    fast.load_state_dict(ref.state_dict(), strict=True)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(fast.state_dict()[name], tensor), f"{name} not preserved"


def test_reset_running_stats_restores_initial_statistics_only(backend, device):
    fast, _ = trained_pair(device)
    weight = fast.weight.detach().clone()
    fast.reset_running_stats()
    assert torch.equal(fast.running_mean, torch.zeros(3, device=device))
    assert torch.equal(fast.running_var, torch.ones(3, device=device))
    assert int(fast.num_batches_tracked) == 0
    assert torch.equal(fast.weight, weight)


def test_reset_parameters_restores_initial_parameters_and_statistics(backend, device):
    fast, fresh = trained_pair(device)
    fast.reset_parameters()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(fast.state_dict()[name], tensor), f"{name} not reset"


@pytest.mark.parametrize(
    "options",
    [{}, {"momentum": None, "eps": 1e-3}, {"affine": False, "track_running_stats": False},
     {"bias": False}],
    ids=["default", "momentum_none", "plain", "bias_false"],
)
def test_repr_without_activation_equals_torchs(options):
    if "bias" in options and not TORCH_HAS_BIAS_KEYWORD:
        pytest.skip("this torch's BatchNorm has no bias= keyword (torch >= 2.12 has)")
    assert repr(fastbn.BatchNorm2d(4, **options)) == repr(torch.nn.BatchNorm2d(4, **options))


def test_repr_says_when_an_affine_layer_has_no_bias():
    text = repr(fastbn.BatchNorm2d(4, bias=False))
    assert "affine=True" in text and text.count("bias=False") == 1


def test_repr_shows_activation():
    assert "activation=silu" in repr(fastbn.BatchNorm2d(4, activation="silu"))


def test_repr_shows_negative_slope_of_leaky_relu():
    text = repr(fastbn.BatchNorm1d(4, activation="leaky_relu", negative_slope=0.2))
    assert "activation=leaky_relu" in text and "negative_slope=0.2" in text


def test_unknown_activation_is_rejected_at_construction():
    with pytest.raises(ValueError, match="activation"):
        fastbn.BatchNorm2d(3, activation="gelu")


@pytest.mark.parametrize("num_dims", [2, 3, 4, 5])
def test_generic_batchnorm_matches_truth_on_its_rank(backend, device, num_dims):
    module = fastbn.BatchNorm(3, num_dims, device=device)
    x = make_input((2, 3, 2, 3, 2)[:num_dims], device=device)
    truth = batch_norm_truth(x, module.running_mean, module.running_var, module.weight,
                             module.bias, training=True)
    assert_close_to_truth("output", module(x), truth["y"])


@pytest.mark.parametrize("rank_offset", [-1, 1], ids=["rank_below", "rank_above"])
@pytest.mark.parametrize("num_dims", [2, 3, 4, 5])
def test_generic_batchnorm_rejects_other_ranks(backend, device, num_dims, rank_offset):
    module = fastbn.BatchNorm(3, num_dims, device=device)
    x = torch.randn((2, 3, 2, 2, 2, 2)[: num_dims + rank_offset], device=device)
    with pytest.raises(ValueError, match=f"expected {num_dims}D input"):
        module(x)


@pytest.mark.parametrize("num_dims", [0, 1, 6, 2.0, "4"], ids=repr)
def test_generic_batchnorm_rejects_num_dims_outside_2_to_5(num_dims):
    with pytest.raises(ValueError, match="num_dims"):
        fastbn.BatchNorm(3, num_dims)


@pytest.mark.parametrize("module_class", [fastbn.BatchNorm, fastbn.BatchNorm1d,
                                          fastbn.BatchNorm2d, fastbn.BatchNorm3d,
                                          fastbn.SyncBatchNorm])
def test_skip_init_builds_every_layer_uninitialised(module_class):
    """torch.nn.utils.skip_init (it needs a ``device`` argument in the signature) builds each
    layer with the arguments torch's layers take, the generic one with its num_dims."""
    args = (3, 4) if module_class is fastbn.BatchNorm else (3,)
    layer = torch.nn.utils.skip_init(module_class, *args, momentum=0.3, activation="relu")
    assert type(layer) is module_class
    assert (layer.momentum, layer.activation, layer.weight.shape) == (0.3, "relu", (3,))


def hook_events(module_class, device, register):
    """The hook calls one forward and backward of module_class(3) records (via register)."""
    module = module_class(3, device=device)
    events = []
    register(module, events)
    x = make_input((2, 3, 2, 2), device=device).requires_grad_(True)
    module(x).sum().backward()
    return events


def describe(value):
    """Hook arguments as comparable data: tensors by shape and dtype."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(describe(v) for v in value)
    return value


HOOKS = {
    "forward_pre": lambda m, log: m.register_forward_pre_hook(
        lambda mod, args: log.append(("pre", type(mod).__name__, describe(args)))
    ),
    "forward": lambda m, log: m.register_forward_hook(
        lambda mod, args, out: log.append(("forward", describe(args), describe(out)))
    ),
    "full_backward": lambda m, log: m.register_full_backward_hook(
        lambda mod, grad_in, grad_out: log.append(
            ("backward", describe(grad_in), describe(grad_out))
        )
    ),
}


@pytest.mark.parametrize("hook", list(HOOKS))
def test_hook_fires_as_for_torchs_module(backend, device, hook):
    fast_events = hook_events(fastbn.BatchNorm2d, device, HOOKS[hook])
    torch_events = hook_events(torch.nn.BatchNorm2d, device, HOOKS[hook])
    assert len(fast_events) == 1
    assert fast_events == torch_events


def test_forward_pre_hook_can_replace_the_input(backend, device):
    module = fastbn.BatchNorm2d(3, device=device)
    module.register_forward_pre_hook(lambda mod, args: (args[0] * 2 + 1,))
    x = make_input((2, 3, 2, 2), device=device)
    truth = batch_norm_truth(x * 2 + 1, None, None, module.weight, module.bias, training=True)
    assert_close_to_truth("output", module(x), truth["y"])


def test_full_backward_hook_sees_the_input_gradient(backend, device):
    module = fastbn.BatchNorm2d(3, device=device)
    seen = []
    module.register_full_backward_hook(lambda mod, grad_in, grad_out: seen.append(grad_in[0]))
    x = make_input((2, 3, 2, 2), device=device).requires_grad_(True)
    module(x).pow(2).sum().backward()
    assert len(seen) == 1 and torch.equal(seen[0], x.grad)


def test_momentum_none_without_a_step_counter_keeps_running_stats_like_torch(device):
    fast, ref = make_pair(fastbn.BatchNorm2d, 3, device, momentum=None)
    fast.num_batches_tracked = None
    ref.num_batches_tracked = None
    x = make_input((4, 3, 5, 5), device=device)
    assert_matches("output", fast(x), ref(x))
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name


class _Doubled(torch.nn.Module):
    def forward(self, w):
        return w * 2


@pytest.mark.parametrize("name", ["weight", "bias", "running_var"])
def test_parametrized_tensor_is_used_like_torchs_forward_uses_it(backend, device, name):
    # torch.nn.utils.parametrize moves the tensor out of _parameters/_buffers into a property.
    module = fastbn.BatchNorm2d(3, device=device).eval()
    torch.nn.utils.parametrize.register_parametrization(module, name, _Doubled())
    x = make_input((4, 3, 3, 3), device=device)
    values = {n: getattr(module, n) for n in ("running_mean", "running_var", "weight", "bias")}
    truth = batch_norm_truth(x, values["running_mean"], values["running_var"], values["weight"],
                             values["bias"], training=False)
    assert_close_to_truth("output", module(x), truth["y"])


def test_weight_set_as_plain_attribute_by_a_pre_hook_is_used(backend, device):
    # The pattern of torch.nn.utils.weight_norm: the Parameter is deleted, a pre-hook sets a
    # plain tensor attribute before each call.
    module = fastbn.BatchNorm2d(3, device=device)
    scale = torch.nn.Parameter(torch.full((3,), 3.0, device=device))
    del module._parameters["weight"]
    module.register_forward_pre_hook(lambda mod, args: setattr(mod, "weight", scale * 1.5))
    x = make_input((4, 3, 3, 3), device=device)
    truth = batch_norm_truth(x, None, None, scale * 1.5, module.bias, training=True)
    assert_close_to_truth("output", module(x), truth["y"])


def test_jit_trace_of_a_training_layer_updates_and_normalizes_like_eager(backend, device):
    # Training batch statistics under torch.jit.trace (it used to fail with
    # "unordered_map::at"); the traced module, called on other data, still matches truth.
    import warnings

    module = fastbn.BatchNorm2d(3, device=device)
    x = make_input((4, 3, 5, 5), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from the shape checks
        traced = torch.jit.trace(module, (x,), check_trace=False)
    # The trace calls fastbn's ops (a Triton launch inside a traced graph would not replay),
    # the statistics op once: each replay updates the running statistics once.
    assert str(traced.graph).count("fastbn::batch_stats_") == 1
    assert "fastbn::normalize" in str(traced.graph)
    before_mean, before_var = module.running_mean.clone(), module.running_var.clone()
    other = (make_input((4, 3, 5, 5), device=device) * 3 + 2).requires_grad_(True)
    truth = batch_norm_truth(other, before_mean, before_var, module.weight, module.bias,
                             training=True)
    y = traced(other)
    assert_close_to_truth("output", y, truth["y"])
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    assert_close_to_truth("grad input", other.grad, grads_truth(truth, grad_out)["x"])
    assert_close_to_truth("running_mean", module.running_mean, truth["running_mean"])
    assert_close_to_truth("running_var", module.running_var, truth["running_var"])


def test_training_step_bumps_the_version_of_each_tensor_it_changes(backend, device):
    # As torch's module (num_batches_tracked.add_) and fastbn's op route do; the Triton
    # kernel's count of num_batches_tracked went without one.
    module = fastbn.BatchNorm2d(3, device=device)
    state = dict(module.named_buffers())
    before = {name: tensor._version for name, tensor in state.items()}
    module(make_input((4, 3, 3, 3), device=device))
    assert module.num_batches_tracked.item() == 1
    for name, tensor in state.items():
        assert tensor._version > before[name], name
