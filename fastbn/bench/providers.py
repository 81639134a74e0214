"""The BatchNorm implementations the benchmark compares, behind one small interface.

- ``fastbn``:  ``fastbn.batch_norm`` (the caller runs it under ``fastbn.use_backend("auto")``:
  the Triton kernels on CUDA, the PyTorch path on CPU); fused points are one call with
  ``residual=z, activation="relu"``;
- ``torch``:   ``torch.nn.functional.batch_norm`` in eager mode (cuDNN or torch's native
  kernels on CUDA, torch's CPU kernels on CPU); fused points are ``unfused_batch_norm``:
  F.batch_norm, then ``+ z``, then F.relu;
- ``compile``: ``torch.compile`` (Inductor) of F.batch_norm, or of ``unfused_batch_norm`` for
  fused points, static shapes, compiled afresh for each point;
- ``apex``:    ``apex.parallel.SyncBatchNorm`` in a single process, when apex is installed
  with its fused CUDA extension (``syncbn``); plain points only.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import fastbn
from fastbn.bench.problem import ACTIVATION, memory_format
from fastbn.bench.shapes import FUSIONS

PROVIDERS = ("fastbn", "torch", "compile", "apex")


@dataclass(frozen=True)
class Params:
    """What a BatchNorm layer holds: affine parameters, running statistics, hyper-parameters."""

    weight: torch.nn.Parameter
    bias: torch.nn.Parameter
    running_mean: Tensor
    running_var: Tensor
    momentum: float
    eps: float


# A bound layer's call: (x, the residual z or None) -> y.
Forward = Callable[[Tensor, Tensor | None], Tensor]
# A provider's bind: (layer state, training, fusion) -> Forward.
Bind = Callable[[Params, bool, str], Forward]


def unfused_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """fastbn.batch_norm's fused call as separate torch ops, the way eager PyTorch models
    write it: F.relu(F.batch_norm(...) + residual). Only the "relu" activation."""
    if activation not in (None, "relu"):
        raise ValueError(f"unfused_batch_norm: activation {activation!r} is not 'relu'")
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return y if activation is None else F.relu(y)


class Provider:
    """A BatchNorm implementation: ``bind`` fixes a layer's state, mode and fusion, giving
    (x, z) -> y. It runs only the points whose fusion is in ``fusions``."""

    name: str
    fusions: tuple[str, ...] = ("none",)

    def start_point(self) -> None:
        """Called before the first call on a new point (shape, dtype, layout, fusion)."""

    def bind(self, params: Params, training: bool, fusion: str) -> Forward:
        raise NotImplementedError


class FunctionalProvider(Provider):
    """``function`` with torch.nn.functional.batch_norm's positional signature for plain
    points and, when given, ``fused`` with fastbn.batch_norm's (the same, plus keywords
    ``residual`` and ``activation``) for the fusions."""

    def __init__(
        self, name: str, function: Callable[..., Tensor], fused: Callable[..., Tensor] | None = None
    ) -> None:
        self.name = name
        self.function = function
        self.fused = fused
        self.fusions = FUSIONS if fused is not None else ("none",)

    def bind(self, params: Params, training: bool, fusion: str) -> Forward:
        p = params
        if fusion == "none":
            function = self.function
            return lambda x, residual: function(
                x, p.running_mean, p.running_var, p.weight, p.bias, training, p.momentum, p.eps
            )
        fused, activation = self.fused, ACTIVATION[fusion]
        return lambda x, residual: fused(
            x, p.running_mean, p.running_var, p.weight, p.bias, training, p.momentum, p.eps,
            residual=residual, activation=activation,
        )


class CompiledProvider(FunctionalProvider):
    """torch.compile of F.batch_norm (unfused_batch_norm for fused points) with static
    shapes, recompiled for each point.

    Resetting dynamo per point keeps every point's graphs compiled for its own shape
    (no automatic dynamic shapes) and the recompile limit out of reach.
    """

    def __init__(self) -> None:
        super().__init__("compile", F.batch_norm, unfused_batch_norm)

    def start_point(self) -> None:
        torch._dynamo.reset()
        self.function = torch.compile(F.batch_norm, dynamic=False)
        self.fused = torch.compile(unfused_batch_norm, dynamic=False)


class ApexProvider(Provider):
    """apex.parallel.SyncBatchNorm (fused syncbn kernels) without torch.distributed: one GPU.

    apex reads channels-last input as (N, *spatial, C) with ``channel_last=True``, so a
    channels_last tensor goes in as its (copy-free) permuted view and comes back the same
    way. apex's own eval path for NCHW input is torch's F.batch_norm. Plain points only:
    apex's fused ReLU and residual (``fuse_relu``, ``z``) are channels-last only and not
    benchmarked.
    """

    name = "apex"

    def __init__(self, module_class: type[torch.nn.Module]) -> None:
        self.module_class = module_class

    def bind(self, params: Params, training: bool, fusion: str) -> Forward:
        if fusion != "none":
            raise ValueError(f"the apex provider runs plain BatchNorm only, not {fusion!r}")
        module = self.module_class(params.weight.numel(), eps=params.eps, momentum=params.momentum)
        module.weight = params.weight
        module.bias = params.bias
        module.running_mean = params.running_mean
        module.running_var = params.running_var
        module.num_batches_tracked = module.num_batches_tracked.to(params.weight.device)
        module.train(training)

        def forward(x: Tensor, residual: Tensor | None) -> Tensor:
            module.channel_last = is_channels_last(x)
            if not module.channel_last:
                return module(x)
            to_last = (0, *range(2, x.dim()), 1)
            to_first = (0, x.dim() - 1, *range(1, x.dim() - 1))
            return module(x.permute(to_last)).permute(to_first)

        return forward


def is_channels_last(x: Tensor) -> bool:
    """True for a 4-D or 5-D tensor stored channels-last (and not also plain contiguous)."""
    if x.dim() not in (4, 5) or x.is_contiguous():
        return False
    return x.is_contiguous(memory_format=memory_format("channels_last", x.dim()))


def find_apex() -> tuple[type[torch.nn.Module] | None, str]:
    """apex's fused SyncBatchNorm class (or None), and a note saying what was found."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # some apex versions print on import
            from apex.parallel import SyncBatchNorm
    except Exception as error:  # not installed, or built against another torch
        return None, f"apex: not importable ({type(error).__name__}: {error}); skipped"
    if "optimized" not in SyncBatchNorm.__module__:
        return None, (
            "apex: installed without its CUDA extension (syncbn), so its SyncBatchNorm is "
            "plain PyTorch; skipped"
        )
    return SyncBatchNorm, (
        "apex: apex.parallel.SyncBatchNorm (fused syncbn kernels), one GPU; plain BatchNorm "
        "only: no apex rows for relu / add_relu points"
    )


def make_providers(
    names: tuple[str, ...], device: torch.device
) -> tuple[list[Provider], list[str]]:
    """The providers among ``names`` that can run on ``device``, and a note for each that cannot."""
    providers: list[Provider] = []
    notes: list[str] = []
    for name in names:
        if name == "fastbn":
            providers.append(FunctionalProvider("fastbn", fastbn.batch_norm, fastbn.batch_norm))
        elif name == "torch":
            providers.append(FunctionalProvider("torch", F.batch_norm, unfused_batch_norm))
        elif name == "compile":
            providers.append(CompiledProvider())
        elif name == "apex" and device.type != "cuda":
            notes.append("apex: runs on CUDA only; skipped")
        elif name == "apex":
            module_class, note = find_apex()
            notes.append(note)
            if module_class is not None:
                providers.append(ApexProvider(module_class))
        else:
            raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")
    return providers, notes
