"""gradcheck and gradgradcheck in float64 through fastbn.batch_norm and the modules.

Where the kernels run in Triton's CPU interpreter (a few seconds a check), the checks use
gradcheck's fast mode (one random projection of the Jacobian instead of all of it), and
gradgradcheck of the kernels runs by default only in the core cases: its second
derivatives come from the reference (fastbn.ops differentiates its formulas), so beyond
those it adds little to the kernels' coverage; the rest is marked slow there.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from cases import LEAVES, Case, cases, draw_away_from_kinks, fastbn_call, fresh_state
from conftest import ON_GPU
from helpers import ACTIVATIONS, make_input

import fastbn

CHECKS = {"gradcheck": torch.autograd.gradcheck, "gradgradcheck": torch.autograd.gradgradcheck}
SHAPES = {2: (6, 2), 3: (3, 2, 4), 4: (3, 2, 3, 2), 5: (2, 2, 2, 3, 2)}
C = 2


def fast_mode(backend: str) -> bool:
    return backend == "triton" and not ON_GPU


def float64_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_(True)


def checked_call(case: Case, device) -> tuple:
    """A function of the case's leaves (x, weight, bias, residual: those it has) and the
    leaves, drawn away from the activation's kinks. The function passes fresh copies of
    the running statistics on every call, so the repeated evaluations of gradcheck see the
    same state."""
    tensors = draw_away_from_kinks(case, device)
    leaves = {name: float64_leaf(tensors[name]) for name in LEAVES if tensors[name] is not None}

    def function(*values):
        return fastbn_call(case, dict(zip(leaves, values, strict=True)), fresh_state(tensors))

    return function, tuple(leaves.values())


def run_check(check, backend, function, inputs):
    assert CHECKS[check](function, inputs, fast_mode=fast_mode(backend))


def checks_and_backends(core: bool = False) -> list:
    """(check, backend) parameters; backend goes to conftest's fixture (indirect)."""
    slow_where_interpreted = () if ON_GPU else pytest.mark.slow
    return [
        pytest.param(
            check, backend, id=f"{backend}-{check}",
            marks=slow_where_interpreted
            if backend == "triton" and check == "gradgradcheck" and not core else (),
        )
        for backend in ("torch", "triton")
        for check in CHECKS
    ]


CHECK_PAIRS = pytest.mark.parametrize(
    "check, backend", checks_and_backends(), indirect=["backend"]
)
CORE_CHECK_PAIRS = pytest.mark.parametrize(
    "check, backend", checks_and_backends(core=True), indirect=["backend"]
)


GRAD = Case(SHAPES[4], torch.float64, counter=False, spread=2.0)


@CORE_CHECK_PAIRS
@cases(GRAD, GRAD.but(training=False))
def test_batch_norm_gradients(backend, device, check, case):
    run_check(check, backend, *checked_call(case, device))


@CHECK_PAIRS
@cases(*(GRAD.but(training=training, weight=weight, bias=bias) for training in (True, False)
         for weight, bias in ((True, False), (False, True), (False, False))))
def test_batch_norm_gradients_without_weight_or_bias(backend, device, check, case):
    run_check(check, backend, *checked_call(case, device))


@CHECK_PAIRS
@cases(GRAD.but(residual=True), GRAD.but(residual=True, training=False))
def test_batch_norm_gradients_with_residual(backend, device, check, case):
    run_check(check, backend, *checked_call(case, device))


@CHECK_PAIRS
@cases(*(GRAD.but(residual=True, activation=a) for a in ACTIVATIONS if a is not None))
def test_batch_norm_gradients_through_activation(backend, device, check, case):
    """Training, with a residual: the activation sees batch statistics and the residual."""
    run_check(check, backend, *checked_call(case, device))


@CHECK_PAIRS
@cases(*(GRAD.but(shape=SHAPES[rank], layout=layout, activation="silu")
         for rank, layout in [(2, "contiguous"), (3, "contiguous"), (3, "channels_last"),
                              (5, "contiguous"), (4, "channels_last"), (5, "channels_last")]))
