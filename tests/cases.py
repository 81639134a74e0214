"""The case table: one description of a BatchNorm call, and one side-by-side runner.

A ``Case`` says what is called: shape, dtype, layouts (of x, grad_out and the residual),
flags (weight, bias, running statistics, momentum), fusion (residual, activation) and
training. ``draw`` makes its seeded tensors (``draw_away_from_kinks``: pre-activations kept
away from the activation's kinks); ``run_side_by_side`` runs fastbn and torch on the same
tensors and ``assert_results_match_truth`` holds every result of fastbn against the float64
truth (and twice torch's error) with the tolerances of helpers.TOLERANCES. The kernel,
module, fusion, gradcheck and numerics tests draw their calls from here, so adding a case
to a test is one line of its table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LOW_PRECISION,
    ROUNDING_MARGIN,
    activation64,
    assert_close_to_truth,
    away_from_kinks,
    batch_norm_truth,
    channel_spreads,
    grads_truth,
    make_input,
)
from torch import Tensor

import fastbn

EPS = 1e-5
SLOPE = 0.2  # leaky_relu's negative slope in every case (not torch's default 0.01)
COUNTER = 4  # num_batches_tracked before a call: the module has seen four batches
LEAVES = ("x", "weight", "bias", "residual")
STATE = ("running_mean", "running_var", "num_batches_tracked")
MEMORY_FORMATS = ("contiguous", "channels_last")
LAYOUTS = (*MEMORY_FORMATS, "sliced_channels", "strided_positions",
           "strided_rows", "transposed", "expanded")
"""How a tensor of the case lies in memory (``laid_out_input``): the two memory formats,
strided views that the launchers read in place (sliced_channels, strided_positions) or copy
(strided_rows), a 2-D (N, C) stored as (C, N) (transposed), and, for grad_out only, one
value broadcast to every element with every stride 0 (expanded: y.sum().backward())."""


@dataclass(frozen=True)
class Case:
    """One BatchNorm call: what to give fastbn.batch_norm (and torch the same)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"  # x's, one of LAYOUTS
    grad_layout: str | None = None  # grad_out's; None: x's
    residual_layout: str | None = None  # the residual's; None: x's
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

    def __post_init__(self) -> None:
        layouts = (self.layout, self.grad_layout or self.layout,
                   self.residual_layout or self.layout)
        assert set(layouts) <= set(LAYOUTS), f"unknown layout in {layouts}"
        assert "expanded" not in layouts[::2], "only grad_out can be expanded"

    def but(self, **changes) -> Case:
        """This case with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def id(self) -> str:
        """A pytest id naming every field that differs from the default (grad_out's layout,
        and the residual's where there is one, where they differ from x's)."""
        parts = ["x".join(map(str, self.shape)), str(self.dtype).removeprefix("torch.")]
        defaults = Case(self.shape)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("grad_layout", "residual_layout") and value == self.layout:
                value = None
            if field.name == "residual_layout" and not self.residual:
                value = None
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


def laid_out_input(shape: tuple[int, ...], dtype: torch.dtype, layout: str, *, seed: int,
                   device: torch.device, spread: float = 1.0, offset: float = 0.0,
                   scaled_channels: bool = True) -> Tensor:
    """helpers.make_input's values (channels innermost for channels_last) in a layout of
    LAYOUTS; the strided views are views of a larger tensor on the device."""
    x = make_input(shape, dtype, seed=seed, channels_last=layout == "channels_last",
                   device=device, spread=spread, offset=offset, scaled_channels=scaled_channels)
    if layout in ("contiguous", "channels_last"):
        return x
    if layout == "transposed":
        assert x.dim() == 2, "transposed is a layout of (N, C)"
        return x.t().contiguous().t()
    if layout == "expanded":
        return x.flatten()[:1].view([1] * x.dim()).expand(x.shape)
    every = slice(None)
    wide, view = {
        # not dense but flattenable: channels 1 .. C of C + 3
        "sliced_channels": ((x.shape[0], x.shape[1] + 3, *x.shape[2:]),
                            (every, slice(1, x.shape[1] + 1))),
        # the spatial dimensions flatten to one stride of 2
        "strided_positions": ((*x.shape[:-1], 2 * x.shape[-1]), (..., slice(None, None, 2))),
        # every other row: the spatial dimensions do not flatten
        "strided_rows": ((*x.shape[:2], 2 * x.shape[2], *x.shape[3:]),
                         (every, every, slice(None, None, 2))),
    }[layout]
    return x.new_zeros(wide)[view].copy_(x)


def draw(case: Case, device: torch.device, seed: int = 0) -> dict[str, Tensor | None]:
    """The case's tensors from seed: x, grad_out, and each of weight, bias, running_mean,
    running_var, num_batches_tracked (COUNTER) and residual the case has, else None."""
    generator = torch.Generator().manual_seed(seed + 100)
    channels = case.shape[1]

    def vector(scale: float | Tensor, shift: float | Tensor, uniform: bool = False) -> Tensor:
        values = (torch.rand if uniform else torch.randn)(channels, generator=generator)
        return (values * scale + shift).to(device=device, dtype=parameter_dtype(case.dtype))

    spreads = channel_spreads(channels, case.spread).float()

    def like_x(offset: int, layout: str | None, scaled_channels: bool = True) -> Tensor:
        return laid_out_input(case.shape, case.dtype, layout or case.layout, seed=seed + offset,
                              device=device, scaled_channels=scaled_channels)

    tensors = {
        "x": laid_out_input(case.shape, case.dtype, case.layout, seed=seed, device=device,
                            spread=case.spread, offset=case.offset),
        "weight": vector(0.5, 1.0) if case.weight else None,
        "bias": vector(0.5, 0.0) if case.bias else None,
        # near x's own statistics, as a trained model's are: eval normalizes x to a few units
        "running_mean": vector(0.3 * spreads, case.offset) if case.running_stats else None,
        "running_var": (vector(spreads**2, 0.5 * spreads**2, uniform=True) if case.running_stats
                        else None),
        "residual": like_x(500, case.residual_layout) if case.residual else None,
        # unit scale in every channel: the sums d weight, d bias are of grad_out's size, and
        # the gradient tolerances are for results of about one (at C = 100 a channel-scaled
        # grad_out reaches 26, and a float32 sum of 42 such terms errs by ~5e-5)
        "grad_out": like_x(1000, case.grad_layout, scaled_channels=False),
    }
    counter = (torch.tensor(COUNTER, device=device) if case.running_stats and case.counter
               else None)
    return tensors | {"num_batches_tracked": counter}


def draw_away_from_kinks(case: Case, device: torch.device,
                         margin: float = 1e-3) -> dict[str, Tensor | None]:
    """``draw`` at the first seed whose pre-activations lie margin or more from the
    activation's kinks (helpers.away_from_kinks)."""
    def pre_activation(tensors):
        return batch_norm_truth(
            tensors["x"], tensors["running_mean"], tensors["running_var"], tensors["weight"],
            tensors["bias"], case.training, residual=tensors["residual"],
        )["y"]

    return away_from_kinks(lambda seed: draw(case, device, seed), pre_activation,
                           case.activation, margin)


