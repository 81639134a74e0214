"""fastbn.batch_norm: F.batch_norm's contract, its errors, and its results against the truth.

A bad call raises the exception type torch raises for the same mistake (computed here by
making the mistake with torch), with a message naming the problem, and changes nothing:
running_mean, running_var and num_batches_tracked keep their values.
"""

from __future__ import annotations

import fractions
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from cases import Case, cases, run_side_by_side
from helpers import assert_close_to_truth, batch_norm_truth, make_input

import fastbn

SHAPE = (4, 3, 2, 2)
FASTBN_ONLY = ("residual", "activation", "num_batches_tracked")


def valid_call(device) -> dict:
    """Arguments of a valid training call with running statistics and a step counter."""
    generator = torch.Generator().manual_seed(0)
    return {
        "input": make_input(SHAPE, device=device),
        "running_mean": torch.randn(3, generator=generator).to(device),
        "running_var": (0.5 + torch.rand(3, generator=generator)).to(device),
        "weight": (1 + torch.randn(3, generator=generator)).to(device),
        "bias": torch.randn(3, generator=generator).to(device),
        "training": True,
        "momentum": 0.1,
        "eps": 1e-5,
        "num_batches_tracked": torch.tensor(5, device=device),
    }


def torch_functional(call: dict) -> None:
    """The same call made to torch.nn.functional.batch_norm (fastbn-only arguments dropped)."""
    args = {k: v for k, v in call.items() if k not in FASTBN_ONLY}
    for name in ("running_mean", "running_var"):
        if args[name] is not None:
            args[name] = args[name].clone()
    y = F.batch_norm(**args)
    if call.get("residual") is not None:
        y + call["residual"]


def torch_module(call: dict) -> None:
    """The same input given to torch's module for its rank (BatchNorm1d for 1-D, 3d for 6-D)."""
    x = call["input"]
    module = torch.nn.BatchNorm1d(3) if x.dim() < 2 else torch.nn.BatchNorm3d(3)
    module.to(x.device)(x)


@dataclass
class Mistake:
    """One bad call: what changes from the valid call, and how torch judges the same call."""

    name: str
    change: Callable[[dict, torch.device], dict]
    match: str
    torch_call: Callable[[dict], None] | None = torch_functional
    error: type[Exception] | None = None  # where torch has no such check
    recent_torch_only: bool = False  # a check older torch lacks: skipped where torch accepts

    def call(self, device) -> dict:
        call = valid_call(device)
        call.update(self.change(call, device))
        return call

    def expected_error(self, call: dict) -> type[Exception]:
        """torch's exception type for this mistake (or the declared one where torch has none)."""
        if self.torch_call is None:
            return self.error
        try:
            self.torch_call(call)
        except Exception as error:
            return type(error)
        if self.recent_torch_only:
            pytest.skip(f"torch {torch.__version__} accepts {self.name!r}; torch 2.13 refuses it")
        raise AssertionError(f"torch accepts the call {self.name!r}")


def other_device(tensor):
    return tensor.to("meta")


