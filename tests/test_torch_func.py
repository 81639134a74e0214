"""torch.func transforms, forward-mode AD and batched gradients: fastbn against torch.

Each test makes the same call to fastbn and to torch (``F.batch_norm`` or torch's module)
and compares everything that comes back: outputs, tangents, gradients, the running
statistics and num_batches_tracked afterwards, or the exception type when torch refuses
(then fastbn's state must be unchanged, values and ``_version``). Under a transform fastbn
runs its composite route (``fastbn.ops.composite_batch_norm``), on both backends; batched
gradients of an eager call run the reference formulas in the backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import ON_GPU
from helpers import assert_matches, make_input
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, stack_module_state, vmap
from torch.utils._pytree import tree_leaves

import fastbn

SHAPE = (5, 3, 4)
C = SHAPE[1]
TRAIN_EVAL = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


def assert_same(name, actual, expected):
    """Floating tensors within the tolerance table; integer ones (counters) equal."""
    if actual.is_floating_point():
        assert_matches(name, actual, expected)
    else:
        assert torch.equal(actual.cpu(), expected.cpu()), f"{name}: {actual} != {expected}"


def outcome(function):
    """("ok", result) or ("error", exception type) of function()."""
    try:
        return "ok", function()
    except Exception as error:  # noqa: BLE001 (compared with torch's)
        return "error", type(error)


def assert_same_outcome(name, mine, theirs):
    """Both raised the same exception type, or both returned matching tensors."""
    assert mine[0] == theirs[0], f"{name}: fastbn {mine}, torch {theirs}"
    if mine[0] == "error":
        assert mine[1] is theirs[1], f"{name}: fastbn raised {mine[1]}, torch {theirs[1]}"
        return
    mine_leaves, their_leaves = tree_leaves(mine[1]), tree_leaves(theirs[1])
    assert len(mine_leaves) == len(their_leaves), name
    for index, (a, b) in enumerate(zip(mine_leaves, their_leaves, strict=True)):
        if isinstance(a, torch.Tensor):
            assert_same(f"{name}[{index}]", a, b)
        else:
            assert a == b, f"{name}[{index}]: {a} != {b}"


def statistics(device):
    generator = torch.Generator().manual_seed(1)
    running_mean = torch.randn(C, generator=generator, dtype=torch.float64).to(device)
    running_var = (0.5 + torch.rand(C, generator=generator, dtype=torch.float64)).to(device)
    return running_mean, running_var


def parameters(device):
    generator = torch.Generator().manual_seed(2)
    weight = (1 + torch.randn(C, generator=generator, dtype=torch.float64)).to(device)
    bias = torch.randn(C, generator=generator, dtype=torch.float64).to(device)
    return weight, bias


def functional_pair(device, training):
    """fastbn.batch_norm and F.batch_norm as functions of (x, weight, bias), each with its
    own copy of the same running statistics (captured, as a module's buffers are)."""
    stats = statistics(device)
    mine = [t.clone() for t in stats]
    theirs = [t.clone() for t in stats]

    def fastbn_call(x, weight, bias):
        return fastbn.batch_norm(x, *mine, weight, bias, training, 0.1, 1e-5)

    def torch_call(x, weight, bias):
        return F.batch_norm(x, *theirs, weight, bias, training, 0.1, 1e-5)

    return (fastbn_call, mine), (torch_call, theirs)


def assert_state_matches(mine, theirs):
    for name, a, b in zip(("running_mean", "running_var"), mine, theirs, strict=True):
        assert_matches(name, a, b)


TRANSFORMS = {
    "grad": lambda f, x, w, b: grad(lambda x, w, b: f(x, w, b).square().sum(),
                                    argnums=(0, 1, 2))(x, w, b),
    "jvp": lambda f, x, w, b: jvp(f, (x, w, b), (x.cos(), w.sin(), b.cos())),
    "jacrev": lambda f, x, w, b: jacrev(f, argnums=(0, 1, 2))(x, w, b),
    "jacfwd": lambda f, x, w, b: jacfwd(f, argnums=(0, 1, 2))(x, w, b),
    "vmap_over_inputs": lambda f, x, w, b: vmap(f, in_dims=(0, None, None))(
        torch.stack([x, 2 * x + 1]), w, b),
    "vmap_over_parameters": lambda f, x, w, b: vmap(f, in_dims=(None, 0, 0))(
        x, torch.stack([w, w + 1]), torch.stack([b, -b])),
    "vmap_of_grad": lambda f, x, w, b: vmap(
        grad(lambda x, w, b: f(x, w, b).square().sum()), in_dims=(None, 0, None))(
        x, torch.stack([w, w + 1]), b),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@TRAIN_EVAL
def test_torch_func_transform_of_batch_norm_matches_torch(backend, device, transform, training):
    """Results, and the running statistics after, or torch's exception with nothing changed
    (vmap over inputs in training: unbatched running statistics cannot take a batch)."""
    (mine, my_state), (theirs, their_state) = functional_pair(device, training)
    x = make_input(SHAPE, torch.float64, device=device)
    weight, bias = parameters(device)
    versions = [t._version for t in my_state]
    before = [t.clone() for t in my_state]
    expected = outcome(lambda: TRANSFORMS[transform](theirs, x, weight, bias))
    actual = outcome(lambda: TRANSFORMS[transform](mine, x, weight, bias))
    assert_same_outcome(transform, actual, expected)
    assert_state_matches(my_state, their_state)
    if actual[0] == "error":
        assert [t._version for t in my_state] == versions
        for a, b in zip(my_state, before, strict=True):
            assert torch.equal(a, b)


def module_pair(device, training, module_class=torch.nn.BatchNorm1d, **options):
    """torch's module and fastbn's, with the same state, in float64."""
    theirs = module_class(C, device=device, dtype=torch.float64, **options).train(training)
    if theirs.running_mean is not None:
        running_mean, running_var = statistics(device)
        with torch.no_grad():
            theirs.running_mean.copy_(running_mean)
            theirs.running_var.copy_(running_var)
            theirs.num_batches_tracked.fill_(3)
    with torch.no_grad():
        weight, bias = parameters(device)
        theirs.weight.copy_(weight)
        theirs.bias.copy_(bias)
    mine = getattr(fastbn, module_class.__name__)(
        C, device=device, dtype=torch.float64, **options).train(training)
    mine.load_state_dict(theirs.state_dict())
    return mine, theirs


def assert_modules_match(mine, theirs):
    for (name, a), (_, b) in zip(mine.named_buffers(), theirs.named_buffers(), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_same(name, a, b)


@TRAIN_EVAL
def test_vmap_over_stacked_modules_matches_torch(backend, device, training):
    """Model ensembling: stack_module_state + functional_call under vmap, in eval and in
    training (the stacked buffers take each model's update)."""
    def ensemble(module_class_of, models):
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")

        def call(params, buffers, x):
            return functional_call(base, (params, buffers), (x,))

        x = make_input(SHAPE, torch.float64, device=device)
        return vmap(call, in_dims=(0, 0, None))(params, buffers, x), buffers

    pairs = [module_pair(device, training) for _ in range(3)]
    for index, (mine, theirs) in enumerate(pairs):
        with torch.no_grad():
            for module in (mine, theirs):
                module.weight.add_(index)
    my_output, my_buffers = ensemble(fastbn.BatchNorm1d, [mine for mine, _ in pairs])
    their_output, their_buffers = ensemble(torch.nn.BatchNorm1d, [theirs for _, theirs in pairs])
    assert_matches("output", my_output, their_output)
    for name in their_buffers:
        assert_same(name, my_buffers[name], their_buffers[name])


@TRAIN_EVAL
def test_grad_through_functional_call_with_explicit_buffers_matches_torch(backend, device,
                                                                            training):
    """grad over a module's parameters with its buffers passed in, as torch.func asks for
    state a transform updates: gradients, and the buffers' update."""
    mine, theirs = module_pair(device, training)
    x = make_input(SHAPE, torch.float64, device=device)

    def gradients(module):
        params = {k: v.detach() for k, v in module.named_parameters()}
        buffers = {k: v.clone() for k, v in module.named_buffers()}

        def loss(params, buffers):
            return functional_call(module, (params, buffers), (x,)).square().sum()

        return grad(loss)(params, buffers), buffers

    my_grads, my_buffers = gradients(mine)
    their_grads, their_buffers = gradients(theirs)
    for name in their_grads:
        assert_matches(f"grad {name}", my_grads[name], their_grads[name])
    for name in their_buffers:
        assert_same(name, my_buffers[name], their_buffers[name])


@TRAIN_EVAL
def test_forward_mode_ad_through_the_module_matches_torch(backend, device, training):
    """torch.autograd.forward_ad duals: output, tangent, running statistics, counter."""
    mine, theirs = module_pair(device, training)
    x = make_input(SHAPE, torch.float64, device=device)
    tangent = make_input(SHAPE, torch.float64, seed=5, device=device)
    results = []
    for module in (mine, theirs):
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x, tangent)
            output, output_tangent = torch.autograd.forward_ad.unpack_dual(module(dual))
            results.append((output, output_tangent))
    assert_matches("output", results[0][0], results[1][0])
    assert_matches("tangent", results[0][1], results[1][1])
    assert_modules_match(mine, theirs)


@TRAIN_EVAL
def test_forward_mode_ad_of_parameter_tangents_matches_torch(backend, device, training):
    """Tangents on weight and bias (and none on x), with a residual and an activation
    compared against torch's unfused ops."""
    x = make_input(SHAPE, torch.float64, device=device)
    residual = make_input(SHAPE, torch.float64, seed=6, device=device)
    weight, bias = parameters(device)
    outputs = []
    for fused in (True, False):
        running_mean, running_var = statistics(device)
        with torch.autograd.forward_ad.dual_level():
            w = torch.autograd.forward_ad.make_dual(weight, weight.cos())
            b = torch.autograd.forward_ad.make_dual(bias, bias.sin())
            if fused:
                y = fastbn.batch_norm(x, running_mean, running_var, w, b, training,
                                      residual=residual, activation="silu")
            else:
                y = F.silu(F.batch_norm(x, running_mean, running_var, w, b, training)
                           + residual)
            outputs.append([*torch.autograd.forward_ad.unpack_dual(y), running_mean,
                            running_var])
    for name, a, b in zip(("output", "tangent", "running_mean", "running_var"), *outputs,
                          strict=True):
        assert_matches(name, a, b)


def test_captured_module_in_training_under_grad_updates_its_state_once(backend, device):
    """A module captured by grad in training: torch's own module refuses (its Python code
    counts the batch in place on a captured tensor); fastbn accepts the call and gives
    F.batch_norm's gradients and running statistics, with the batch counted once."""
    mine, theirs = module_pair(device, True)
    x = make_input(SHAPE, torch.float64, device=device)
    assert outcome(lambda: grad(lambda x: theirs(x).sum())(x))[0] == "error"
    (_, _), (torch_call, torch_state) = functional_pair(device, True)
    expected = grad(lambda x: torch_call(x, *parameters(device)).square().sum())(x)
    actual = grad(lambda x: mine(x).square().sum())(x)
    assert_matches("grad x", actual, expected)
    assert_state_matches([mine.running_mean, mine.running_var], torch_state)
    assert int(mine.num_batches_tracked) == 4


# ---------------------------------------------------------------------------------------------
# Batched gradients of eager calls: the backward runs under vmap
# ---------------------------------------------------------------------------------------------


@TRAIN_EVAL
def test_vectorized_jacobian_matches_torch(backend, device, training):
    mine, theirs = module_pair(device, training)
    x = make_input((4, C), torch.float64, device=device)
    actual = torch.autograd.functional.jacobian(mine, x, vectorize=True)
    expected = torch.autograd.functional.jacobian(theirs, x, vectorize=True)
    assert_matches("jacobian", actual, expected)
    assert_modules_match(mine, theirs)


@TRAIN_EVAL
def test_is_grads_batched_matches_torch(backend, device, training):
    mine, theirs = module_pair(device, training)
    x = make_input(SHAPE, torch.float64, device=device)
    cotangents = torch.stack([make_input(SHAPE, torch.float64, seed=s, device=device)
                              for s in (7, 8)])
    results = []
    for module in (mine, theirs):
        leaf = x.clone().requires_grad_(True)
        output = module(leaf)
        results.append(torch.autograd.grad(
            output, (leaf, module.weight, module.bias), cotangents, is_grads_batched=True))
    for name, a, b in zip(("x", "weight", "bias"), *results, strict=True):
        assert_matches(f"grad {name}", a, b)


# ---------------------------------------------------------------------------------------------
# gradcheck with forward-mode and batched checks, float64
# ---------------------------------------------------------------------------------------------


def gradcheck_case(device, training, activation):
    x = make_input((3, 2, 4), torch.float64, device=device, spread=2.0)
    residual = make_input((3, 2, 4), torch.float64, seed=3, device=device)
    generator = torch.Generator().manual_seed(4)
    weight = (1 + torch.rand(2, generator=generator, dtype=torch.float64)).to(device)
    bias = torch.randn(2, generator=generator, dtype=torch.float64).to(device)
    running_mean = torch.randn(2, generator=generator, dtype=torch.float64).to(device)
    running_var = (0.5 + torch.rand(2, generator=generator, dtype=torch.float64)).to(device)

    def function(x, weight, bias, residual):
        return fastbn.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias,
                                 training, residual=residual, activation=activation)

    inputs = tuple(t.requires_grad_(True) for t in (x, weight, bias, residual))
    return function, inputs


@TRAIN_EVAL
def test_gradcheck_with_forward_ad_and_batched_grads(backend, device, training):
    function, inputs = gradcheck_case(device, training, "silu")
    assert torch.autograd.gradcheck(
        function, inputs, check_forward_ad=True, check_backward_ad=True,
        check_batched_grad=True, check_batched_forward_grad=True,
        fast_mode=backend == "triton" and not ON_GPU,
    )


@TRAIN_EVAL
def test_gradgradcheck_with_forward_over_reverse_and_batched_grads(backend, device, training):
    function, inputs = gradcheck_case(device, training, None)
    assert torch.autograd.gradgradcheck(
        function, inputs, check_fwd_over_rev=True, check_batched_grad=True,
        fast_mode=backend == "triton" and not ON_GPU,
    )


@pytest.mark.parametrize("transform", ["vmap", "jvp", "jacrev"])
def test_transform_of_a_module_without_running_stats_in_training_matches_torch(
    backend, device, transform
):
    """track_running_stats=False in training: batch statistics only, no state to update,
    so vmap over inputs works for torch's module and for fastbn's."""
    mine, theirs = module_pair(device, True, track_running_stats=False)
    x = make_input(SHAPE, torch.float64, device=device)
    calls = {
        "vmap": lambda m: vmap(m)(torch.stack([x, x.square()])),
        "jvp": lambda m: jvp(m, (x,), (x.cos(),)),
        "jacrev": lambda m: jacrev(m)(x),
    }
    assert_same_outcome(transform, outcome(lambda: calls[transform](mine)),
                        outcome(lambda: calls[transform](theirs)))
