"""Models for the fastbn.convert tests, shaped like the torchvision and timm ones that broke
it (see issue 9), and the harness that runs them side by side.

Nothing here depends on torchvision or timm: each class copies the pattern that matters
(a forward with ``None`` defaults, a shared ReLU module, a conv subclass defined outside
torch.nn, a timm-style BatchNormAct2d, a DLA-style tree of blocks, residual blocks written
with and without nn.Sequential).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import assert_matches, make_input
from torch import nn

import fastbn
from fastbn.modules import _FastBatchNorm

# ---------------------------------------------------------------------------------------------
# Models


def conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU module used after bn1 and after the add (`+=`)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck, with the activations written three ways."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = torch.add(out, identity)
        return torch.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet, small: stem conv-bn-relu-maxpool, two stages, avgpool, fc."""

    def __init__(self, block, layers=(2, 1), width=8, num_classes=5):
        super().__init__()
        self.num_classes = num_classes
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DataDependent(nn.Module):
    """Branches on a tensor's value, which torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = BasicBlock(4, 4)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:
            x = x * 2
        return self.block(x)


class TrainingBranch(nn.Module):
    """Runs a different path in training, which a trace would freeze."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.training else F.silu(x)


class Wrapper(nn.Module):
    """Holds the patterns only in its submodules and has a method of its own."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = BasicBlock(4, 4)

    def forward(self, x):
        return self.block(self.stem(x))

    def describe(self):
        return "wrapper"


def resnet(block=BasicBlock, seed=0, **options) -> ResNet:
    torch.manual_seed(seed)
    model = ResNet(block, **options)
    randomize_batchnorms_(model, seed)
    return model


def randomize_batchnorms_(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine parameters and running statistics in every BatchNorm layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                c = layer.num_features
                layer.weight.copy_(1 + 0.3 * torch.randn(c, generator=generator))
                layer.bias.copy_(0.3 * torch.randn(c, generator=generator))
                layer.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                layer.running_var.copy_(0.5 + torch.rand(c, generator=generator))


def converted_pair(model: nn.Module, device, **options) -> tuple[nn.Module, nn.Module]:
    """(fastbn.convert(model), an untouched copy of model), both on device."""
    model = model.to(device)
    reference = copy.deepcopy(model)
    return fastbn.convert(model, **options), reference


def fused_layers(model: nn.Module) -> dict[str, str]:
    """{path: activation} of the fastbn layers that carry an activation."""
    return {
        name: layer.activation
        for name, layer in model.named_modules()
        if isinstance(layer, _FastBatchNorm) and layer.activation is not None
    }


def residual_calls(model: nn.Module) -> list[str]:
    """The layers a GraphModule calls with residual=."""
    return [
        node.target
        for module in model.modules()
        if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
        if node.op == "call_module" and "residual" in node.kwargs
    ]


def assert_same_outputs(converted, reference, x) -> None:
    assert_matches("output", converted(x), reference(x))



class ShortcutBlock(nn.Module):
    """A block that takes its shortcut as an optional argument (timm/DLA style): traced on
    its own, ``shortcut is None`` would be frozen to False and the ``+ x`` lost."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        return self.relu(self.bn(self.conv(x)) + shortcut)


