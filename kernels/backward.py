"""BatchNorm backward kernels: per-channel gradient sums, then the input gradient.

With u = (x - mean) * invstd * weight + bias + residual the forward's pre-activation,
g = grad_out * act'(u), x_hat = (x - mean) * invstd and sums over the M values of a channel:

    d weight = sum(g * x_hat)        d bias = sum(g)        d residual = g
    d input  = weight * invstd * g                                          (running stats)
    d input  = weight * invstd * (g - sum(g) / M - x_hat * sum(g * x_hat) / M)  (batch stats)

1. ``partial_grad_sums_kernel``, grid (chunks, channel blocks): sum(g) and sum(g * x_hat)
   over a chunk of tiles; with one chunk (FINALIZE) it writes the final sums itself.
2. ``finalize_grad_sums_kernel``, grid (channel blocks,): adds the chunks in chunk order
   (deterministic) and writes d weight and d bias.
3. ``grad_input_kernel``, one tile per program: d input and d residual.

Math runs in COMPUTE_DTYPE; x - mean is taken as (x - hi) - lo (see forward.channel_constants).
"""

import triton
import triton.language as tl

from .activations import NONE, activation_derivative, derivative_from_bits
from .forward import channel_constants, pre_activation
from .tiling import channel_block, program_tile, tile_offsets, tile_start


