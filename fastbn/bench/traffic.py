"""The bytes model: how much memory traffic a BatchNorm call cannot avoid."""

from __future__ import annotations

# Tensor passes of x's size per mode: forward reads x and writes y; backward reads x and dy
# and writes dx; forward+backward does both.
PASSES_PER_ELEMENT = {
    "forward-train": 2,
    "forward-eval": 2,
    "backward": 3,
    "forward-backward": 5,
}


def compulsory_bytes(mode: str, numel: int, element_size: int) -> int:
    """Bytes a ``mode`` call on an input of ``numel`` elements must move to or from memory.

    Per element of x, with s = element_size: forward-train 2s (read x, write y), forward-eval
    2s, backward 3s (read x and dy, write dx), forward-backward 5s. The per-channel vectors
    (weight, bias, statistics) are O(C) and left out. It is a floor, not a target: when x
    does not fit on chip, a training forward reads x twice (statistics, then normalize) and
    a backward reads x and dy twice, so 100% of copy bandwidth is out of reach there.
    """
    return PASSES_PER_ELEMENT[mode] * numel * element_size
