"""A small ResNet-style model's training step: torch's BatchNorm against ``fastbn.convert``.

The model (no torchvision needed): a 3x3 stem conv -> BN -> ReLU, then three stages of two
BasicBlocks (3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus the identity or a strided 1x1
conv -> BN, then add and ReLU), global average pooling and a linear classifier; widths 16,
32, 64 on 32x32 images (CIFAR-sized). One step: forward, cross-entropy, backward, SGD
update. The fastbn model is a deep copy converted with ``fastbn.convert`` at one of FUSE_LEVELS:
"none" (the default: the BatchNorm layers swapped, nothing fused, since every ReLU and add
here is in a forward) or "graph" (torch.fx fuses each BN -> ReLU and BN -> add -> ReLU into
the layer: 13 of the 15 layers take a ReLU, 6 of them the residual too). Before timing,
one step of each model on the same batch is checked against a float64 copy of the model
(see TOLERANCE).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

import fastbn
from fastbn.bench.timing import summarize

WIDTHS = (16, 32, 64)
BATCH = 32
IMAGE = 32
CLASSES = 10
# A step is WRONG when, against a float64 copy of the model, fastbn's error (see
# error_against) exceeds TOLERANCE and twice torch's own. One step's parameter updates in
# float32 are far from exact: a ReLU kink that rounding flips moves a whole dy, and bias
# gradients are sums that cancel (torch's own error is ~1e-3 channels_last here); a wrong
# formula errs by O(1).
TOLERANCE = 5e-2
FUSE_LEVELS = ("none", "graph")
"""The ``fastbn.convert(model, fuse=...)`` levels timed, each against torch's model."""


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut (identity, or strided 1x1 conv-BN), ReLU."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """A ResNet-20-like CIFAR model with two blocks per stage (15 BatchNorm2d layers: the
    stem's, two per block, and the two strided shortcuts')."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        blocks, inputs = [], WIDTHS[0]
        for stage, width in enumerate(WIDTHS):
            for block in range(2):
                blocks.append(BasicBlock(inputs, width, 2 if stage > 0 and block == 0 else 1))
                inputs = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(inputs, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(out.mean((2, 3)))


@dataclass
class ModelStep:
    """One thread setting's result: median ms per training step, and torch's over fastbn's."""

    threads: int
    layout: str
    fuse: str
    torch_ms: float
    fastbn_ms: float
    speedup: float
    torch_error: float
    fastbn_error: float

    @property
    def ok(self) -> bool:
        return self.fastbn_error <= max(TOLERANCE, 2 * self.torch_error)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """Forward, cross-entropy loss, backward, SGD step; the loss (detached)."""
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()


def updated_state(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The state dict of a copy of ``model`` after one SGD training step (the loss included)."""
    model = copy.deepcopy(model)
    loss = training_step(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                         images, labels)
    return {"loss": loss, **model.state_dict()}


def error_against(state: dict, truth: dict) -> float:
    """The worst over the loss and every floating-point parameter and buffer of
    max |state - truth| / max |truth|."""
    worst = 0.0
    for name, expected in truth.items():
        if expected.is_floating_point():
            scale = expected.abs().max().item() or 1.0
            error = (state[name].double() - expected).abs().max().item() / scale
            worst = max(worst, error)
    return worst


def measure_model_step(threads: int, channels_last: bool, fuse: str, warmup: int, reps: int
                       ) -> ModelStep:
    """Time the training step of SmallResNet with torch's BatchNorm and converted to fastbn
    by ``fastbn.convert(model, fuse=fuse)``, interleaved (torch, fastbn, torch, ...), at
    ``threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        torch_model = SmallResNet()
        fastbn_model = fastbn.convert(copy.deepcopy(torch_model), fuse=fuse)
        images = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator)
        labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
            torch_model = torch_model.to(memory_format=torch.channels_last)
            fastbn_model = fastbn_model.to(memory_format=torch.channels_last)
        truth = updated_state(copy.deepcopy(torch_model).double(), images.double(), labels)
        errors = [error_against(updated_state(model, images, labels), truth)
                  for model in (torch_model, fastbn_model)]
        steps = {}
        for name, model in (("torch", torch_model), ("fastbn", fastbn_model)):
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            steps[name] = (lambda m=model, o=optimizer: training_step(m, o, images, labels))
        for _ in range(warmup):
            for step in steps.values():
                step()
        times: dict[str, list[float]] = {"torch": [], "fastbn": []}
        for _ in range(reps):  # interleaved, so load from other processes hits both alike
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - start) * 1e3)
        torch_ms, fastbn_ms = (summarize(times[name]).median_ms for name in ("torch", "fastbn"))
        return ModelStep(threads, "channels_last" if channels_last else "nchw", fuse, torch_ms,
                         fastbn_ms, torch_ms / fastbn_ms, *errors)
    finally:
        torch.set_num_threads(previous)


def model_steps(thread_counts: list[int], warmup: int, reps: int) -> list[ModelStep]:
    """The model step at each thread count, in both layouts, at each of FUSE_LEVELS."""
    return [
        measure_model_step(threads, channels_last, fuse, warmup, reps)
        for threads in thread_counts
        for channels_last in (False, True)
        for fuse in FUSE_LEVELS
    ]


def model_json(steps: list[ModelStep]) -> list[dict]:
    """The steps as JSON-ready dicts, with their check."""
    return [{**asdict(step), "ok": step.ok} for step in steps]


def model_table(steps: list[ModelStep]) -> str:
    """The model-step results, one line per thread count, layout and fuse level."""
    lines = [f"small ResNet-style model (SmallResNet, {2 * len(WIDTHS)} BasicBlocks), one "
             f"training step (batch {BATCH}, {IMAGE}x{IMAGE}, SGD); error against a float64 copy:"]
    for step in steps:
        lines.append(
            f"  threads {step.threads:>2}  {step.layout:13s}  fuse={step.fuse:5s}  "
            f"torch {step.torch_ms:8.3f} ms  "
            f"fastbn {step.fastbn_ms:8.3f} ms  vs torch {step.speedup:.2f}x  error torch "
            f"{step.torch_error:.2g} fastbn {step.fastbn_error:.2g}"
            + ("" if step.ok else "  WRONG")
        )
    return "\n".join(lines)
