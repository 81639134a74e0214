"""BatchNorm backward kernels: per-channel gradient sums, then the input gradient.

The gradients of ``fastbn.reference.normalize_backward``, whose docstring states the
formulas: from g = grad_out * act'(u) and x_hat = (x - mean) * invstd, the per-channel sums
sum(g) and sum(g * x_hat) (which are d bias and d weight), then d input and d residual.

Two launches in general:

1. ``partial_grad_sums_kernel``, 1-D grid of chunks x channel blocks: sum(g) and
   sum(g * x_hat) over a chunk of tiles. With one chunk (not CHUNKED) a program writes the
   final sums and d weight, d bias itself; otherwise it writes its partial sums to a
   workspace and takes a ticket (an integer atomic), and the block's last program adds all
   the chunks, MERGE_CHUNKS at a time by a tree whose shape depends only on the
   constexprs, the groups in chunk order: deterministic whichever program finishes last.
2. ``grad_input_kernel``, one tile (or, FLAT, one flat slice of contiguous tensors) per
   program: d input and d residual.

One launch where a channel block's whole [N, S] slice fits one program's registers:
``slice_backward_kernel`` loads the slice once (tiling.slice_tile), sums it, and writes
every gradient from the values it holds: no workspace, no ticket.

act'(u) comes from the activation bits the forward stored (USE_ACT_BITS: one bit per
element, packed 8 per byte), or from u recomputed from x (and the residual).
Math runs in COMPUTE_DTYPE; x - mean is taken as (x - hi) - lo (see forward.channel_constants).
With VECTOR (contiguous tensors whose rows carry no 16-byte alignment) the sums and the
one-launch kernel read each row through an aligned window (tiling.row_windows).
"""

import triton
import triton.language as tl

from .activations import NONE, activation_derivative, derivative_from_bits
from .forward import channel_constants, pre_activation, ticket
from .tiling import (
    channel_block,
    flat_tile,
    known_row,
    load_values,
    load_window,
    load_x_and_residual,
    program_item,
    program_tile,
    row_windows,
    slice_tile,
    store_rows,
    tile_offsets,
    tile_start,
)


@triton.jit
def output_grad(
    x, g, residual, bits, mask, hi, lo, invstd, scale, shift, negative_slope,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, USE_ACT_BITS: tl.constexpr,
):
    """g = grad_out * act'(u) and x_hat from loaded values (0 where masked), in x's dtype;
    hi, lo, invstd, scale and shift broadcast to x's shape.

    act'(u) comes from the activation bits (USE_ACT_BITS), or from u recomputed from x (and
    the residual) exactly as the forward computed it.
    """
    if USE_ACT_BITS:
        g = g * derivative_from_bits(bits, ACTIVATION, negative_slope, x.dtype)
    elif ACTIVATION != NONE:
        u = pre_activation(x, hi, scale, shift, residual, HAS_RESIDUAL)
        g = tl.where(mask, g * activation_derivative(u, ACTIVATION, negative_slope), 0.0)
    x_hat = tl.where(mask, (x - hi) * invstd - lo * invstd, 0.0)
    return g, x_hat


