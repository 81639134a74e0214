"""The tutorial: a LeNet-style model built with add_module, trained a few SGD steps."""

from __future__ import annotations

import torch
from helpers import make_input

import fastbn


def lenet(device) -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("conv1", torch.nn.Conv2d(1, 4, 3))
    model.add_module("bn1", fastbn.BatchNorm2d(4))
    model.add_module("relu1", torch.nn.ReLU())
    model.add_module("pool1", torch.nn.MaxPool2d(2))
    model.add_module("conv2", torch.nn.Conv2d(4, 8, 3))
    model.add_module("bn2", fastbn.BatchNorm2d(8))
    model.add_module("relu2", torch.nn.ReLU())
    model.add_module("pool2", torch.nn.MaxPool2d(2))
    model.add_module("flatten", torch.nn.Flatten())
    model.add_module("fc1", torch.nn.Linear(8 * 2 * 2, 16))
    model.add_module("bn3", fastbn.BatchNorm1d(16))
    model.add_module("relu3", torch.nn.ReLU())
    model.add_module("fc2", torch.nn.Linear(16, 3))
    return model.to(device)


def dataset(device):
    """16 fixed 1x14x14 images in 3 classes (the class shifts the image's mean)."""
    labels = torch.arange(16, device=device) % 3
    images = make_input((16, 1, 14, 14), device=device) + labels.view(-1, 1, 1, 1)
    return images, labels


def test_calling_the_model_runs_the_batchnorm_hooks(backend, device):
    model = lenet(device)
    calls = []
    for name in ("bn1", "bn2", "bn3"):
        layer = getattr(model, name)
        layer.register_forward_pre_hook(lambda m, args, name=name: calls.append(("pre", name)))
        layer.register_forward_hook(lambda m, args, out, name=name: calls.append(("post", name)))
    images, _ = dataset(device)
    assert model(images).shape == (16, 3)
    assert calls == [(kind, name) for name in ("bn1", "bn2", "bn3") for kind in ("pre", "post")]


def test_training_a_few_sgd_steps_reduces_the_loss(backend, device):
    model = lenet(device)
    images, labels = dataset(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert int(model.bn1.num_batches_tracked) == 8
