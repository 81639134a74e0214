"""The case table: one description of a BatchNorm call, and one side-by-side runner.

A ``Case`` says what is called: shape, dtype, layout, flags (weight, bias, running
statistics, momentum), fusion (residual, activation) and training. ``draw`` makes its
seeded tensors, pre-activations kept away from the activation's kinks; ``run_side_by_side``
runs fastbn and torch on the same tensors and ``assert_results_match_truth`` holds every
result of fastbn against the float64 truth (and twice torch's error) with the tolerances of
helpers.TOLERANCES. The kernel, module, fusion, gradcheck and numerics tests draw their
calls from here, so adding a case to a test is one line of its table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LOW_PRECISION,
    activation64,
    assert_close_to_truth,
    away_from_kinks,
    batch_norm_truth,
    grads_truth,
    make_input,
)
from torch import Tensor

import fastbn

EPS = 1e-5
SLOPE = 0.2  # leaky_relu's negative slope in every case (not torch's default 0.01)
COUNTER = 4  # num_batches_tracked before a call: the module has seen four batches
LEAVES = ("x", "weight", "bias", "residual")


@dataclass(frozen=True)
class Case:
    """One BatchNorm call: what to give fastbn.batch_norm (and torch the same)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    channels_last: bool = False  # channels innermost in memory (helpers.make_input)
    weight: bool = True
    bias: bool = True
    running_stats: bool = True  # running_mean and running_var given
    counter: bool = True  # and num_batches_tracked with them
    momentum: float | None = 0.1
    residual: bool = False
    activation: str | None = None
    training: bool = True
    spread: float = 1.0  # of x's values (helpers.make_input)
    offset: float = 0.0

    def but(self, **changes) -> Case:
        """This case with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def id(self) -> str:
        """A pytest id naming every field that differs from the default."""
        parts = ["x".join(map(str, self.shape)), str(self.dtype).removeprefix("torch.")]
        defaults = Case(self.shape)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("shape", "dtype") or value == getattr(defaults, field.name):
                continue
            parts.append(field.name if value is True else f"{field.name}={value}")
        return "-".join(parts)

    def param(self, *marks) -> object:
        return pytest.param(self, id=self.id, marks=marks)


def parameter_dtype(dtype: torch.dtype) -> torch.dtype:
    """Parameters and statistics for an input dtype: float32 for fp16/bf16 (mixed precision)."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def cases(*table: Case) -> pytest.MarkDecorator:
    """Parametrize a test's ``case`` argument by a table of cases."""
    return pytest.mark.parametrize("case", [c.param() for c in table])


def draw(case: Case, device: torch.device, seed: int = 0) -> dict[str, Tensor | None]:
    """The case's tensors from seed: x, grad_out, and each of weight, bias, running_mean,
    running_var, num_batches_tracked (COUNTER) and residual the case has, else None."""
    generator = torch.Generator().manual_seed(seed + 100)
    channels = case.shape[1]

    def vector(scale: float, shift: float, uniform: bool = False) -> Tensor:
        values = (torch.rand if uniform else torch.randn)(channels, generator=generator)
        return (values * scale + shift).to(device=device, dtype=parameter_dtype(case.dtype))

    def like_x(offset: int) -> Tensor:
        return make_input(case.shape, case.dtype, seed=seed + offset,
                          channels_last=case.channels_last, device=device)

    tensors = {
        "x": make_input(case.shape, case.dtype, seed=seed, channels_last=case.channels_last,
                        device=device, spread=case.spread, offset=case.offset),
        "weight": vector(0.5, 1.0) if case.weight else None,
        "bias": vector(0.5, 0.0) if case.bias else None,
        "running_mean": vector(0.3, 0.0) if case.running_stats else None,
        "running_var": vector(1.0, 0.5, uniform=True) if case.running_stats else None,
        "residual": like_x(500) if case.residual else None,
        "grad_out": like_x(1000),
    }
    counter = (torch.tensor(COUNTER, device=device) if case.running_stats and case.counter
               else None)
    return tensors | {"num_batches_tracked": counter}


def draw_away_from_kinks(case: Case, device: torch.device) -> dict[str, Tensor | None]:
    """``draw`` at the first seed whose pre-activations avoid the activation's kinks."""
    def pre_activation(tensors):
        return batch_norm_truth(
            tensors["x"], tensors["running_mean"], tensors["running_var"], tensors["weight"],
            tensors["bias"], case.training, residual=tensors["residual"],
        )["y"]

    return away_from_kinks(lambda seed: draw(case, device, seed), pre_activation,
                           case.activation)