MISTAKES = [
    Mistake("weight_channels", lambda c, d: {"weight": torch.ones(4, device=d)},
            r"weight .*3 elements"),
    Mistake("bias_channels", lambda c, d: {"bias": torch.zeros(4, device=d)},
            r"bias .*3 elements"),
    Mistake("running_mean_channels", lambda c, d: {"running_mean": torch.zeros(4, device=d)},
            r"running_mean .*3 elements"),
    Mistake("running_var_channels", lambda c, d: {"running_var": torch.ones(2, device=d)},
            r"running_var .*3 elements"),
    Mistake("running_mean_channels_in_eval",
            lambda c, d: {"running_mean": torch.zeros(4, device=d), "training": False},
            r"running_mean .*3 elements"),
    Mistake("one_value_per_channel_2d",
            lambda c, d: {"input": make_input((1, 3), device=d)}, "more than 1 value per channel"),
    Mistake("one_value_per_channel_4d",
            lambda c, d: {"input": make_input((1, 3, 1, 1), device=d)},
            "more than 1 value per channel"),
    Mistake("zero_eps", lambda c, d: {"eps": 0.0}, "eps must be positive"),
    Mistake("negative_eps", lambda c, d: {"eps": -1e-3}, "eps must be positive"),
    Mistake("integer_input", lambda c, d: {"input": c["input"].long()}, "int64"),
    Mistake("weight_on_other_device", lambda c, d: {"weight": other_device(c["weight"])},
            "weight is on meta"),
    Mistake("bias_on_other_device", lambda c, d: {"bias": other_device(c["bias"])},
            "bias is on meta"),
    Mistake("running_mean_on_other_device",
            lambda c, d: {"running_mean": other_device(c["running_mean"])},
            "running_mean is on meta"),
    Mistake("running_var_on_other_device",
            lambda c, d: {"running_var": other_device(c["running_var"])},
            "running_var is on meta"),
    Mistake("eval_without_running_stats",
            lambda c, d: {"training": False, "running_mean": None, "running_var": None},
            "running_mean must be defined"),
    Mistake("running_var_without_running_mean", lambda c, d: {"running_mean": None},
            "running_mean and running_var"),
    Mistake("residual_shape",
            lambda c, d: {"residual": make_input((4, 3, 2, 3), device=d)}, "residual"),
    Mistake("unknown_activation", lambda c, d: {"activation": "gelu"}, "unknown activation",
            torch_call=None, error=ValueError),
    Mistake("momentum_none_without_counter",
            lambda c, d: {"momentum": None, "num_batches_tracked": None}, "num_batches_tracked",
            torch_call=None, error=TypeError),
    Mistake("negative_eps_in_eval", lambda c, d: {"eps": -2.0, "training": False},
            "eps must be non-negative", recent_torch_only=True),
    Mistake("running_mean_without_running_var_in_eval",
            lambda c, d: {"running_var": None, "training": False}, "running_var must be defined"),
    Mistake("running_mean_without_running_var", lambda c, d: {"running_var": None},
            "running_mean and running_var"),
    Mistake("residual_not_a_tensor", lambda c, d: {"residual": 0.5}, "residual must be a Tensor",
            torch_call=None, error=TypeError),
    Mistake("weight_not_a_tensor", lambda c, d: {"weight": 0.5}, "weight must be a Tensor"),
    Mistake("bias_not_a_tensor", lambda c, d: {"bias": 0.5}, "bias must be a Tensor"),
    Mistake("num_batches_tracked_not_a_tensor", lambda c, d: {"num_batches_tracked": 5},
            "num_batches_tracked must be a Tensor", torch_call=None, error=TypeError),
    Mistake("training_an_int", lambda c, d: {"training": 1}, "training must be a bool"),
    Mistake("training_an_int_in_eval", lambda c, d: {"training": 0}, "training must be a bool"),
    # float16 input: its per-channel tensors all float16 or all float32, as torch's kernels
    Mistake("half_input_mixed_running_stats",
            lambda c, d: {"input": c["input"].half(), "weight": None, "bias": None,
                          "running_mean": c["running_mean"].half()},
            "running_mean has dtype torch.float16 but running_var has dtype torch.float32"),
    Mistake("bfloat16_input_mixed_parameters_in_eval",
            lambda c, d: {"input": c["input"].bfloat16(), "weight": c["weight"].bfloat16(),
                          "training": False},
            "weight has dtype torch.bfloat16 but bias has dtype torch.float32"),
    Mistake("momentum_a_string", lambda c, d: {"momentum": "0.1"}, "momentum must be a float"),
    # A real number torch's parser does not take as a float: refused before the step counts
    # (it used to fail in the running update, after num_batches_tracked changed).
    Mistake("momentum_a_fraction", lambda c, d: {"momentum": fractions.Fraction(1, 10)},
            "momentum must be a float or None, got Fraction"),
    Mistake("eps_a_fraction", lambda c, d: {"eps": fractions.Fraction(1, 100000)},
            "eps must be a float, got Fraction"),
    Mistake("negative_slope_a_fraction",
            lambda c, d: {"activation": "leaky_relu", "negative_slope": fractions.Fraction(1, 10)},
            "negative_slope must be a float, got Fraction", torch_call=None, error=TypeError),
    Mistake("momentum_a_string_in_eval", lambda c, d: {"momentum": "0.1", "training": False},
            "momentum must be a float"),
    # torch's F.leaky_relu takes a Number (a TypeError); fastbn checks before anything runs,
    # whatever the activation, as it checks momentum and eps.
    Mistake("negative_slope_a_string",
            lambda c, d: {"activation": "leaky_relu", "negative_slope": "0.1"},
            "negative_slope must be a float, got str", torch_call=None, error=TypeError),
    Mistake("negative_slope_none_without_leaky_relu", lambda c, d: {"negative_slope": None},
            "negative_slope must be a float, got NoneType", torch_call=None, error=TypeError),
    Mistake("running_mean_requires_grad",
            lambda c, d: {"running_mean": c["running_mean"].requires_grad_(True)},
            "not differentiable with respect to running_mean"),
    Mistake("running_var_requires_grad",
            lambda c, d: {"running_var": c["running_var"].requires_grad_(True)},
            "not differentiable with respect to running_var"),
    Mistake("running_mean_requires_grad_in_eval",
            lambda c, d: {"running_mean": c["running_mean"].requires_grad_(True),
                          "training": False},
            "not differentiable with respect to running_mean"),
    Mistake("running_var_requires_grad_in_eval",
            lambda c, d: {"running_var": c["running_var"].requires_grad_(True),
                          "training": False},
            "not differentiable with respect to running_var"),
    Mistake("one_value_per_channel_without_channels",
            lambda c, d: {"input": torch.randn(1, 0, device=d), "running_mean": None,
                          "running_var": None, "weight": None, "bias": None},
            "more than 1 value per channel"),
    Mistake("rank_1_input", lambda c, d: {"input": torch.randn(3, device=d)}, "1D input",
            torch_call=torch_module),
    # torch writes through the shared element; fastbn's update raised part-way, after
    # counting the step (and, on the Triton backend, updating running_var).
    Mistake("running_mean_expanded",
            lambda c, d: {"running_mean": c["running_mean"][:1].expand_as(c["running_mean"])},
            "running_mean is updated in place in training, but it is an expanded view",
            torch_call=None, error=RuntimeError),
    Mistake("running_var_expanded",
            lambda c, d: {"running_var": c["running_var"][:1].expand_as(c["running_var"])},
            "running_var is updated in place in training, but it is an expanded view",
            torch_call=None, error=RuntimeError),
]


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda m: m.name)
def test_mistake_raises_torchs_exception_type_naming_the_problem(backend, device, mistake):
    call = mistake.call(device)
    expected = mistake.expected_error(call)
    with pytest.raises(expected, match=mistake.match) as raised:
        fastbn.batch_norm(**call)
    assert type(raised.value) is expected


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda m: m.name)
def test_mistake_leaves_running_stats_and_counter_unchanged(backend, device, mistake):
    call = mistake.call(device)
    state = {
        name: call[name].clone()
        for name in ("running_mean", "running_var", "num_batches_tracked")
        if isinstance(call[name], torch.Tensor) and call[name].device.type != "meta"
    }
    assert state, "nothing to watch"
    with pytest.raises(mistake.expected_error(call)):
        fastbn.batch_norm(**call)
    for name, before in state.items():
        assert torch.equal(call[name], before), f"{name} changed by a failed call"


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda m: m.name)
def test_mistake_leaves_every_tensor_argument_unwritten(backend, device, mistake):
    """No in-place write at all, not even of equal values: every tensor's _version stays."""
    call = mistake.call(device)
    expected = mistake.expected_error(call)
    tensors = {name: value for name, value in call.items() if isinstance(value, torch.Tensor)}
    versions = {name: tensor._version for name, tensor in tensors.items()}
    with pytest.raises(expected):
        fastbn.batch_norm(**call)
    assert {name: tensor._version for name, tensor in tensors.items()} == versions


