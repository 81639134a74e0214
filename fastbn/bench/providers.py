"""The BatchNorm implementations the benchmark compares, behind one small interface.

- ``fastbn``:  ``fastbn.batch_norm`` (the caller runs it under ``fastbn.use_backend("auto")``:
  the Triton kernels on CUDA, the PyTorch path on CPU);
- ``torch``:   ``torch.nn.functional.batch_norm`` in eager mode (cuDNN or torch's native
  kernels on CUDA, torch's CPU kernels on CPU);
- ``compile``: ``torch.compile(torch.nn.functional.batch_norm)`` (Inductor), static shapes,
  compiled afresh for each point;
- ``apex``:    ``apex.parallel.SyncBatchNorm`` in a single process, when apex is installed
  with its fused CUDA extension (``syncbn``).
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
from fastbn.bench.problem import memory_format

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


class Provider:
    """A BatchNorm implementation: ``bind`` fixes a layer's state and mode, giving x -> y."""

    name: str

    def start_point(self) -> None:
        """Called before the first call on a new point (shape, dtype, layout)."""

    def bind(self, params: Params, training: bool) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError


class FunctionalProvider(Provider):
    """A function with torch.nn.functional.batch_norm's positional signature."""

    def __init__(self, name: str, function: Callable[..., Tensor]) -> None:
        self.name = name
        self.function = function

    def bind(self, params: Params, training: bool) -> Callable[[Tensor], Tensor]:
        function, p = self.function, params
        return lambda x: function(
            x, p.running_mean, p.running_var, p.weight, p.bias, training, p.momentum, p.eps
        )


class CompiledProvider(FunctionalProvider):
    """torch.compile of F.batch_norm with static shapes, recompiled for each point.

    Resetting dynamo per point keeps every point's graphs compiled for its own shape
    (no automatic dynamic shapes) and the recompile limit out of reach.
    """

    def __init__(self) -> None:
        super().__init__("compile", F.batch_norm)

    def start_point(self) -> None:
        torch._dynamo.reset()
        self.function = torch.compile(F.batch_norm, dynamic=False)


class ApexProvider(Provider):
    """apex.parallel.SyncBatchNorm (fused syncbn kernels) without torch.distributed: one GPU.

    apex reads channels-last input as (N, *spatial, C) with ``channel_last=True``, so a
    channels_last tensor goes in as its (copy-free) permuted view and comes back the same
    way. apex's own eval path for NCHW input is torch's F.batch_norm.
    """

    name = "apex"

    def __init__(self, module_class: type[torch.nn.Module]) -> None:
        self.module_class = module_class

    def bind(self, params: Params, training: bool) -> Callable[[Tensor], Tensor]:
        module = self.module_class(params.weight.numel(), eps=params.eps, momentum=params.momentum)
        module.weight = params.weight
        module.bias = params.bias
        module.running_mean = params.running_mean
        module.running_var = params.running_var
        module.num_batches_tracked = module.num_batches_tracked.to(params.weight.device)
        module.train(training)

        def forward(x: Tensor) -> Tensor:
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
    return SyncBatchNorm, "apex: apex.parallel.SyncBatchNorm (fused syncbn kernels), one GPU"


def make_providers(
    names: tuple[str, ...], device: torch.device
) -> tuple[list[Provider], list[str]]:
    """The providers among ``names`` that can run on ``device``, and a note for each that cannot."""
    providers: list[Provider] = []
    notes: list[str] = []
    for name in names:
        if name == "fastbn":
            providers.append(FunctionalProvider("fastbn", fastbn.batch_norm))
        elif name == "torch":
            providers.append(FunctionalProvider("torch", F.batch_norm))
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