@triton.jit
def output_grad_tile(
    n, s, c, mask, hi, lo, invstd, scale, shift,
    grad_out_ptr, g_stride_n, g_stride_c, g_stride_s,
    x_ptr, x_stride_n, x_stride_c, x_stride_s,
    residual_ptr, r_stride_n, r_stride_c, r_stride_s,
    mask_ptr, mask_stride_n, mask_stride_c,
    negative_slope,
    COMPUTE_DTYPE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    USE_MASK: tl.constexpr,
):
    """g = grad_out * act'(u) and x_hat on one tile (0 where masked), in COMPUTE_DTYPE.

    act'(u) comes from the packed activation mask (USE_MASK), or from u recomputed from x
    (and the residual) exactly as the forward computed it.
    """
    x = tl.load(x_ptr + tile_offsets(n, s, c, x_stride_n, x_stride_c, x_stride_s), mask=mask,
                other=0).to(COMPUTE_DTYPE)
    g = tl.load(grad_out_ptr + tile_offsets(n, s, c, g_stride_n, g_stride_c, g_stride_s),
                mask=mask, other=0).to(COMPUTE_DTYPE)
    if USE_MASK:
        byte = tl.load(mask_ptr + n * mask_stride_n + c[:, None] * mask_stride_c
                       + (s // 8)[None, :], mask=mask, other=0)
        bits = ((byte.to(tl.int32) >> (s % 8).to(tl.int32)[None, :]) & 1) != 0
        g = g * derivative_from_bits(bits, ACTIVATION, negative_slope, COMPUTE_DTYPE)
    elif ACTIVATION != NONE:
        residual = x
        if HAS_RESIDUAL:
            residual = tl.load(
                residual_ptr + tile_offsets(n, s, c, r_stride_n, r_stride_c, r_stride_s),
                mask=mask, other=0,
            ).to(COMPUTE_DTYPE)
        u = pre_activation(x, hi, scale, shift, residual, HAS_RESIDUAL)
        g = tl.where(mask, g * activation_derivative(u, ACTIVATION, negative_slope), 0.0)
    x_hat = tl.where(mask, (x - hi[:, None]) * invstd[:, None] - (lo * invstd)[:, None], 0.0)
    return g, x_hat


@triton.jit
def store_parameter_grads(c, c_mask, sum_g, sum_g_xhat, sums_ptr, grad_weight_ptr,
                          grad_bias_ptr, C, WRITE_GRAD_WEIGHT: tl.constexpr,
                          WRITE_GRAD_BIAS: tl.constexpr):
    """Write the final sums [2, C] and d weight, d bias in their own dtypes."""
    tl.store(sums_ptr + c, sum_g, mask=c_mask)
    tl.store(sums_ptr + C + c, sum_g_xhat, mask=c_mask)
    if WRITE_GRAD_WEIGHT:
        tl.store(grad_weight_ptr + c, sum_g_xhat.to(grad_weight_ptr.dtype.element_ty),
                 mask=c_mask)
    if WRITE_GRAD_BIAS:
        tl.store(grad_bias_ptr + c, sum_g.to(grad_bias_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def partial_grad_sums_kernel(
    grad_out_ptr, x_ptr, residual_ptr,  # [N, C, S] views
    mean_ptr, var_ptr, weight_ptr, bias_ptr,  # [C]
    mask_ptr,  # [N, C, cdiv(S, 8)] uint8 activation mask (read when USE_MASK)
    partial_ptr,  # [2, num_chunks, C] COMPUTE_DTYPE workspace: per chunk sum(g), sum(g x_hat)
    sums_ptr,  # [2, C] final sum(g), sum(g * x_hat) (written when FINALIZE)
    grad_weight_ptr, grad_bias_ptr,  # [C] (written when FINALIZE and asked for)
    C, S,
    g_stride_n, g_stride_c, g_stride_s,
    x_stride_n, x_stride_c, x_stride_s,
    r_stride_n, r_stride_c, r_stride_s,
    mask_stride_n, mask_stride_c,
    tiles_per_n, num_tiles, tiles_per_chunk,
    eps: tl.float64, negative_slope: tl.float64,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, USE_MASK: tl.constexpr, FINALIZE: tl.constexpr,
    WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr, USE_INT64: tl.constexpr,
):
    """sum(g) and sum(g * x_hat) over one chunk of tiles for one channel block."""
    pid_chunk = tl.program_id(0)
    c = channel_block(tl.program_id(1), BLOCK_C, USE_INT64)
    c_mask = c < C
    hi, lo, invstd, scale, shift = channel_constants(
        c, c_mask, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, COMPUTE_DTYPE, HAS_WEIGHT,
        HAS_BIAS,
    )
    sum_g = tl.zeros([BLOCK_C, BLOCK_S], dtype=COMPUTE_DTYPE)
    sum_g_xhat = tl.zeros([BLOCK_C, BLOCK_S], dtype=COMPUTE_DTYPE)
    tile_begin = pid_chunk * tiles_per_chunk
    tile_end = tl.minimum(tile_begin + tiles_per_chunk, num_tiles)
    for t in range(tile_begin, tile_end):
        n, s0 = tile_start(t, tiles_per_n, BLOCK_S, USE_INT64)
        s = s0 + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (s < S)[None, :]
        g, x_hat = output_grad_tile(
            n, s, c, mask, hi, lo, invstd, scale, shift,
            grad_out_ptr, g_stride_n, g_stride_c, g_stride_s,
            x_ptr, x_stride_n, x_stride_c, x_stride_s,
            residual_ptr, r_stride_n, r_stride_c, r_stride_s,
            mask_ptr, mask_stride_n, mask_stride_c,
            negative_slope, COMPUTE_DTYPE, HAS_RESIDUAL, ACTIVATION, USE_MASK,
        )
        sum_g += g
        sum_g_xhat += g * x_hat
    chunk_sum_g = tl.sum(sum_g, axis=1)
    chunk_sum_g_xhat = tl.sum(sum_g_xhat, axis=1)
    if FINALIZE:
        store_parameter_grads(c, c_mask, chunk_sum_g, chunk_sum_g_xhat, sums_ptr,
                              grad_weight_ptr, grad_bias_ptr, C, WRITE_GRAD_WEIGHT,
                              WRITE_GRAD_BIAS)
    else:
        num_chunks = tl.num_programs(0)
        tl.store(partial_ptr + pid_chunk * C + c, chunk_sum_g, mask=c_mask)
        tl.store(partial_ptr + (num_chunks + pid_chunk) * C + c, chunk_sum_g_xhat, mask=c_mask)


@triton.jit
def finalize_grad_sums_kernel(
    partial_ptr,  # [2, num_chunks, C] from partial_grad_sums_kernel
    sums_ptr,  # [2, C] final sums, written
    grad_weight_ptr, grad_bias_ptr,  # [C] written when asked for
    C, num_chunks,
    BLOCK_C: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr, USE_INT64: tl.constexpr,
):
    """Add the chunks of one channel block in chunk order; write the sums and d weight/bias."""
    c = channel_block(tl.program_id(0), BLOCK_C, USE_INT64)
    c_mask = c < C
    sum_g = tl.zeros([BLOCK_C], dtype=COMPUTE_DTYPE)
    sum_g_xhat = tl.zeros([BLOCK_C], dtype=COMPUTE_DTYPE)
    for k in range(num_chunks):
        sum_g += tl.load(partial_ptr + k * C + c, mask=c_mask, other=0)
        sum_g_xhat += tl.load(partial_ptr + (num_chunks + k) * C + c, mask=c_mask, other=0)
    store_parameter_grads(c, c_mask, sum_g, sum_g_xhat, sums_ptr, grad_weight_ptr,
                          grad_bias_ptr, C, WRITE_GRAD_WEIGHT, WRITE_GRAD_BIAS)


@triton.jit
def grad_input_kernel(
    grad_out_ptr, x_ptr, residual_ptr,  # [N, C, S] views read
    grad_input_ptr, grad_residual_ptr,  # [N, C, S] views written (when asked for)
    mean_ptr, var_ptr, weight_ptr, bias_ptr,  # [C]
    mask_ptr,  # [N, C, cdiv(S, 8)] uint8 activation mask (read when USE_MASK)
    sums_ptr,  # [2, C] sum(g), sum(g * x_hat) (read when BATCH_STATS)
    C, S,
    g_stride_n, g_stride_c, g_stride_s,
    x_stride_n, x_stride_c, x_stride_s,
    r_stride_n, r_stride_c, r_stride_s,
    gi_stride_n, gi_stride_c, gi_stride_s,
    gr_stride_n, gr_stride_c, gr_stride_s,
    mask_stride_n, mask_stride_c,
    tiles_per_n,
    eps: tl.float64, negative_slope: tl.float64, inv_count: tl.float64,  # 1 / M
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, USE_MASK: tl.constexpr, BATCH_STATS: tl.constexpr,
    WRITE_GRAD_INPUT: tl.constexpr, WRITE_GRAD_RESIDUAL: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """d input and d residual on one tile."""
    n, s0, s, c, c_mask, mask = program_tile(C, S, tiles_per_n, BLOCK_S, BLOCK_C, USE_INT64)
    hi, lo, invstd, scale, shift = channel_constants(
        c, c_mask, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, COMPUTE_DTYPE, HAS_WEIGHT,
        HAS_BIAS,
    )
    g, x_hat = output_grad_tile(
        n, s, c, mask, hi, lo, invstd, scale, shift,
        grad_out_ptr, g_stride_n, g_stride_c, g_stride_s,
        x_ptr, x_stride_n, x_stride_c, x_stride_s,
        residual_ptr, r_stride_n, r_stride_c, r_stride_s,
        mask_ptr, mask_stride_n, mask_stride_c,
        negative_slope, COMPUTE_DTYPE, HAS_RESIDUAL, ACTIVATION, USE_MASK,
    )
    if WRITE_GRAD_INPUT:
        centered = g
        if BATCH_STATS:
            inv_count = tl.full([], inv_count, COMPUTE_DTYPE)
            mean_g = tl.load(sums_ptr + c, mask=c_mask, other=0) * inv_count
            mean_g_xhat = tl.load(sums_ptr + C + c, mask=c_mask, other=0) * inv_count
            centered = g - mean_g[:, None] - x_hat * mean_g_xhat[:, None]
        grad_input = centered * scale[:, None]
        tl.store(grad_input_ptr + tile_offsets(n, s, c, gi_stride_n, gi_stride_c, gi_stride_s),
                 grad_input.to(grad_input_ptr.dtype.element_ty), mask=mask)
    if WRITE_GRAD_RESIDUAL:
        tl.store(
            grad_residual_ptr + tile_offsets(n, s, c, gr_stride_n, gr_stride_c, gr_stride_s),
            g.to(grad_residual_ptr.dtype.element_ty), mask=mask,
        )