def test_zero_eps_is_accepted_in_eval(backend, device):
    call = valid_call(device) | {"training": False, "eps": 0.0}
    assert fastbn.batch_norm(**call).shape == SHAPE


def test_one_value_per_channel_is_accepted_in_eval(backend, device):
    call = valid_call(device) | {"training": False, "input": make_input((1, 3), device=device)}
    assert fastbn.batch_norm(**call).shape == (1, 3)


# ---------------------------------------------------------------------------------------------
# Results against the float64 truth, with torch's F.batch_norm as the yardstick
# ---------------------------------------------------------------------------------------------


CALL = Case(SHAPE, counter=False, spread=2.0)
CALL_CASES = [
    CALL.but(training=training, weight=weight, bias=bias)
    for training in (True, False)
    for weight, bias in ((False, False), (True, False), (True, True))
]


@cases(*CALL_CASES)
def test_batch_norm_matches_truth(backend, device, case):
    run_side_by_side(case, device)


def test_training_without_running_stats_normalizes_with_batch_statistics(backend, device):
    x = make_input(SHAPE, spread=3.0, offset=2.0, device=device)
    truth = batch_norm_truth(x, None, None, None, None, training=True)
    assert_close_to_truth("output", fastbn.batch_norm(x, None, None, training=True), truth["y"])


def test_training_increments_num_batches_tracked(backend, device):
    call = valid_call(device)
    fastbn.batch_norm(**call)
    assert int(call["num_batches_tracked"]) == 6


def test_eval_leaves_num_batches_tracked_alone(backend, device):
    call = valid_call(device) | {"training": False}
    fastbn.batch_norm(**call)
    assert int(call["num_batches_tracked"]) == 5


def test_momentum_none_updates_with_one_over_num_batches_tracked(backend, device):
    call = valid_call(device) | {"momentum": None}
    truth = batch_norm_truth(
        call["input"], call["running_mean"], call["running_var"], call["weight"], call["bias"],
        training=True, momentum=None, num_batches_tracked=6,
    )
    fastbn.batch_norm(**call)
    for name in ("running_mean", "running_var"):
        assert_close_to_truth(name, call[name], truth[name])
