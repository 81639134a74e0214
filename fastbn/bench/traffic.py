"""The bytes model: how much memory traffic a BatchNorm call cannot avoid."""

from __future__ import annotations

# Tensor passes of x's size per fusion and mode. Forward reads x (and z for add_relu) and
# writes y; backward reads x and dy and writes dx (and dz for add_relu); forward+backward is
# both. A ReLU adds no pass: it is applied on the way out, its derivative on the way in.
PASSES_PER_ELEMENT = {
    "none": {"forward-train": 2, "forward-eval": 2, "backward": 3, "forward-backward": 5},
    "relu": {"forward-train": 2, "forward-eval": 2, "backward": 3, "forward-backward": 5},
    "add_relu": {"forward-train": 3, "forward-eval": 3, "backward": 4, "forward-backward": 7},
}


def compulsory_bytes(mode: str, fusion: str, numel: int, element_size: int) -> int:
    """Bytes a ``mode`` call with ``fusion`` on an input of ``numel`` elements must move to or
    from memory.

    Per element of x, with s = element_size: plain BatchNorm and BN+ReLU (``none``,
    ``relu``) forward-train and forward-eval 2s (read x, write y), backward 3s (read x and dy,
    write dx), forward-backward 5s; BN+add+ReLU (``add_relu``) forward 3s (z read too),
    backward 4s (dz written too), forward-backward 7s. The per-channel vectors (weight, bias,
    statistics) are O(C) and left out, and so is the bit per element that tells an add_relu
    backward where the output was positive (numel / 8 bytes: fastbn keeps it in the forward;
    without z, the sign is recomputed from x). It is a floor, not a target: when x does not
    fit on chip, a training forward reads x twice (statistics, then normalize) and a backward
    reads x and dy twice, so 100% of copy bandwidth is out of reach there.
    """
    return PASSES_PER_ELEMENT[fusion][mode] * numel * element_size