def test_batch_norm_gradients_in_each_rank_and_layout(backend, device, check, case):
    run_check(check, backend, *checked_call(case, device))


@CHECK_PAIRS
def test_batch_norm_gradients_with_a_zero_variance_channel(backend, device, check):
    """A constant channel in training: var = 0, and eps keeps invstd = 1 / sqrt(eps) finite."""
    x = make_input((3, 2, 3, 2), torch.float64, device=device)
    x[:, 1] = 0.75
    inputs = (float64_leaf(x), float64_leaf(torch.tensor([1.5, 0.5], device=device)),
              float64_leaf(torch.tensor([0.1, -0.2], device=device)))

    def function(x, weight, bias):
        return fastbn.batch_norm(x, None, None, weight, bias, True)

    run_check(check, backend, function, inputs)


@CORE_CHECK_PAIRS
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm2d_module_gradients(backend, device, check, training):
    module = fastbn.BatchNorm2d(C, device=device, dtype=torch.float64).train(training)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        module.running_mean.copy_(torch.randn(C, generator=generator))
        module.running_var.copy_(0.5 + torch.rand(C, generator=generator))
    x = make_input(SHAPES[4], torch.float64, device=device, spread=2.0)
    weight = float64_leaf((1 + torch.randn(C, generator=generator)).to(device))
    bias = float64_leaf(torch.randn(C, generator=generator).to(device))

    def function(x, weight, bias):
        return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,))

    run_check(check, backend, function, (float64_leaf(x), weight, bias))


def gradient_penalty(training: bool, activation: str | None, device) -> tuple:
    """A function of (x, weight, bias) that differentiates a fastbn call once with
    create_graph=True and returns a penalty of that gradient (WGAN-GP style), and its
    float64 leaves: checking it checks fastbn's double backward, and gradgradcheck its
    third derivative."""
    generator = torch.Generator().manual_seed(5)
    x = make_input(SHAPES[4], torch.float64, device=device, spread=2.0)
    weight = (1 + 0.3 * torch.randn(C, generator=generator, dtype=torch.float64)).to(device)
    bias = torch.randn(C, generator=generator, dtype=torch.float64).to(device)
    running_mean = torch.randn(C, generator=generator, dtype=torch.float64).to(device)
    running_var = (0.5 + torch.rand(C, generator=generator, dtype=torch.float64)).to(device)
    v = make_input(SHAPES[4], torch.float64, seed=9, device=device)

    def penalty(x, weight, bias):
        y = fastbn.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias,
                              training, activation=activation)
        grad_x, grad_weight = torch.autograd.grad((y * v).sum(), (x, weight), create_graph=True)
        return (grad_x * grad_x).sum() + (grad_weight * grad_weight).sum()

    return penalty, (float64_leaf(x), float64_leaf(weight), float64_leaf(bias))


@CORE_CHECK_PAIRS
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_penalty_gradients(backend, device, check, training, activation):
    run_check(check, backend, *gradient_penalty(training, activation, device))


@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_penalty_runs_under_saved_tensor_hooks(backend, device, training, activation):
    """A gradient-penalty step inside torch.autograd.graph.save_on_cpu (or any
    saved_tensors_hooks) gives the gradients it gives without: the double backward runs
    there (torch.func.vjp, which it used to call, refuses saved-tensor hooks)."""
    penalty, leaves = gradient_penalty(training, activation, device)
    runs = []
    for hooks in (contextlib.nullcontext(), torch.autograd.graph.save_on_cpu()):
        inputs = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
        with hooks:
            penalty(*inputs).backward()
        runs.append([leaf.grad for leaf in inputs])
    assert runs[0][0] is not None  # (bias has none without an activation: no term in it)
    for index, (plain, hooked) in enumerate(zip(*runs, strict=True)):
        assert (plain is None and hooked is None) or torch.equal(plain, hooked), f"leaf {index}"
