"""gradcheck and gradgradcheck in float64 through fastbn.batch_norm and the modules.

Where the kernels run in Triton's CPU interpreter (a few seconds a check), the checks use
gradcheck's fast mode (one random projection of the Jacobian instead of all of it), and
gradgradcheck of the kernels runs by default only in the core cases: its second
derivatives come from the reference (fastbn.ops differentiates its formulas), so beyond
those it adds little to the kernels' coverage; the rest is marked slow there.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ON_GPU
from helpers import ACTIVATIONS, batch_norm_truth, kink_distance, make_input

import fastbn

CHECKS = {"gradcheck": torch.autograd.gradcheck, "gradgradcheck": torch.autograd.gradgradcheck}
SHAPES = {2: (6, 2), 3: (3, 2, 4), 4: (3, 2, 3, 2), 5: (2, 2, 2, 3, 2)}
C = 2


def fast_mode(backend: str) -> bool:
    return backend == "triton" and not ON_GPU


def float64_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_(True)


def batch_norm_case(device, *, seed=0, rank=4, channels_last=False, training=True,
                    weight=True, bias=True, residual=False, activation=None):
    """Inputs for one check: the leaves to differentiate and a function of them.

    The function passes fresh copies of the running statistics on every call, so the
    repeated evaluations of gradcheck see the same state.
    """
    shape = SHAPES[rank]
    generator = torch.Generator().manual_seed(seed + 100)
    leaves = {"input": make_input(shape, torch.float64, seed=seed, channels_last=channels_last,
                                  device=device, spread=2.0)}
    if weight:
        leaves["weight"] = (1 + 2 * torch.randn(C, generator=generator, dtype=torch.float64))
    if bias:
        leaves["bias"] = torch.randn(C, generator=generator, dtype=torch.float64)
    if residual:
        leaves["residual"] = make_input(shape, torch.float64, seed=seed + 1, device=device,
                                        channels_last=channels_last)
    leaves = {k: float64_leaf(v.to(device)) for k, v in leaves.items()}
    running_mean = torch.randn(C, generator=generator, dtype=torch.float64).to(device)
    running_var = (0.5 + torch.rand(C, generator=generator, dtype=torch.float64)).to(device)

    def function(*tensors):
        args = dict(zip(leaves, tensors, strict=True))
        return fastbn.batch_norm(
            args["input"], running_mean.clone(), running_var.clone(), args.get("weight"),
            args.get("bias"), training, residual=args.get("residual"), activation=activation,
            negative_slope=0.2,
        )

    pre_activation = batch_norm_truth(
        leaves["input"], running_mean, running_var, leaves.get("weight"), leaves.get("bias"),
        training, residual=leaves.get("residual"),
    )["y"]
    return function, tuple(leaves.values()), kink_distance(pre_activation, activation)


def away_from_kinks(device, **options):
    """The first seed's case whose pre-activations lie 1e-3 or more from every kink.

    Finite differences of step 1e-6 across a kink of relu, relu6, leaky_relu or hardswish
    would measure a slope that exists on neither side.
    """
    for seed in range(100):
        function, inputs, distance = batch_norm_case(device, seed=seed, **options)
        if distance >= 1e-3:
            return function, inputs
    pytest.fail("no seed gave pre-activations 1e-3 away from the kinks")


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


@CORE_CHECK_PAIRS
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_gradients(backend, device, check, training):
    function, inputs = away_from_kinks(device, training=training)
    run_check(check, backend, function, inputs)


@CHECK_PAIRS
@pytest.mark.parametrize(
    "weight, bias", [(True, False), (False, True), (False, False)],
    ids=["weight_only", "bias_only", "no_affine"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_gradients_without_weight_or_bias(
    backend, device, check, training, weight, bias
):
    function, inputs = away_from_kinks(device, training=training, weight=weight, bias=bias)
    run_check(check, backend, function, inputs)


@CHECK_PAIRS
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_gradients_with_residual(backend, device, check, training):
    function, inputs = away_from_kinks(device, training=training, residual=True)
    run_check(check, backend, function, inputs)


@CHECK_PAIRS
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a is not None])
def test_batch_norm_gradients_through_activation(backend, device, check, activation):
    """Training, with a residual: the activation sees batch statistics and the residual."""
    function, inputs = away_from_kinks(device, residual=True, activation=activation)
    run_check(check, backend, function, inputs)


@CHECK_PAIRS
@pytest.mark.parametrize(
    "rank, channels_last",
    [(2, False), (3, False), (3, True), (5, False), (4, True), (5, True)],
    ids=["2d", "3d", "3d-channels_last", "5d", "4d-channels_last", "5d-channels_last_3d"],
)
def test_batch_norm_gradients_in_each_rank_and_layout(backend, device, check, rank,
                                                      channels_last):
    function, inputs = away_from_kinks(
        device, rank=rank, channels_last=channels_last, activation="silu"
    )
    run_check(check, backend, function, inputs)


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
