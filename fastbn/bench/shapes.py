"""What the benchmark runs on: points (shape, dtype, layout), named suites, shapes from the CLI.

The model suites are derived by walking the architecture, layer by layer, the way torchvision
builds it, so each shape can be traced to the BatchNorm layers that see it:

- ``resnet50``: torchvision's ``resnet50`` at 224x224 (53 BatchNorm2d layers, 12 distinct
  (C, H, W)), at batch 32 and 256;
- ``video``: torchvision's ``r3d_18`` on 16-frame 112x112 clips (20 BatchNorm3d layers, 4
  distinct (C, T, H, W)), at batch 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DTYPES = ("fp32", "fp16", "bf16")
LAYOUTS = ("nchw", "channels_last")

# torchvision resnet50: (Bottleneck blocks, width) of layer1..layer4; a block's output has
# 4 * width channels.
RESNET50_STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))
# torchvision r3d_18: the width of layer1..layer4, two BasicBlocks each.
R3D18_WIDTHS = (64, 128, 256, 512)


@dataclass(frozen=True)
class Point:
    """One benchmarked input: its shape, dtype name (DTYPES) and layout name (LAYOUTS).

    ``nchw`` is the contiguous (N, C, ...) order of any rank; ``channels_last`` is
    torch.channels_last for 4-D and torch.channels_last_3d for 5-D input.
    """

    shape: tuple[int, ...]
    dtype: str
    layout: str

    @property
    def label(self) -> str:
        return shape_label(self.shape)


def shape_label(shape: tuple[int, ...]) -> str:
    """A shape written as N x C x ..., e.g. '32x64x112x112'."""
    return "x".join(str(size) for size in shape)


@dataclass(frozen=True)
class Suite:
    """A named list of points; ``for_gpu`` suites are refused on a machine without CUDA."""

    name: str
    description: str
    points: tuple[Point, ...]
    for_gpu: bool


def layouts_for(shape: tuple[int, ...], layouts: tuple[str, ...]) -> tuple[str, ...]:
    """The layouts of ``layouts`` that exist for ``shape``.

    Only 4-D and 5-D tensors have a channels_last format; 2-D and 3-D input is benchmarked
    once, as "nchw" (an (N, C) row-major matrix already has its channels innermost).
    """
    return layouts if len(shape) in (4, 5) else ("nchw",)


def restyle(
    points: list[Point] | tuple[Point, ...],
    dtypes: tuple[str, ...] | None = None,
    layouts: tuple[str, ...] | None = None,
) -> list[Point]:
    """Each point in each of ``dtypes`` and ``layouts`` (None keeps the point's own), no repeats."""
    out: dict[Point, None] = {}
    for point in points:
        for dtype in dtypes or (point.dtype,):
            for layout in layouts_for(point.shape, layouts or (point.layout,)):
                out[Point(point.shape, dtype, layout)] = None
    return list(out)


def grid(
    shapes: list[tuple[int, ...]], dtypes: tuple[str, ...] = DTYPES,
    layouts: tuple[str, ...] = LAYOUTS,
) -> list[Point]:
    """Every shape in every dtype and every layout it has."""
    return restyle([Point(shape, "fp32", "nchw") for shape in shapes], dtypes, layouts)


def distinct(shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The shapes without repeats, in order of first appearance."""
    return list(dict.fromkeys(shapes))


def resnet50_bn_inputs(batch: int, image: int = 224) -> list[tuple[int, int, int, int]]:
    """The input shape of every BatchNorm2d of torchvision's resnet50, in forward order (53).

    Stem: conv1 (7x7, stride 2) -> bn1 at image/2, then a stride-2 max-pool. Each Bottleneck:
    conv1 1x1 -> bn1, conv2 3x3 -> bn2, conv3 1x1 (4x channels) -> bn3, and in a stage's first
    block a 1x1 downsample conv -> bn. torchvision (ResNet v1.5) puts the stride of layer2..4
    on conv2, so bn1 of their first block still sees the previous stage's resolution
    (e.g. 128 channels at 56x56).
    """
    size = image // 2
    inputs = [(batch, 64, size, size)]
    size //= 2
    for stage, (blocks, width) in enumerate(RESNET50_STAGES):
        for block in range(blocks):
            out_size = size // 2 if stage > 0 and block == 0 else size
            inputs.append((batch, width, size, size))
            inputs.append((batch, width, out_size, out_size))
            inputs.append((batch, 4 * width, out_size, out_size))
            if block == 0:
                inputs.append((batch, 4 * width, out_size, out_size))
            size = out_size
    return inputs


def r3d18_bn_inputs(
    batch: int, frames: int = 16, image: int = 112
) -> list[tuple[int, int, int, int, int]]:
    """The input shape of every BatchNorm3d of torchvision's r3d_18, in forward order (20).

    Stem: a (3, 7, 7) conv with stride (1, 2, 2) -> bn, no pooling. Each BasicBlock:
    conv1 -> bn1, conv2 -> bn2; the first block of layer2..4 strides 2 in time and space
    in conv1 and in its 1x1x1 downsample conv -> bn.
    """
    time, size = frames, image // 2
    inputs = [(batch, 64, time, size, size)]
    for stage, width in enumerate(R3D18_WIDTHS):
        for block in range(2):
            downsample = stage > 0 and block == 0
            if downsample:
                time, size = time // 2, size // 2
            inputs += [(batch, width, time, size, size)] * (3 if downsample else 2)
    return inputs


def parse_shape(text: str) -> tuple[int, ...]:
    """'N,C,H,W' (or 'NxCxHxW'): rank 2 to 5, positive sizes; ValueError says what is wrong."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(
            f"bad shape {text!r}: expected comma-separated integers N,C[,D][,H,W], "
            "e.g. 256,1024 or 32,64,56,56"
        ) from None
    if not 2 <= len(shape) <= 5:
        raise ValueError(
            f"bad shape {text!r}: {len(shape)} dimension(s); BatchNorm takes 2 to 5 (N, C, ...)"
        )
    if min(shape) < 1:
        raise ValueError(f"bad shape {text!r}: every size must be at least 1")
    if math.prod(shape) // shape[1] < 2:
        raise ValueError(
            f"bad shape {text!r}: training needs more than one value per channel "
            "(N x spatial sizes > 1)"
        )
    return shape


_RESNET50 = [s for batch in (32, 256) for s in distinct(resnet50_bn_inputs(batch))]
_BN1D = [(n, c) for n in (1024, 4096, 16384, 65536) for c in (256, 1024, 4096)]
_VIDEO = distinct(r3d18_bn_inputs(8))
_CPU = [
    (1024, 256),
    (4096, 512),
    (32, 128, 256),
    (8, 64, 56, 56),
    (16, 256, 14, 14),
    (16, 1024, 7, 7),
    (2, 64, 8, 28, 28),
]
_QUICK = [
    Point((32, 64, 112, 112), "bf16", "channels_last"),
    Point((256, 256, 56, 56), "fp16", "channels_last"),
    Point((32, 256, 56, 56), "fp32", "nchw"),
    Point((256, 512, 28, 28), "bf16", "nchw"),
    Point((32, 1024, 14, 14), "fp16", "channels_last"),
    Point((256, 2048, 7, 7), "bf16", "channels_last"),
    Point((32, 2048, 7, 7), "fp32", "nchw"),
    Point((64, 16, 128, 128), "fp16", "nchw"),
    Point((8, 64, 16, 56, 56), "bf16", "channels_last"),
    Point((8, 512, 2, 7, 7), "fp32", "nchw"),
    Point((65536, 1024), "bf16", "nchw"),
    Point((1024, 256), "fp32", "nchw"),
]

SUITES = {
    suite.name: suite
    for suite in (
        Suite(
            "quick",
            "12 representative points (ResNet-50, few channels, video, BN1d; each in one "
            "dtype and layout); the default on CUDA",
            tuple(_QUICK),
            for_gpu=True,
        ),
        Suite(
            "resnet50",
            "the 12 distinct BatchNorm2d shapes of torchvision's resnet50 (224x224) at batch "
            "32 and 256, every dtype and layout",
            tuple(grid(_RESNET50)),
            for_gpu=True,
        ),
        Suite(
            "bn1d",
            "BatchNorm1d (N, C) for N in 1024..65536 and C in 256..4096, every dtype",
            tuple(grid(_BN1D)),
            for_gpu=True,
        ),
        Suite(
            "video",
            "the 4 distinct BatchNorm3d shapes of torchvision's r3d_18 on 16x112x112 clips at "
            "batch 8, every dtype and layout",
            tuple(grid(_VIDEO)),
            for_gpu=True,
        ),
        Suite(
            "cpu",
            "7 small shapes of rank 2 to 5 in fp32, both layouts; the default without CUDA",
            tuple(grid(_CPU, dtypes=("fp32",))),
            for_gpu=False,
        ),
    )
}
