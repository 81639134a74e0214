"""What the benchmark runs on: points (shape, dtype, layout, fusion), named suites, shapes from
the CLI.

The model suites are derived by walking the architecture, layer by layer, the way torchvision
builds it, so each shape can be traced to the BatchNorm layers that see it:

- ``resnet50``: torchvision's ``resnet50`` at 224x224 (53 BatchNorm2d layers, 12 distinct
  (C, H, W)), at batch 32 and 256; plain, and fused with what follows each layer in the
  model (8 distinct (C, H, W) with a ReLU, 4 with an add and a ReLU);
- ``video``: torchvision's ``r3d_18`` on 16-frame 112x112 clips (20 BatchNorm3d layers, 4
  distinct (C, T, H, W)), at batch 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DTYPES = ("fp32", "fp16", "bf16")
LAYOUTS = ("nchw", "channels_last")
# What follows BatchNorm in the timed call: nothing, y = relu(BN(x)), y = relu(BN(x) + z).
FUSIONS = ("none", "relu", "add_relu")

# torchvision resnet50: (Bottleneck blocks, width) of layer1..layer4; a block's output has
# 4 * width channels.
RESNET50_STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))
# The resnet50 suite's fused points are in these dtypes and layouts only (mixed-precision
# training is where BN+ReLU fusion is used); its plain points are in all.
RESNET50_FUSED_DTYPES = ("fp16", "bf16")
RESNET50_FUSED_LAYOUTS = LAYOUTS
# torchvision r3d_18: the width of layer1..layer4, two BasicBlocks each.
R3D18_WIDTHS = (64, 128, 256, 512)
# The cpu suite's dtypes: float32, and bfloat16 (the low-precision type CPUs compute in).
CPU_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class Point:
    """One benchmarked input: its shape, dtype name (DTYPES), layout name (LAYOUTS) and what
    follows the BatchNorm (FUSIONS).

    ``nchw`` is the contiguous (N, C, ...) order of any rank; ``channels_last`` is
    torch.channels_last for 4-D and torch.channels_last_3d for 5-D input. ``add_relu``
    points have a second input z (the residual) of x's shape, dtype and layout.
    """

    shape: tuple[int, ...]
    dtype: str
    layout: str
    fusion: str = "none"

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
    fusions: tuple[str, ...] | None = None,
) -> list[Point]:
    """Each point in each of ``dtypes``, ``layouts`` and ``fusions`` (None keeps the point's
    own), no repeats."""
    out: dict[Point, None] = {}
    for point in points:
        for fusion in fusions or (point.fusion,):
            for dtype in dtypes or (point.dtype,):
                for layout in layouts_for(point.shape, layouts or (point.layout,)):
                    out[Point(point.shape, dtype, layout, fusion)] = None
    return list(out)


def grid(
    shapes: list[tuple[int, ...]], dtypes: tuple[str, ...] = DTYPES,
    layouts: tuple[str, ...] = LAYOUTS,
) -> list[Point]:
    """Every shape in every dtype and every layout it has (plain BatchNorm)."""
    return restyle([Point(shape, "fp32", "nchw") for shape in shapes], dtypes, layouts)


def distinct(shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The shapes without repeats, in order of first appearance."""
    return list(dict.fromkeys(shapes))


def resnet50_bn_layers(
    batch: int, image: int = 224
) -> list[tuple[tuple[int, int, int, int], str]]:
    """Every BatchNorm2d of torchvision's resnet50 in forward order (53): its input shape, and
    what follows it in the model as a fusion (FUSIONS).

    Stem: conv1 (7x7, stride 2) -> bn1 -> relu at image/2, then a stride-2 max-pool. Each
    Bottleneck: conv1 1x1 -> bn1 -> relu, conv2 3x3 -> bn2 -> relu, conv3 1x1 (4x channels)
    -> bn3, and in a stage's first block a 1x1 downsample conv -> bn (the identity branch:
    nothing follows it); then relu(bn3's output + identity). torchvision (ResNet v1.5) puts
    the stride of layer2..4 on conv2, so bn1 of their first block still sees the previous
    stage's resolution (e.g. 128 channels at 56x56).
    """
    size = image // 2
    layers = [((batch, 64, size, size), "relu")]
    size //= 2
    for stage, (blocks, width) in enumerate(RESNET50_STAGES):
        for block in range(blocks):
            out_size = size // 2 if stage > 0 and block == 0 else size
            layers.append(((batch, width, size, size), "relu"))
            layers.append(((batch, width, out_size, out_size), "relu"))
            layers.append(((batch, 4 * width, out_size, out_size), "add_relu"))
            if block == 0:
                layers.append(((batch, 4 * width, out_size, out_size), "none"))
            size = out_size
    return layers


def resnet50_bn_inputs(batch: int, image: int = 224) -> list[tuple[int, int, int, int]]:
    """The input shape of every BatchNorm2d of torchvision's resnet50, in forward order (53)."""
    return [shape for shape, _ in resnet50_bn_layers(batch, image)]


def resnet50_points() -> list[Point]:
    """The resnet50 suite at batch 32 and 256: each distinct BatchNorm2d input shape plain, in
    every dtype and layout; then each distinct (shape, fusion) that the model fuses (ReLU, or
    add and ReLU) in RESNET50_FUSED_DTYPES and RESNET50_FUSED_LAYOUTS."""
    plain = [shape for batch in (32, 256) for shape in distinct(resnet50_bn_inputs(batch))]
    fused = [
        Point(shape, "fp32", "nchw", fusion)
        for batch in (32, 256)
        for shape, fusion in dict.fromkeys(resnet50_bn_layers(batch))
        if fusion != "none"
    ]
    return grid(plain) + restyle(fused, RESNET50_FUSED_DTYPES, RESNET50_FUSED_LAYOUTS)


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
    Point((256, 64, 56, 56), "bf16", "channels_last", "relu"),
    Point((256, 256, 56, 56), "bf16", "channels_last", "add_relu"),
]

SUITES = {
    suite.name: suite
    for suite in (
        Suite(
            "quick",
            "14 representative points (ResNet-50, few channels, video, BN1d, and ResNet-50's "
            "BN+ReLU and BN+add+ReLU; each in one dtype, layout and fusion); the default on "
            "CUDA",
            tuple(_QUICK),
            for_gpu=True,
        ),
        Suite(
            "resnet50",
            "the 12 distinct BatchNorm2d shapes of torchvision's resnet50 (224x224) at batch "
            "32 and 256, every dtype and layout; plus, in fp16 and bf16 and both layouts, the "
            "fused BN+ReLU (8 shapes: the stem, each Bottleneck's bn1 and bn2) and BN+add+ReLU "
            "(4 shapes: each Bottleneck's bn3) at both batches",
            tuple(resnet50_points()),
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
            "7 small shapes of rank 2 to 5 in fp32 and bf16, both layouts, each plain, with "
            "a ReLU and with an add and a ReLU; the default without CUDA",
            tuple(restyle(grid(_CPU, dtypes=CPU_DTYPES), fusions=FUSIONS)),
            for_gpu=False,
        ),
    )
}
