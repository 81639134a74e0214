"""How every fastbn kernel walks a tensor: [N, C, S] views, 2-D tiles, element offsets.

A tensor (N, C, *spatial) is read as [N, C, S] through three strides (stride_n, stride_c,
stride_s). NCHW-like layouts have stride_s == 1; channels_last-like layouts have
stride_c == 1 and are usually folded by the launcher into [1, C, N * S]. Triton
specialises a stride equal to 1, so loads vectorise along whichever axis is contiguous.

A tile is BLOCK_C channels by BLOCK_S positions of S, at one n; per-channel reductions run
along axis 1. Tiles of one channel block are numbered t = n * tiles_per_n + (s // BLOCK_S).
"""

import triton
import triton.language as tl


@triton.jit
def tile_start(t, tiles_per_n, BLOCK_S: tl.constexpr, USE_INT64: tl.constexpr):
    """The batch index n and the first spatial position s0 of tile t."""
    n = t // tiles_per_n
    s0 = (t % tiles_per_n) * BLOCK_S
    if USE_INT64:
        n = n.to(tl.int64)
        s0 = s0.to(tl.int64)
    return n, s0


@triton.jit
def tile_offsets(n, s, c, stride_n, stride_c, stride_s):
    """Element offsets [BLOCK_C, BLOCK_S] of positions (n, c, s) in one tensor's view."""
    return n * stride_n + c[:, None] * stride_c + s[None, :] * stride_s


@triton.jit
def channel_block(pid, BLOCK_C: tl.constexpr, USE_INT64: tl.constexpr):
    """The BLOCK_C channel indices of channel block pid."""
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    if USE_INT64:
        c = c.to(tl.int64)
    return c


@triton.jit
def program_tile(C, S, tiles_per_n, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                 USE_INT64: tl.constexpr):
    """The tile of an elementwise program (tile on axis 0, channel block on axis 1): n, s0,
    its positions s, channels c, the channel mask and the [BLOCK_C, BLOCK_S] element mask."""
    n, s0 = tile_start(tl.program_id(0), tiles_per_n, BLOCK_S, USE_INT64)
    s = s0 + tl.arange(0, BLOCK_S)
    c = channel_block(tl.program_id(1), BLOCK_C, USE_INT64)
    c_mask = c < C
    return n, s0, s, c, c_mask, c_mask[:, None] & (s < S)[None, :]
