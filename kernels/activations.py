"""Activation forward and derivative as Triton jit helpers, selected by a constexpr code.

The codes are ``fastbn.conventions.ACTIVATION_CODES`` (tests/test_conventions.py checks).
NaN passes through like torch's own functions; the derivatives follow torch's conventions
at the kinks (relu'(0) = 0, relu6'(0) = relu6'(6) = 0, leaky_relu'(0) = negative_slope,
hardswish'(+-3) as torch).
The relu family's derivative takes two values, so one bit per element records it
(derivative_is_one); the bits are packed 8 per byte (see forward.store_act_bits).
"""

import triton
import triton.language as tl

NONE = tl.constexpr(0)
RELU = tl.constexpr(1)
RELU6 = tl.constexpr(2)
LEAKY_RELU = tl.constexpr(3)
SILU = tl.constexpr(4)
HARDSWISH = tl.constexpr(5)


@triton.jit
def activation_forward(u, ACTIVATION: tl.constexpr, negative_slope):
    """act(u), elementwise."""
    out = u
    if ACTIVATION == RELU:
        out = tl.where(u < 0, 0.0, u)
    if ACTIVATION == RELU6:
        out = tl.where(u < 0, 0.0, tl.where(u > 6.0, 6.0, u))
    if ACTIVATION == LEAKY_RELU:
        out = tl.where(u > 0, u, u * tl.full([], negative_slope, u.dtype))
    if ACTIVATION == SILU:
        out = u * tl.sigmoid(u)
    if ACTIVATION == HARDSWISH:
        out = u * tl.where(u < -3.0, 0.0, tl.where(u > 3.0, 6.0, u + 3.0)) / 6.0
    return out


@triton.jit
def derivative_is_one(u, ACTIVATION: tl.constexpr):
    """Where relu / relu6 / leaky_relu have derivative 1 at u (else 0, or negative_slope)."""
    if ACTIVATION == RELU6:
        return (u > 0) & (u < 6.0)
    return u > 0


@triton.jit
def derivative_from_bits(bits, ACTIVATION: tl.constexpr, negative_slope, dtype: tl.constexpr):
    """The relu / relu6 / leaky_relu derivative from its derivative_is_one bits."""
    otherwise = tl.full([], 0.0, dtype)
    if ACTIVATION == LEAKY_RELU:
        otherwise = tl.full([], negative_slope, dtype)
    return tl.where(bits, tl.full([], 1.0, dtype), otherwise)


@triton.jit
def activation_derivative(u, ACTIVATION: tl.constexpr, negative_slope):
    """d act / du at u, elementwise (1 for NONE)."""
    out = tl.full(u.shape, 1.0, u.dtype)
    if ACTIVATION == RELU or ACTIVATION == RELU6 or ACTIVATION == LEAKY_RELU:
        out = derivative_from_bits(derivative_is_one(u, ACTIVATION), ACTIVATION,
                                   negative_slope, u.dtype)
    if ACTIVATION == SILU:
        sig = tl.sigmoid(u)
        out = sig * (1.0 + u * (1.0 - sig))
    if ACTIVATION == HARDSWISH:
        # NaN falls through to the middle branch, as in the definition u * relu6(u + 3) / 6.
        out = tl.where(u < -3.0, 0.0, tl.where(u > 3.0, 1.0, u / 3.0 + 0.5))
    return out.to(u.dtype)