def truth_of(case: Case, tensors: dict) -> tuple[dict, dict]:
    """The float64 truth of the case's call on tensors (with the step counter's value after
    it), and its gradients for grad_out."""
    counter = tensors["num_batches_tracked"]
    counter_after = None if counter is None else int(counter) + int(case.training)
    truth = batch_norm_truth(
        tensors["x"], tensors["running_mean"], tensors["running_var"], tensors["weight"],
        tensors["bias"], case.training, case.momentum, EPS, tensors["residual"],
        case.activation, SLOPE, num_batches_tracked=counter_after,
    )
    return truth | {"num_batches_tracked": counter_after}, grads_truth(truth, tensors["grad_out"])


def fastbn_call(case: Case, leaves: dict, state: dict) -> Tensor:
    return fastbn.batch_norm(
        leaves["x"], state["running_mean"], state["running_var"], leaves.get("weight"),
        leaves.get("bias"), case.training, case.momentum, EPS, residual=leaves.get("residual"),
        activation=case.activation, negative_slope=SLOPE,
        num_batches_tracked=state["num_batches_tracked"],
    )


def torch_call(case: Case, leaves: dict, state: dict) -> Tensor:
    """torch's F.batch_norm, then the residual add and the activation, as separate ops."""
    counter = state["num_batches_tracked"]
    momentum = case.momentum
    if case.training and counter is not None:
        counter.add_(1)
        momentum = 1.0 / int(counter) if momentum is None else momentum
    u = F.batch_norm(leaves["x"], state["running_mean"], state["running_var"],
                     leaves.get("weight"), leaves.get("bias"), case.training, momentum or 0.0,
                     EPS)
    if "residual" in leaves:
        u = u + leaves["residual"]
    return activation64(u, case.activation, SLOPE)


def run(call, case: Case, tensors: dict) -> dict:
    """call on fresh leaves and fresh state: output, gradients (for grad_out) and state."""
    leaves = {name: tensors[name].detach().clone().requires_grad_(True)
              for name in LEAVES if tensors[name] is not None}
    state = {name: None if tensors[name] is None else tensors[name].clone()
             for name in ("running_mean", "running_var", "num_batches_tracked")}
    y = call(case, leaves, state)
    grads = torch.autograd.grad(y, list(leaves.values()), tensors["grad_out"])
    return {"y": y.detach(), "grads": dict(zip(leaves, grads, strict=True)), **state}


def memory_formats(t: Tensor) -> tuple[bool, bool, bool]:
    """Whether t is contiguous in the standard, channels_last and channels_last_3d formats
    (what a memory format means; strides of size-1 dimensions aside)."""
    return (t.is_contiguous(),
            t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last),
            t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))


def assert_results_match_truth(label: str, ours: dict, theirs: dict, truth: dict,
                               grad_truth: dict, leaves: dict) -> None:
    """fastbn's results (``run``'s dict) against the truth, with torch's as the yardstick:
    the output in the input's dtype and torch's memory format, every gradient in its leaf's
    dtype, the running statistics and the step counter."""
    x = leaves["x"]
    y = ours["y"]
    assert y.dtype == x.dtype, f"{label}output dtype {y.dtype} != input dtype {x.dtype}"
    assert memory_formats(y) == memory_formats(theirs["y"]), (
        f"{label}output strides {y.stride()}, torch's {theirs['y'].stride()}"
    )
    assert_close_to_truth(f"{label}output", y, truth["y"], theirs["y"])
    assert set(ours["grads"]) == set(grad_truth), f"{label}gradients {set(ours['grads'])}"
    for name, expected in grad_truth.items():
        grad = ours["grads"][name]
        assert grad.dtype == leaves[name].dtype, f"{label}grad {name} dtype {grad.dtype}"
        assert_close_to_truth(f"{label}grad {name}", grad, expected, theirs["grads"][name])
    for name in ("running_mean", "running_var"):
        if truth[name] is None or ours[name] is None:
            assert ours[name] is None, f"{label}{name} appeared"
        else:
            assert_close_to_truth(f"{label}{name}", ours[name], truth[name], theirs[name])
    if truth["num_batches_tracked"] is not None:
        counters = [int(r["num_batches_tracked"]) for r in (ours, theirs)]
        assert counters[0] == truth["num_batches_tracked"] == counters[1], (
            f"{label}num_batches_tracked {counters[0]}, expected "
            f"{truth['num_batches_tracked']} (torch: {counters[1]})"
        )


def run_side_by_side(case: Case, device: torch.device) -> tuple[dict, dict, dict]:
    """fastbn (on the active backend) and torch on the case's tensors, fastbn's results held
    against the truth; returns fastbn's results, torch's and the truth for further checks."""
    tensors = draw_away_from_kinks(case, device)
    truth, grad_truth = truth_of(case, tensors)
    ours, theirs = run(fastbn_call, case, tensors), run(torch_call, case, tensors)
    leaves = {name: tensors[name] for name in LEAVES if tensors[name] is not None}
    assert_results_match_truth("", ours, theirs, truth, grad_truth, leaves)
    return ours, theirs, truth