def truth_of(case: Case, tensors: dict) -> tuple[dict, dict]:
    """The float64 truth of the case's call on tensors (with the step counter's value after
    it), and its gradients for grad_out (none when grad_out is None)."""
    counter = tensors["num_batches_tracked"]
    counter_after = None if counter is None else int(counter) + int(case.training)
    truth = batch_norm_truth(
        tensors["x"], tensors["running_mean"], tensors["running_var"], tensors["weight"],
        tensors["bias"], case.training, case.momentum, EPS, tensors["residual"],
        case.activation, SLOPE, num_batches_tracked=counter_after,
    )
    grad_out = tensors["grad_out"]
    grads = {} if grad_out is None else grads_truth(truth, grad_out)
    return truth | {"num_batches_tracked": counter_after}, grads


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


def copy_of(t: Tensor | None) -> Tensor | None:
    """A copy of t with t's strides (``clone`` makes a view that is not dense contiguous)."""
    if t is None:
        return None
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def fresh_state(tensors: dict) -> dict:
    """Copies of the running statistics and the step counter (None where the case has none)."""
    return {name: copy_of(tensors[name]) for name in STATE}


def run(call, case: Case, tensors: dict) -> dict:
    """call on fresh leaves (in the tensors' layouts) and fresh state: output, gradients for
    grad_out (none, and leaves that require none, when grad_out is None) and state."""
    grad_out = tensors["grad_out"]
    leaves = {name: copy_of(tensors[name]).requires_grad_(grad_out is not None)
              for name in LEAVES if tensors[name] is not None}
    state = fresh_state(tensors)
    y = call(case, leaves, state)
    grads = {} if grad_out is None else dict(zip(
        leaves, torch.autograd.grad(y, list(leaves.values()), grad_out), strict=True))
    return {"y": y.detach(), "grads": grads, **state}


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


def run_side_by_side(case: Case, device: torch.device,
                     tensors: dict | None = None) -> tuple[dict, dict, dict]:
    """fastbn (on the active backend) and torch on tensors (by default the case's, drawn
    away from the kinks), fastbn's results held against the truth; returns fastbn's
    results, torch's and the truth for further checks."""
    if tensors is None:
        tensors = draw_away_from_kinks(case, device, ROUNDING_MARGIN)
    truth, grad_truth = truth_of(case, tensors)
    ours, theirs = run(fastbn_call, case, tensors), run(torch_call, case, tensors)
    leaves = {name: tensors[name] for name in LEAVES if tensors[name] is not None}
    assert_results_match_truth("", ours, theirs, truth, grad_truth, leaves)
    return ours, theirs, truth