@triton.jit
def act_bits_at(act_bits_ptr, row_offsets, s, mask):
    """The activation bits of positions s of rows starting at byte row_offsets."""
    byte = tl.load(act_bits_ptr + row_offsets + s // 8, mask=mask, other=0)
    return ((byte.to(tl.int32) >> (s % 8).to(tl.int32)) & 1) != 0


@triton.jit
def output_grad_tile(
    n, s, c, mask, hi, lo, invstd, scale, shift,
    grad_out_ptr, g_stride_n, g_stride_c, g_stride_s,
    x_ptr, x_stride_n, x_stride_c, x_stride_s,
    residual_ptr, r_stride_n, r_stride_c, r_stride_s,
    act_bits_ptr, act_bits_stride_n, act_bits_stride_c,
    negative_slope,
    COMPUTE_DTYPE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    USE_ACT_BITS: tl.constexpr,
):
    """g and x_hat (see output_grad) on one [BLOCK_C, positions] tile of positions s
    (n a scalar, or shaped [1, positions]), loaded through the views' strides."""
    x, residual = load_x_and_residual(
        x_ptr, residual_ptr, tile_offsets(n, s, c, x_stride_n, x_stride_c, x_stride_s),
        tile_offsets(n, s, c, r_stride_n, r_stride_c, r_stride_s), mask, HAS_RESIDUAL,
        COMPUTE_DTYPE,
    )
    g = load_values(grad_out_ptr, tile_offsets(n, s, c, g_stride_n, g_stride_c, g_stride_s),
                    mask, COMPUTE_DTYPE)
    bits = mask
    if USE_ACT_BITS:
        bits = act_bits_at(act_bits_ptr, n * act_bits_stride_n + c[:, None] * act_bits_stride_c,
                           s[None, :], mask)
    return output_grad(x, g, residual, bits, mask, hi[:, None], lo[:, None], invstd[:, None],
                       scale[:, None], shift[:, None], negative_slope, HAS_RESIDUAL,
                       ACTIVATION, USE_ACT_BITS)


@triton.jit
def output_grad_window(
    offsets, readable, mask, s, hi, lo, invstd, scale, shift,
    grad_out_ptr, x_ptr, residual_ptr, act_bits_ptr, act_bits_rows, negative_slope,
    COMPUTE_DTYPE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    USE_ACT_BITS: tl.constexpr,
):
    """g and x_hat (see output_grad) on rows read through windows (tiling.row_windows) of
    contiguous tensors, which share the offsets (readable, mask: see load_window);
    act_bits_rows: each row's first byte."""
    x = load_window(x_ptr, offsets, readable, mask, COMPUTE_DTYPE)
    residual = x
    if HAS_RESIDUAL:
        residual = load_window(residual_ptr, offsets, readable, mask, COMPUTE_DTYPE)
    g = load_window(grad_out_ptr, offsets, readable, mask, COMPUTE_DTYPE)
    bits = mask
    if USE_ACT_BITS:
        bits = act_bits_at(act_bits_ptr, act_bits_rows, tl.where(mask, s, 0), mask)
    return output_grad(x, g, residual, bits, mask, hi[:, None], lo[:, None], invstd[:, None],
                       scale[:, None], shift[:, None], negative_slope, HAS_RESIDUAL,
                       ACTIVATION, USE_ACT_BITS)


@triton.jit
def store_sums(c, c_mask, sum_g, sum_g_xhat, sums_ptr, C):
    """Write the final sums [2, C]."""
    tl.store(sums_ptr + c, sum_g, mask=c_mask)
    tl.store(sums_ptr + C + c, sum_g_xhat, mask=c_mask)


@triton.jit
def store_parameter_grads(c, c_mask, sum_g, sum_g_xhat, grad_weight_ptr, grad_bias_ptr,
                          WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr):
    """Write d weight (the sums of g * x_hat) and d bias (of g) in their own dtypes."""
    if WRITE_GRAD_WEIGHT:
        tl.store(grad_weight_ptr + c, sum_g_xhat.to(grad_weight_ptr.dtype.element_ty),
                 mask=c_mask)
    if WRITE_GRAD_BIAS:
        tl.store(grad_bias_ptr + c, sum_g.to(grad_bias_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def merge_partial_sums(partial_ptr, c, c_mask, C, num_chunks, BLOCK_C: tl.constexpr,
                       MERGE_CHUNKS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """All chunks' sum(g) and sum(g * x_hat) of one channel block: MERGE_CHUNKS at a time
    by a tree reduction, the groups in chunk order."""
    sum_g = tl.zeros([BLOCK_C], dtype=COMPUTE_DTYPE)
    sum_g_xhat = tl.zeros([BLOCK_C], dtype=COMPUTE_DTYPE)
    for k0 in range(0, num_chunks, MERGE_CHUNKS):
        k = k0 + tl.arange(0, MERGE_CHUNKS)
        mask = c_mask[:, None] & (k < num_chunks)[None, :]
        offsets = k[None, :] * C + c[:, None]
        # .cg: read from L2, where the other programs' stores are, not a stale L1 line.
        sum_g += tl.sum(tl.load(partial_ptr + offsets, mask=mask, other=0,
                                cache_modifier=".cg"), axis=1)
        sum_g_xhat += tl.sum(tl.load(partial_ptr + num_chunks * C + offsets, mask=mask,
                                     other=0, cache_modifier=".cg"), axis=1)
    return sum_g, sum_g_xhat


@triton.jit
def partial_grad_sums_kernel(
    grad_out_ptr, x_ptr,  # [N, C, S] views
    residual_ptr,  # [N, C, S] view (None unless HAS_RESIDUAL)
    mean_ptr, var_ptr,  # [C] statistics the forward normalized with
    weight_ptr, bias_ptr,  # [C] (None unless HAS_WEIGHT / HAS_BIAS)
    act_bits_ptr,  # [N, C, cdiv(S, 8)] uint8 activation bits (None unless USE_ACT_BITS)
    partial_ptr,  # [2, num_chunks, C] COMPUTE_DTYPE workspace: per chunk sum(g), sum(g x_hat)
    counters_ptr,  # [channel blocks] int32 tickets, 0 between calls (CHUNKED)
    sums_ptr,  # [2, C] final sum(g), sum(g * x_hat), written
    grad_weight_ptr, grad_bias_ptr,  # [C] written (None unless WRITE_GRAD_*)
    C, S,
    numel,  # N * C * S (VECTOR)
    g_stride_n, g_stride_c, g_stride_s,  # element strides of the [N, C, S] views
    x_stride_n, x_stride_c, x_stride_s,
    r_stride_n, r_stride_c, r_stride_s,
    act_bits_stride_n, act_bits_stride_c,  # C * cdiv(S, 8) and cdiv(S, 8)
    tiles_per_n, num_tiles, tiles_per_chunk,  # as in forward.partial_stats_kernel
    num_chunks,  # programs per channel block
    eps: tl.float64, negative_slope: tl.float64,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, USE_ACT_BITS: tl.constexpr,
    CHUNKED: tl.constexpr,  # more than one chunk: workspace, tickets, merge
    MERGE_CHUNKS: tl.constexpr,  # partial sums added by one tree step
    WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr,
    ROW: tl.constexpr,  # > 0: every tensor's rows are ROW contiguous elements
    VECTOR: tl.constexpr,  # > 0: contiguous tensors, rows read through windows (one tile each)
    USE_INT64: tl.constexpr,
):
    """sum(g) and sum(g * x_hat) over one chunk of tiles for one channel block; the final
    sums and parameter gradients from the block's last program."""
    S = known_row(S, ROW)
    g_stride_c = known_row(g_stride_c, ROW)
    x_stride_c = known_row(x_stride_c, ROW)
    r_stride_c = known_row(r_stride_c, ROW)
    block, chunk = program_item(num_chunks)
    c = channel_block(block, BLOCK_C, USE_INT64)
    c_mask = c < C
    hi, lo, invstd, scale, shift = channel_constants(
        c, c_mask, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, COMPUTE_DTYPE, HAS_WEIGHT,
        HAS_BIAS,
    )
    sum_g = tl.zeros([BLOCK_C, BLOCK_S], dtype=COMPUTE_DTYPE)
    sum_g_xhat = tl.zeros([BLOCK_C, BLOCK_S], dtype=COMPUTE_DTYPE)
    tile_begin = chunk * tiles_per_chunk
    tile_end = tl.minimum(tile_begin + tiles_per_chunk, num_tiles)
    for t in range(tile_begin, tile_end):
        n, s0 = tile_start(t, tiles_per_n, BLOCK_S, USE_INT64)
        if VECTOR > 0:  # tile t is sample n's rows
            offsets, s, in_row, readable, _, _ = row_windows(
                n * x_stride_n + c[:, None] * x_stride_c, tl.arange(0, BLOCK_S)[None, :], S,
                numel, BLOCK_S, VECTOR)
            g, x_hat = output_grad_window(
                offsets, c_mask[:, None] & readable, c_mask[:, None] & in_row, s, hi, lo,
                invstd, scale, shift,
                grad_out_ptr, x_ptr, residual_ptr, act_bits_ptr,
                n * act_bits_stride_n + c[:, None] * act_bits_stride_c, negative_slope,
                COMPUTE_DTYPE, HAS_RESIDUAL, ACTIVATION, USE_ACT_BITS,
            )
        else:
            s = s0 + tl.arange(0, BLOCK_S)
            mask = c_mask[:, None] & (s < S)[None, :]
            g, x_hat = output_grad_tile(
                n, s, c, mask, hi, lo, invstd, scale, shift, grad_out_ptr, g_stride_n,
                g_stride_c, g_stride_s, x_ptr, x_stride_n, x_stride_c, x_stride_s,
                residual_ptr, r_stride_n, r_stride_c, r_stride_s, act_bits_ptr,
                act_bits_stride_n, act_bits_stride_c, negative_slope, COMPUTE_DTYPE,
                HAS_RESIDUAL, ACTIVATION, USE_ACT_BITS,
            )
        sum_g += g
        sum_g_xhat += g * x_hat
    chunk_sum_g = tl.sum(sum_g, axis=1)
    chunk_sum_g_xhat = tl.sum(sum_g_xhat, axis=1)
    if CHUNKED:
        tl.store(partial_ptr + chunk * C + c, chunk_sum_g, mask=c_mask)
        tl.store(partial_ptr + (num_chunks + chunk) * C + c, chunk_sum_g_xhat, mask=c_mask)
        if ticket(counters_ptr + block) == num_chunks - 1:
            total_g, total_g_xhat = merge_partial_sums(
                partial_ptr, c, c_mask, C, num_chunks, BLOCK_C, MERGE_CHUNKS, COMPUTE_DTYPE)
            tl.store(counters_ptr + block, 0)
            store_sums(c, c_mask, total_g, total_g_xhat, sums_ptr, C)
            store_parameter_grads(c, c_mask, total_g, total_g_xhat, grad_weight_ptr,
                                  grad_bias_ptr, WRITE_GRAD_WEIGHT, WRITE_GRAD_BIAS)
    else:
        store_sums(c, c_mask, chunk_sum_g, chunk_sum_g_xhat, sums_ptr, C)
        store_parameter_grads(c, c_mask, chunk_sum_g, chunk_sum_g_xhat, grad_weight_ptr,
                              grad_bias_ptr, WRITE_GRAD_WEIGHT, WRITE_GRAD_BIAS)


@triton.jit
def store_input_grads(g, x_hat, scale, mean_g, mean_g_xhat, mask, whole, grad_input_ptr,
                      gi_offsets, grad_residual_ptr, gr_offsets, BATCH_STATS: tl.constexpr,
                      WRITE_GRAD_INPUT: tl.constexpr, WRITE_GRAD_RESIDUAL: tl.constexpr,
                      VECTOR: tl.constexpr):
    """Write d input (from the means sum(g) / M and sum(g * x_hat) / M with BATCH_STATS)
    and d residual = g; scale and the means broadcast to g's shape (tiling.store_rows:
    whole, VECTOR)."""
    if WRITE_GRAD_INPUT:
        centered = g
        if BATCH_STATS:
            centered = g - mean_g - x_hat * mean_g_xhat
        store_rows(grad_input_ptr, gi_offsets, centered * scale, mask, whole, VECTOR)
    if WRITE_GRAD_RESIDUAL:
        store_rows(grad_residual_ptr, gr_offsets, g, mask, whole, VECTOR)


@triton.jit
def grad_input_kernel(
    grad_out_ptr, x_ptr,  # [N, C, S] views read
    residual_ptr,  # [N, C, S] view read (None unless HAS_RESIDUAL)
    grad_input_ptr, grad_residual_ptr,  # [N, C, S] views written (None unless WRITE_GRAD_*)
    mean_ptr, var_ptr,  # [C] statistics the forward normalized with
    weight_ptr, bias_ptr,  # [C] (None unless HAS_WEIGHT / HAS_BIAS)
    act_bits_ptr,  # [N, C, cdiv(S, 8)] uint8 activation bits (None unless USE_ACT_BITS)
    sums_ptr,  # [2, C] sum(g), sum(g * x_hat) (None unless BATCH_STATS)
    C, S,
    numel,  # N * C * S (FLAT)
    g_stride_n, g_stride_c, g_stride_s,  # element strides of the views (not FLAT)
    x_stride_n, x_stride_c, x_stride_s,
    r_stride_n, r_stride_c, r_stride_s,
    gi_stride_n, gi_stride_c, gi_stride_s,
    gr_stride_n, gr_stride_c, gr_stride_s,
    act_bits_stride_n, act_bits_stride_c,  # C * cdiv(S, 8) and cdiv(S, 8)
    tiles_per_n, num_tiles,  # cdiv(S, BLOCK_S); tiles per channel block
    eps: tl.float64, negative_slope: tl.float64, inv_count: tl.float64,  # 1 / M
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,  # tile; FLAT: BLOCK_S elements, BLOCK_C 1
    COMPUTE_DTYPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, USE_ACT_BITS: tl.constexpr, BATCH_STATS: tl.constexpr,
    WRITE_GRAD_INPUT: tl.constexpr, WRITE_GRAD_RESIDUAL: tl.constexpr,
    FLAT: tl.constexpr,  # every tensor contiguous: walk the flat range
    ROW: tl.constexpr,  # > 0: every tensor's rows are ROW contiguous elements (not FLAT)
    USE_INT64: tl.constexpr,
):
    """d input and d residual on one tile."""
    if FLAT:
        offsets, mask, c, row, s = flat_tile(numel, C, S, BLOCK_S, USE_INT64)
        c_mask = mask
        hi, lo, invstd, scale, shift = channel_constants(
            c, mask, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, COMPUTE_DTYPE, HAS_WEIGHT,
            HAS_BIAS,
        )
        x, residual = load_x_and_residual(x_ptr, residual_ptr, offsets, offsets, mask,
                                          HAS_RESIDUAL, COMPUTE_DTYPE)
        g = load_values(grad_out_ptr, offsets, mask, COMPUTE_DTYPE)
        bits = mask
        if USE_ACT_BITS:  # the bits are [N * C, cdiv(S, 8)]: row, then byte s // 8, bit s % 8
            bits = act_bits_at(act_bits_ptr, row * act_bits_stride_c, s, mask)
        g, x_hat = output_grad(x, g, residual, bits, mask, hi, lo, invstd, scale, shift,
                               negative_slope, HAS_RESIDUAL, ACTIVATION, USE_ACT_BITS)
        gi_offsets = offsets
        gr_offsets = offsets
    else:
        g_stride_c = known_row(g_stride_c, ROW)
        x_stride_c = known_row(x_stride_c, ROW)
        r_stride_c = known_row(r_stride_c, ROW)
        gi_stride_c = known_row(gi_stride_c, ROW)
        gr_stride_c = known_row(gr_stride_c, ROW)
        n, s0, s, c, c_mask, mask = program_tile(C, known_row(S, ROW), tiles_per_n, num_tiles,
                                                 BLOCK_S, BLOCK_C, USE_INT64)
        hi, lo, invstd, scale, shift = channel_constants(
            c, c_mask, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, COMPUTE_DTYPE,
            HAS_WEIGHT, HAS_BIAS,
        )
        g, x_hat = output_grad_tile(
            n, s, c, mask, hi, lo, invstd, scale, shift,
            grad_out_ptr, g_stride_n, g_stride_c, g_stride_s,
            x_ptr, x_stride_n, x_stride_c, x_stride_s,
            residual_ptr, r_stride_n, r_stride_c, r_stride_s,
            act_bits_ptr, act_bits_stride_n, act_bits_stride_c,
            negative_slope, COMPUTE_DTYPE, HAS_RESIDUAL, ACTIVATION, USE_ACT_BITS,
        )
        scale = scale[:, None]
        gi_offsets = tile_offsets(n, s, c, gi_stride_n, gi_stride_c, gi_stride_s)
        gr_offsets = tile_offsets(n, s, c, gr_stride_n, gr_stride_c, gr_stride_s)
    mean_g = g
    mean_g_xhat = g
    if BATCH_STATS:
        inv_count = tl.full([], inv_count, COMPUTE_DTYPE)
        mean_g = tl.load(sums_ptr + c, mask=c_mask, other=0) * inv_count
        mean_g_xhat = tl.load(sums_ptr + C + c, mask=c_mask, other=0) * inv_count
        if not FLAT:
            mean_g = mean_g[:, None]
            mean_g_xhat = mean_g_xhat[:, None]
    store_input_grads(g, x_hat, scale, mean_g, mean_g_xhat, mask, mask, grad_input_ptr,
                      gi_offsets, grad_residual_ptr, gr_offsets, BATCH_STATS, WRITE_GRAD_INPUT,
                      WRITE_GRAD_RESIDUAL, 0)


@triton.jit
def slice_backward_kernel(
    grad_out_ptr, x_ptr, residual_ptr,  # [N, C, S] views read (residual: HAS_RESIDUAL)
    mean_ptr, var_ptr, weight_ptr, bias_ptr,  # [C] statistics; weight, bias (HAS_*)
    act_bits_ptr,  # [N, C, cdiv(S, 8)] uint8 activation bits (None unless USE_ACT_BITS)
    grad_input_ptr, grad_residual_ptr,  # [N, C, S] views written (None unless WRITE_GRAD_*)
    grad_weight_ptr, grad_bias_ptr,  # [C] (None unless WRITE_GRAD_*): written
    C, S, batch,  # the view's channels, positions per sample and samples
    numel,  # batch * C * S (VECTOR)
    g_stride_n, g_stride_c, g_stride_s, x_stride_n, x_stride_c, x_stride_s,  # views' strides
    r_stride_n, r_stride_c, r_stride_s,
    gi_stride_n, gi_stride_c, gi_stride_s, gr_stride_n, gr_stride_c, gr_stride_s,
    act_bits_stride_n, act_bits_stride_c,  # C * cdiv(S, 8) and cdiv(S, 8)
    eps: tl.float64, negative_slope: tl.float64, inv_count: tl.float64,  # 1 / M
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,  # the slice's tile
    COMPUTE_DTYPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, USE_ACT_BITS: tl.constexpr, BATCH_STATS: tl.constexpr,
    WRITE_GRAD_INPUT: tl.constexpr, WRITE_GRAD_RESIDUAL: tl.constexpr,
    WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr,
    ROW: tl.constexpr,  # > 0: every tensor's rows are ROW contiguous elements
    VECTOR: tl.constexpr,  # > 0: contiguous tensors, rows read through windows
    USE_INT64: tl.constexpr,
):
    """The whole backward of one channel block, its [N, S] slice held as one tile: the
    sums (kept in registers: nothing reads them afterwards), d weight and d bias, then d
    input and d residual from the same registers."""
    S = known_row(S, ROW)
    g_stride_c = known_row(g_stride_c, ROW)
    x_stride_c = known_row(x_stride_c, ROW)
    r_stride_c = known_row(r_stride_c, ROW)
    gi_stride_c = known_row(gi_stride_c, ROW)
    gr_stride_c = known_row(gr_stride_c, ROW)
    n, s, c, c_mask, mask = slice_tile(C, S, batch, BLOCK_N, BLOCK_S, BLOCK_C, USE_INT64)
    hi, lo, invstd, scale, shift = channel_constants(
        c, c_mask, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, COMPUTE_DTYPE, HAS_WEIGHT,
        HAS_BIAS,
    )
    whole = mask
    gi_offsets = tile_offsets(n, s, c, gi_stride_n, gi_stride_c, gi_stride_s)
    gr_offsets = tile_offsets(n, s, c, gr_stride_n, gr_stride_c, gr_stride_s)
    if VECTOR > 0:  # the whole slice, held until d input is written
        row_mask = c_mask[:, None] & (n < batch)
        offsets, s, in_row, readable, whole, _ = row_windows(
            n * x_stride_n + c[:, None] * x_stride_c, tl.arange(0, BLOCK_N * BLOCK_S)[None, :],
            S, numel, BLOCK_S, VECTOR)
        mask = row_mask & in_row
        whole = row_mask & whole
        g, x_hat = output_grad_window(
            offsets, row_mask & readable, mask, s, hi, lo, invstd, scale, shift, grad_out_ptr,
            x_ptr, residual_ptr, act_bits_ptr,
            n * act_bits_stride_n + c[:, None] * act_bits_stride_c, negative_slope,
            COMPUTE_DTYPE, HAS_RESIDUAL, ACTIVATION, USE_ACT_BITS,
        )
        gi_offsets = offsets
        gr_offsets = offsets
    else:
        g, x_hat = output_grad_tile(  # the whole slice, held until d input is written
            n, s, c, mask, hi, lo, invstd, scale, shift, grad_out_ptr, g_stride_n, g_stride_c,
            g_stride_s, x_ptr, x_stride_n, x_stride_c, x_stride_s, residual_ptr, r_stride_n,
            r_stride_c, r_stride_s, act_bits_ptr, act_bits_stride_n, act_bits_stride_c,
            negative_slope, COMPUTE_DTYPE, HAS_RESIDUAL, ACTIVATION, USE_ACT_BITS,
        )
    sum_g = tl.sum(g, axis=1)
    sum_g_xhat = tl.sum(g * x_hat, axis=1)
    store_parameter_grads(c, c_mask, sum_g, sum_g_xhat, grad_weight_ptr, grad_bias_ptr,
                          WRITE_GRAD_WEIGHT, WRITE_GRAD_BIAS)
    inv_count = tl.full([], inv_count, COMPUTE_DTYPE)
    store_input_grads(g, x_hat, scale[:, None], (sum_g * inv_count)[:, None],
                      (sum_g_xhat * inv_count)[:, None], mask, whole, grad_input_ptr,
                      gi_offsets, grad_residual_ptr, gr_offsets, BATCH_STATS, WRITE_GRAD_INPUT,
                      WRITE_GRAD_RESIDUAL, VECTOR)
