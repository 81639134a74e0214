"""What each mode times: a step that does one call's work and returns what the check compares.

- ``forward-train``:    y = BN(x) with batch statistics and the running-statistics update,
  with autograd recording (x, weight, bias and z require grad, as in training);
- ``forward-eval``:     y = BN(x) with the running statistics, under torch.no_grad();
- ``backward``:         the gradients (dx, dweight, dbias, and dz with a residual) of one
  training forward that ran before timing: each step is only
  ``torch.autograd.grad(..., retain_graph=True)``;
- ``forward-backward``: a training forward, then its gradients.

BN(x) stands for the point's whole fused call: relu(BN(x)) or relu(BN(x) + z) when its fusion
says so (see shapes.FUSIONS).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastbn.bench.problem import EPS, GRADS, MOMENTUM, Inputs
from fastbn.bench.providers import Bind, Params

MODES = ("forward-train", "forward-eval", "backward", "forward-backward")

Step = Callable[[], dict[str, Tensor]]


def make_step(mode: str, bind: Bind, inputs: Inputs) -> Step:
    """One ``mode`` call through a provider's ``bind``, on fresh copies of the running stats.

    The step returns its outputs under the keys of ``fastbn.bench.problem.truth``. For
    ``backward`` the forward runs here, once; the step differentiates its retained graph.
    """
    params = Params(
        inputs.weight, inputs.bias, inputs.running_mean.clone(), inputs.running_var.clone(),
        MOMENTUM, EPS,
    )
    stats = {"running_mean": params.running_mean, "running_var": params.running_var}
    fusion = inputs.point.fusion
    leaves = (inputs.x_leaf, inputs.weight, inputs.bias)
    if inputs.residual_leaf is not None:
        leaves += (inputs.residual_leaf,)
    names = GRADS[: len(leaves)]
    grad_out = inputs.grad_out
    if mode == "forward-eval":
        forward = bind(params, False, fusion)
        x, residual = inputs.x, inputs.residual

        def eval_step() -> dict[str, Tensor]:
            with torch.no_grad():
                return {"y_eval": forward(x, residual)}

        return eval_step
    forward = bind(params, True, fusion)
    x, residual = inputs.x_leaf, inputs.residual_leaf
    if mode == "forward-train":
        return lambda: {"y_train": forward(x, residual), **stats}
    if mode == "backward":
        y = forward(x, residual)
        return lambda: dict(
            zip(names, torch.autograd.grad(y, leaves, grad_out, retain_graph=True), strict=True)
        )
    if mode == "forward-backward":

        def forward_backward_step() -> dict[str, Tensor]:
            y = forward(x, residual)
            grads = torch.autograd.grad(y, leaves, grad_out)
            return {"y_train": y, **stats, **dict(zip(names, grads, strict=True))}

        return forward_backward_step
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
