"""Drop-in BatchNorm modules: subclasses of torch's, with fused residual and activation.

``fastbn.BatchNorm2d`` *is* a ``torch.nn.BatchNorm2d``: same constructor, parameters,
buffers and state_dict keys (loadable in both directions), same train/eval semantics and
errors. What it adds is keyword-only: ``activation`` / ``negative_slope`` fused into the
layer, and ``forward(input, residual=None)`` adding a residual before the activation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from fastbn.distributed import sync_batch_norm, sync_world_size
from fastbn.functional import batch_norm
from fastbn.reference import ACTIVATIONS


class _FastBatchNorm(_BatchNorm):
    """Shared constructor and forward of the fastbn modules."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        if activation is not None and activation not in ACTIVATIONS[1:]:
            raise ValueError(
                f"unknown activation {activation!r}; expected None or one of {ACTIVATIONS[1:]}"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if affine and not bias:  # torch < 2.12 has no bias= keyword; same result either way
            self.register_parameter("bias", None)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """activation(BatchNorm(input) + residual)."""
        self._check_input_dim(input)
        tracking = self.training and self.track_running_stats
        # Batch statistics in training, and in eval when no running statistics are kept.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        return batch_norm(
            input,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            residual=residual,
            activation=self.activation,
            negative_slope=self.negative_slope,
            num_batches_tracked=self.num_batches_tracked if tracking else None,
        )

    def extra_repr(self) -> str:
        # torch's own text, which names bias= from torch 2.12 on; before, it cannot show an
        # affine layer without bias, so that is said after it.
        text = super().extra_repr()
        if "bias=" not in text and self.affine and self.bias is None:
            text += ", bias=False"
        if self.activation is not None:
            text += f", activation={self.activation}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.negative_slope}"
        return text


class BatchNorm1d(_FastBatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on fastbn: (N, C) or (N, C, L) input."""


class BatchNorm2d(_FastBatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on fastbn: (N, C, H, W) input, NCHW or channels_last."""


class BatchNorm3d(_FastBatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on fastbn: (N, C, D, H, W) input, NCDHW or channels_last_3d."""


class BatchNorm(_FastBatchNorm):
    """BatchNorm for inputs of rank ``num_dims`` (2 to 5), checked on every call."""

    def __init__(self, num_features: int, num_dims: int, *args, **kwargs) -> None:
        if not isinstance(num_dims, int) or not 2 <= num_dims <= 5:
            raise ValueError(f"BatchNorm: num_dims must be an int from 2 to 5, got {num_dims!r}")
        super().__init__(num_features, *args, **kwargs)
        self.num_dims = num_dims

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != self.num_dims:
            raise ValueError(f"expected {self.num_dims}D input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_dims={self.num_dims}"


class SyncBatchNorm(_FastBatchNorm):
    """torch.nn.SyncBatchNorm on fastbn: training statistics over every rank of
    ``process_group`` (the default group when None); input of any rank from 2 to 5.

    Outside an initialised process group, with a group of one rank, and in eval it is a
    fastbn BatchNorm of its input's rank and communicates nothing (eval without running
    statistics normalizes with the local batch's, as torch's does). Training across ranks
    is ``fastbn.distributed.sync_batch_norm``: one all_gather forward, one all_reduce
    backward, and parameter gradients that are this rank's sums, like torch's (see there).

    torch.nn.SyncBatchNorm's constructor, state_dict and errors, but not its class: torch's
    DistributedDataParallel refuses CPU modules holding a torch.nn.SyncBatchNorm, and this
    one also trains on CPU tensors over gloo.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, activation=activation, negative_slope=negative_slope,
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module,
                               process_group: Any = None) -> torch.nn.Module:
        """torch.nn.SyncBatchNorm.convert_sync_batchnorm's contract: every BatchNorm layer of
        module (torch's or fastbn's) becomes a fastbn.SyncBatchNorm holding the same
        tensors; the same as ``fastbn.convert(module, fuse=False, sync=True, ...)``."""
        from fastbn.convert import convert

        return convert(module, fuse=False, sync=True, process_group=process_group)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """activation(SyncBatchNorm(input) + residual)."""
        self._check_input_dim(input)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        if not self.training or sync_world_size(self.process_group) == 1:
            return super().forward(input, residual)
        tracking = self.track_running_stats
        return sync_batch_norm(
            input,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.weight,
            self.bias,
            self.momentum,
            self.eps,
            self.process_group,
            residual=residual,
            activation=self.activation,
            negative_slope=self.negative_slope,
            num_batches_tracked=self.num_batches_tracked if tracking else None,
        )