class DlaRoot(nn.Module):
    """DLA's Root: concatenates its children, then conv-bn(-residual)-relu."""

    def __init__(self, in_channels: int, out_channels: int, residual: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual

    def forward(self, x_children):
        x = self.conv(torch.cat(x_children, 1))
        x = self.bn(x)
        if self.residual:
            x += x_children[0]
        return self.relu(x)


class DlaTree(nn.Module):
    """timm's DlaTree: ``forward(x, shortcut=None, children=None)`` with the ``children is
    None`` branch that an fx trace of the tree alone turned into a graph input."""

    def __init__(self, levels: int, channels: int, root_residual: bool = True,
                 passed_children: int = 0):
        super().__init__()
        self.levels = levels
        if levels == 1:
            self.tree1 = ShortcutBlock(channels)
            self.tree2 = ShortcutBlock(channels)
            self.root = DlaRoot((2 + passed_children) * channels, channels, root_residual)
        else:
            self.tree1 = DlaTree(levels - 1, channels, root_residual)
            self.tree2 = DlaTree(levels - 1, channels, root_residual, passed_children + 1)
            self.root = None

    def forward(self, x, shortcut=None, children=None):
        children = [] if children is None else children
        x1 = self.tree1(x, shortcut)
        if self.levels == 1:
            x2 = self.tree2(x1)
            return self.root([x2, x1, *children])
        children.append(x1)
        return self.tree2(x1, children=children)


class Dla(nn.Module):
    """A small DLA: stem, two trees, head; with forward_features, as timm models have."""

    def __init__(self, channels: int = 4, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.level1 = DlaTree(1, channels)
        self.level2 = DlaTree(2, channels, root_residual=False)
        self.fc = nn.Linear(channels, num_classes)

    def forward_features(self, x):
        return self.level2(self.level1(self.stem(x)))

    def forward(self, x):
        return self.fc(self.forward_features(x).mean((2, 3)))


class Conv3DSimple(nn.Conv3d):
    """torchvision's video conv: an nn.Conv3d subclass defined outside torch.nn, which the
    default fx tracer traces into (recording dotted get_attr targets)."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__(in_planes, out_planes, (3, 3, 3), padding=(1, 1, 1), bias=False)


class VideoBasicBlock(nn.Module):
    """torchvision r3d_18's BasicBlock: Sequential(conv, bn, relu) stages and a ``+=``."""

    def __init__(self, planes: int):
        super().__init__()
        self.conv1 = nn.Sequential(
            Conv3DSimple(planes, planes), nn.BatchNorm3d(planes), nn.ReLU(inplace=True)
        )
        self.conv2 = nn.Sequential(Conv3DSimple(planes, planes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        residual = x
        out = self.conv2(self.conv1(x))
        out += residual
        return self.relu(out)


class VideoResNet(nn.Module):
    """A small r3d_18: stem, one block, pooled head."""

    def __init__(self, planes: int = 4, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, planes, (3, 3, 3), padding=1, bias=False), nn.BatchNorm3d(planes),
            nn.ReLU(inplace=True),
        )
        self.layer1 = VideoBasicBlock(planes)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        return self.fc(self.layer1(self.stem(x)).mean((2, 3, 4)))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward is torch's BatchNorm, then
    its ``drop``, then its ``act`` child."""

    def __init__(self, num_features: int, act_layer=nn.ReLU, drop_layer=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, factor, self.eps,
        )
        return self.act(self.drop(x))


class ConvNormAct(nn.Module):
    """timm's ConvNormAct: a conv, then a BatchNormAct2d."""

    def __init__(self, in_channels: int, out_channels: int, act_layer=nn.ReLU, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = BatchNormAct2d(out_channels, act_layer=act_layer, **kwargs)

    def forward(self, x):
        return self.bn(self.conv(x))


class TimmNet(nn.Module):
    """A timm-style net of ConvNormAct stages (efficientnet/regnet/cspnet all build so)."""

    def __init__(self, act_layer=nn.SiLU, num_classes: int = 3):
        super().__init__()
        self.stem = ConvNormAct(3, 4, act_layer=act_layer)
        self.stage = ConvNormAct(4, 4, act_layer=nn.ReLU)
        self.head = ConvNormAct(4, 4, act_layer=None)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.head(self.stage(self.stem(x))).mean((2, 3)))

    def get_classifier(self):
        return self.fc


class InvertedResidual(nn.Module):
    """mobilenet_v2/v3's block: a Sequential of conv-bn-activation stages and an add."""

    def __init__(self, channels: int = 4, hidden: int = 8):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return x + self.conv(x)


class MobileNet(nn.Module):
    """A small mobilenet: stem Sequential, two inverted residuals, pooled head."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.SiLU()),
            InvertedResidual(),
            InvertedResidual(),
        )
        self.classifier = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class InputResidual(nn.Module):
    """A block whose residual is the model's own float32 input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x)


# name: (class and arguments, input shape)
ZOO = {
    "resnet": ((ResNet, BasicBlock), (2, 3, 16, 16)),
    "resnet_bottleneck": ((ResNet, Bottleneck, (1, 1)), (2, 3, 16, 16)),
    "dla": ((Dla,), (2, 3, 8, 8)),
    "video_resnet": ((VideoResNet,), (2, 3, 4, 6, 6)),
    "timm_norm_act": ((TimmNet,), (2, 3, 8, 8)),
    "mobilenet": ((MobileNet,), (2, 3, 12, 12)),
}


def zoo_model(name: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, tuple[int, ...]]:
    """ZOO's model (random weights and BatchNorm state from a fixed seed) on the test
    device, and its input shape."""
    (cls, *arguments), shape = ZOO[name]
    torch.manual_seed(0)
    model = cls(*arguments)
    randomize_batchnorms_(model)
    return model.to(DEVICE, dtype), shape


def training_record(model: nn.Module, shape: tuple[int, ...], steps: int = 2) -> dict:
    """What a model computes, by name: for each of two SGD steps in training, the output
    and the gradients of the input and of every parameter; then every buffer (running
    statistics, step counters) and an output in eval. Inputs are seeded float64."""
    record = {}
    model.train()
    for step in range(steps):
        x = make_input(shape, torch.float64, seed=step).requires_grad_(True)
        output = model(x)
        output.backward(make_input(tuple(output.shape), torch.float64, seed=10 + step))
        record[f"step {step} output"] = output.detach()
        record[f"step {step} input grad"] = x.grad
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                record[f"step {step} grad of {name}"] = parameter.grad.clone()
                parameter -= 0.01 * parameter.grad
                parameter.grad = None
    for name, buffer in model.named_buffers():
        record[f"buffer {name}"] = buffer.clone()
    model.eval()
    with torch.no_grad():
        record["eval output"] = model(make_input(shape, torch.float64, seed=9))
    return record


def assert_same_record(actual: dict, expected: dict, *, bitwise: bool = False) -> None:
    """Two training records agree: the same names, floating values within their dtype's
    tolerance (bit for bit with bitwise), integers (step counters) equal."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert_same_value(name, actual[name], value, bitwise=bitwise)


def assert_same_buffers(model: nn.Module, reference: nn.Module) -> None:
    """Each buffer of model (a traced one may hold fewer) is reference's of the same name."""
    for name, buffer in model.named_buffers():
        assert_same_value(name, buffer, reference.get_buffer(name))


def assert_same_value(name: str, actual: torch.Tensor, expected: torch.Tensor, *,
                      bitwise: bool = False) -> None:
    """Floating values within their dtype's tolerance (or bit for bit), integers equal."""
    if expected.is_floating_point() and not bitwise:
        assert_matches(name, actual, expected)
    else:
        assert torch.equal(actual, expected), name
