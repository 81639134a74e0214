"""The conventions both implementations share: one place for what the PyTorch code, the
Triton launchers, the ops and the modules must agree on.

- the activations by name and by the code the kernels select them with;
- the dtypes: batch statistics travel between the ops as STATS_DTYPE, elementwise math and
  sums run in compute_dtype;
- the counts: how many values a channel's statistics are taken over, and the unbiasing
  factor of the running variance;
- the layout of the packed activation bits that the forward saves for the backward;
- what every piece of normalize's backward reads (BackwardInputs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

ACTIVATIONS = ("none", "relu", "relu6", "leaky_relu", "silu", "hardswish")
"""Activation names as the ops take them ("none" for no activation)."""

ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
"""The constexpr code of each activation in kernels/activations.py (a test checks them)."""

SIGN_ACTIVATIONS = ("relu", "relu6", "leaky_relu")
"""Activations whose derivative takes two values: 1, or else 0 (negative_slope for
leaky_relu). One bit per element says which, so with a residual the forward saves the
packed bits (see mask_shape) instead of the residual."""

STATS_DTYPE = torch.float64
"""Batch statistics (mean, var) travel between the ops as float64 vectors of length C.

They are accumulated in the compute dtype, but the mean is assembled as anchor + small
offset, and float32 cannot hold it to that precision: with a mean of 1e4 its rounding alone
would move every output by ~3e-4 standard deviations.
"""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype elementwise math and sums run in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduced_count(x: Tensor) -> int:
    """M = N * prod(S): how many values each channel's statistics are taken over."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def unbiasing_factor(count: int) -> float:
    """M / (M - 1): biased to unbiased variance (1 for M = 1, which training rejects)."""
    return count / max(count - 1, 1)


def mask_positions(t: Tensor) -> Tensor:
    """The [rows, C, positions] view the activation bits are packed along: (N, C, S) with S
    the flattened spatial dimensions, or (1, C, N) for 2-D input."""
    if t.dim() == 2:
        return t.t().unsqueeze(0)
    return t.flatten(2)


def mask_shape(x: Tensor) -> tuple[int, int, int]:
    """Shape of the uint8 activation mask of x: 8 positions per byte, bit j of byte k being
    position 8k + j of mask_positions(x)."""
    rows, channels, positions = mask_positions(x).shape
    return rows, channels, -(-positions // 8)


class BackwardInputs(NamedTuple):
    """What every piece of normalize's backward reads (normalize_backward,
    normalize_grad_sums, normalize_grad_input in fastbn.reference, fastbn.cpu and
    fastbn.launch): the output's gradient, normalize's tensors and options."""

    grad_out: Tensor
    x: Tensor
    mean: Tensor  # the statistics normalize used, [C] STATS_DTYPE
    var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    residual: Tensor | None  # not needed (may be None) when activation_mask is given
    activation_mask: Tensor | None  # the forward's packed activation bits (see mask_shape)
    eps: float
    activation: str
    negative_slope: float
