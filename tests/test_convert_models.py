"""fastbn.convert and fastbn.revert on models shaped like the torchvision and timm ones of
issue 9: each level computes what the original did, the default keeps every module, graph
fusion refuses what it cannot prove, revert gives the original back bit for bit, and
deployment folding gives what folding the original gives.

Models and the float64 training record (two SGD steps: outputs, input and parameter
gradients; then buffers and an eval output) come from tests/convert_models.py.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import pickle
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from convert_models import (
    ZOO,
    BatchNormAct2d,
    ConvNormAct,
    Dla,
    DlaTree,
    InputResidual,
    ResNet,
    ShortcutBlock,
    VideoResNet,
    assert_same_record,
    randomize_batchnorms_,
    training_record,
    zoo_model,
)
from helpers import assert_matches, make_input, tolerance
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

import fastbn
from fastbn.convert import FUSE_LEVELS
from fastbn.modules import _FastBatchNorm


@contextlib.contextmanager
def no_warnings() -> Iterator[None]:
    """A block in which any warning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def structure(model: nn.Module) -> list[tuple[str, type]]:
    """Every module's path and class, but BatchNorm layers count as _BatchNorm (so a swapped
    layer counts as kept) and what lies inside them (a BatchNormAct's act) is left out."""
    layers = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    return [
        (name, _BatchNorm if name in layers else type(m))
        for name, m in model.named_modules()
        if not any(name.startswith(f"{layer}.") for layer in layers)
    ]


# ---------------------------------------------------------------------------------------------
# Every level computes what the original did; revert gives the original back


@pytest.mark.parametrize("level", FUSE_LEVELS)
@pytest.mark.parametrize("name", ZOO)
def test_converted_model_trains_and_evaluates_like_the_original(name, level):
    model, shape = zoo_model(name)
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what graph fusion refuses is tested below
        converted = fastbn.convert(model, fuse=level)
    assert_same_record(training_record(converted, shape), training_record(reference, shape))


@pytest.mark.parametrize("level", FUSE_LEVELS)
@pytest.mark.parametrize("name", ZOO)
def test_reverted_model_is_the_original_bit_for_bit(name, level):
    model, shape = zoo_model(name)
    reference = copy.deepcopy(model)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    classes = [(path, type(m)) for path, m in model.named_modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = fastbn.convert(model, fuse=level)
    reverted = fastbn.revert(converted)
    assert [(path, type(m)) for path, m in reverted.named_modules()] == classes
    assert not any(isinstance(m, _FastBatchNorm) for m in reverted.modules())
    for key, tensor in [*reverted.named_parameters(), *reverted.named_buffers()]:
        assert tensor is tensors[key], key
    assert list(reverted.state_dict()) == list(reference.state_dict())
    record = training_record(reverted, shape)
    assert_same_record(record, training_record(reference, shape), bitwise=True)


@pytest.mark.parametrize("level", ["safe", "graph"])
def test_deep_copy_and_pickle_of_a_converted_model_still_revert(level):
    model, shape = zoo_model("resnet")
    reference = copy.deepcopy(model).eval()
    converted = fastbn.convert(model, fuse=level).eval()
    x = make_input(shape, torch.float64)
    for duplicate in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        assert_matches("copy output", duplicate(x), reference(x))
        reverted = fastbn.revert(duplicate)
        assert structure(reverted) == structure(reference)
        assert torch.equal(reverted(x), reference(x))


def test_revert_follows_the_converted_model_to_another_dtype():
    model, shape = zoo_model("resnet", torch.float32)
    reference = copy.deepcopy(model).double().eval()
    converted = fastbn.convert(model, fuse="graph").double()
    reverted = fastbn.revert(converted).eval()
    assert {t.dtype for t in [*reverted.parameters(), *reverted.buffers()]} == {
        torch.float64, torch.int64,
    }
    x = make_input(shape, torch.float64)
    assert torch.equal(reverted(x), reference(x))


def test_revert_keeps_training_flags_set_on_the_converted_model():
    model, _ = zoo_model("mobilenet")
    converted = fastbn.convert(model, fuse="safe").eval()
    converted.features[1].train()
    reverted = fastbn.revert(converted)
    expected = {name: name.startswith("features.1") for name, _ in reverted.named_modules()}
    assert {name: m.training for name, m in reverted.named_modules()} == expected


# ---------------------------------------------------------------------------------------------
# The default keeps the model's structure


@pytest.mark.parametrize("name", ZOO)
def test_default_convert_keeps_every_module_and_swaps_layers_in_place(name):
    model, _ = zoo_model(name)
    before = structure(model)
    with no_warnings():
        converted = fastbn.convert(model)
    assert converted is model
    assert structure(converted) == before
    batchnorms = [m for m in converted.modules() if isinstance(m, _BatchNorm)]
    assert batchnorms and all(isinstance(m, _FastBatchNorm) for m in batchnorms)


def test_default_convert_keeps_methods_and_children_that_run_alone():
    resnet, shape = zoo_model("resnet")
    dla, dla_shape = zoo_model("dla")
    timm, _ = zoo_model("timm_norm_act")
    resnet_reference, dla_reference = (copy.deepcopy(m).eval() for m in (resnet, dla))
    for model in (resnet, dla, timm):
        fastbn.convert(model).eval()
    assert isinstance(resnet, ResNet) and isinstance(dla, Dla)
    assert timm.get_classifier() is timm.fc

    def features(model, x):  # torchvision's IntermediateLayerGetter: children in turn
        for child in list(model.children())[:-2]:
            x = child(x)
        return x

    x = make_input(shape, torch.float64)
    assert_matches("children in turn", features(resnet, x), features(resnet_reference, x))
    x = make_input(dla_shape, torch.float64)
    assert_matches("forward_features", dla.forward_features(x), dla_reference.forward_features(x))
    stem = dla.stem(x)
    assert_matches("a tree alone", dla.level1(stem), dla_reference.level1(stem))


def test_default_convert_keeps_activation_modules_in_sequential():
    model, _ = zoo_model("mobilenet")
    converted = fastbn.convert(model)
    assert type(converted.features[0][2]) is nn.SiLU
    assert converted.features[0][1].activation is None


# ---------------------------------------------------------------------------------------------
# Graph fusion: only what holds for every call


def test_block_with_an_optional_shortcut_is_not_traced_alone_and_warns_once():
    torch.manual_seed(0)
    block = ShortcutBlock(4).to(DEVICE, torch.float64)
    randomize_batchnorms_(block)
    reference = copy.deepcopy(block)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = fastbn.convert(block, fuse="graph")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "ShortcutBlock" in message and "shortcut=None" in message
    assert type(converted) is ShortcutBlock
    x = make_input((2, 4, 5, 5), torch.float64)
    shortcut = make_input((2, 4, 5, 5), torch.float64, seed=1)
    assert_matches("without a shortcut", converted(x), reference(x))
    assert_matches("with a shortcut", converted(x, shortcut), reference(x, shortcut))


def test_dla_tree_with_none_defaults_is_fused_only_where_its_caller_fixes_them():
    model, shape = zoo_model("dla")
    reference = copy.deepcopy(model).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = fastbn.convert(copy.deepcopy(model.level2), fuse="graph")
    assert type(tree) is DlaTree
    assert len(caught) == 1 and "children=None" in str(caught[0].message)
    converted = fastbn.convert(model, fuse="graph").eval()
    x = make_input(shape, torch.float64)
    assert_matches("output", converted(x), reference(x))


def test_conv_subclass_outside_torch_nn_is_traced_as_a_leaf():
    model, shape = zoo_model("video_resnet")
    reference = copy.deepcopy(model).eval()
    converted = fastbn.convert(model, fuse="graph").eval()
    assert type(converted) is VideoResNet
    block = converted.layer1
    assert isinstance(block, torch.fx.GraphModule)
    calls = [node.target for node in block.graph.nodes if node.op == "call_module"]
    assert calls == ["conv1.0", "conv1.1", "conv1.2", "conv2.0", "conv2.1"]
    assert block.conv2[1].activation == "relu"  # with the residual add
    x = make_input(shape, torch.float64)
    assert_matches("output", converted(x), reference(x))


def test_failed_graph_fusion_leaves_the_model_as_it_was(monkeypatch):
    model, _ = zoo_model("resnet")
    modules = list(model.named_modules())
    bn1 = model.bn1

    def broken(rewrite):
        raise RuntimeError("broken rewrite")

    monkeypatch.setattr(importlib.import_module("fastbn.convert"), "_graph_module", broken)
    with pytest.raises(RuntimeError, match="broken rewrite"):
        fastbn.convert(model, fuse="graph")
    assert list(model.named_modules()) == modules
    assert type(model.bn1) is nn.BatchNorm2d and model.bn1 is bn1
    assert model.layer1[0].relu is not None and type(model.layer1[0].relu) is nn.ReLU


@pytest.mark.parametrize(
    ("fuse", "error", "match"),
    [("fast", ValueError, "fuse must be one of"), (1, TypeError, "fuse must be one of")],
)
def test_unknown_fuse_level_is_rejected_before_anything_changes(fuse, error, match):
    model, _ = zoo_model("resnet")
    modules = list(model.named_modules())
    with pytest.raises(error, match=match):
        fastbn.convert(model, fuse=fuse)
    assert list(model.named_modules()) == modules


def test_fuse_booleans_are_the_none_and_graph_levels():
    off = fastbn.convert(zoo_model("resnet")[0], fuse=False)
    on = fastbn.convert(zoo_model("resnet")[0], fuse=True)
    assert type(off) is ResNet
    assert isinstance(on, torch.fx.GraphModule)


# ---------------------------------------------------------------------------------------------
# timm-style BatchNormAct layers


def test_batchnorm_act_layers_become_fastbn_layers_with_their_activation():
    model, _ = zoo_model("timm_norm_act")
    with no_warnings():
        converted = fastbn.convert(model)
    layers = [converted.stem.bn, converted.stage.bn, converted.head.bn]
    assert all(type(layer) is fastbn.BatchNorm2d for layer in layers)
    assert [layer.activation for layer in layers] == ["silu", "relu", None]
    assert list(converted.state_dict()) == list(zoo_model("timm_norm_act")[0].state_dict())


def test_batchnorm_act_that_fastbn_cannot_compute_is_left_with_one_warning():
    model = nn.Sequential(ConvNormAct(3, 4, act_layer=nn.GELU),
                          ConvNormAct(4, 4, drop_layer=lambda: nn.Dropout(0.5)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = fastbn.convert(model)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "0.bn (BatchNormAct2d): its act is GELU" in message
    assert "1.bn (BatchNormAct2d): its drop is Dropout" in message
    assert [type(converted[i].bn) for i in (0, 1)] == [BatchNormAct2d, BatchNormAct2d]


class ActThenNorm(BatchNormAct2d):
    """The children of a BatchNormAct, but a forward that activates before normalizing."""

    def forward(self, x):
        return nn.BatchNorm2d.forward(self, self.act(self.drop(x)))


class ScaledNormAct(BatchNormAct2d):
    """A BatchNormAct whose forward also scales: not what fastbn would compute."""

    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("cls", [ActThenNorm, ScaledNormAct])
def test_batchnorm_act_children_with_another_forward_are_left_with_one_warning(cls):
    model = nn.Sequential(cls(4)).double()
    original = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = fastbn.convert(model)
    assert len(caught) == 1
    assert f"0 ({cls.__name__}): its forward does not compute" in str(caught[0].message)
    assert type(converted[0]) is cls
    x = make_input((3, 4, 5, 5), torch.float64)
    assert_matches("output", converted(x), original(x))


# ---------------------------------------------------------------------------------------------
# Deployment: folding conv-BN pairs


def fold_conv_bn(module: nn.Module) -> nn.Module:
    """The loop detection toolkits run (mmcv's fuse_conv_bn): each BatchNorm layer right
    after a conv among a module's children folds into it and becomes nn.Identity."""
    conv, conv_name = None, None
    for name, child in list(module.named_children()):
        if isinstance(child, _BatchNorm) and conv is not None:
            module._modules[conv_name] = fuse_conv_bn_eval(conv, child)
            module._modules[name] = nn.Identity()
            conv = None
        elif isinstance(child, nn.Conv2d | nn.Conv3d):
            conv, conv_name = child, name
        else:
            fold_conv_bn(child)
    return module


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "video_resnet", "timm_norm_act"])
def test_folding_the_converted_model_gives_what_folding_the_original_gives(name):
    model, shape = zoo_model(name)
    reference = fold_conv_bn(copy.deepcopy(model).eval())
    folded = fold_conv_bn(fastbn.convert(model).eval())
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    x = make_input(shape, torch.float64)
    assert_matches("folded output", folded(x), reference(x))


@pytest.mark.parametrize("level", FUSE_LEVELS)
def test_fuse_modules_after_revert_gives_what_it_gives_on_the_original(level):
    from torch.ao.quantization import fuse_modules

    model, shape = zoo_model("mobilenet")
    groups = [["features.0.0", "features.0.1"]] + [
        [f"features.{i}.conv.{j}", f"features.{i}.conv.{j + 1}"] for i in (1, 2) for j in (0, 3, 6)
    ]
    reference = fuse_modules(copy.deepcopy(model).eval(), groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = fastbn.convert(model, fuse=level).eval()
    folded = fuse_modules(fastbn.revert(converted), groups)
    x = make_input(shape, torch.float64)
    assert torch.equal(folded(x), reference(x))


def test_fuse_conv_bn_eval_folds_a_swapped_layer_like_the_original():
    model, shape = zoo_model("resnet")
    reference = fuse_conv_bn_eval(model.conv1.eval(), copy.deepcopy(model.bn1).eval())
    fastbn.convert(model)
    folded = fuse_conv_bn_eval(model.conv1.eval(), model.bn1.eval())
    x = make_input(shape, torch.float64)
    assert torch.equal(folded(x), reference(x))


# ---------------------------------------------------------------------------------------------
# Autocast: a wider residual is promoted as torch's + promotes it


@pytest.mark.parametrize("training", [True, False])
def test_float32_residual_under_autocast_is_promoted_like_torch(training):
    torch.manual_seed(0)
    model = InputResidual().to(DEVICE)
    randomize_batchnorms_(model)
    reference = copy.deepcopy(model).train(training)
    converted = fastbn.convert(model, fuse="graph").train(training)
    assert [n.kwargs for n in converted.graph.nodes if n.target == "bn"] == [
        {"residual": next(n for n in converted.graph.nodes if n.op == "placeholder")}
    ]
    x = make_input((2, 4, 6, 6))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        output, expected = converted(x), reference(x)
    assert output.dtype == expected.dtype == torch.float32
    atol, rtol = tolerance(torch.bfloat16)
    torch.testing.assert_close(output, expected, atol=atol, rtol=rtol)


def test_module_adds_a_wider_residual_in_the_promoted_dtype():
    bn = fastbn.BatchNorm2d(4, activation="relu", device=DEVICE).eval()
    randomize_batchnorms_(bn)
    x, residual = make_input((2, 4, 3, 3), torch.float32), make_input((2, 4, 3, 3), torch.float64)
    output = bn(x, residual)
    assert output.dtype == torch.float64
    normalized = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    atol, rtol = tolerance(torch.float32)  # the normalization ran in float32
    torch.testing.assert_close(output, F.relu(normalized + residual), atol=atol, rtol=rtol)



# ---------------------------------------------------------------------------------------------
# What revert leaves, and what it refuses


def test_revert_leaves_fastbn_layers_it_did_not_make():
    model = nn.Sequential(nn.BatchNorm1d(4), fastbn.BatchNorm1d(4, activation="silu"))
    reverted = fastbn.revert(fastbn.convert(model))
    assert type(reverted[0]) is nn.BatchNorm1d
    assert type(reverted[1]) is fastbn.BatchNorm1d and reverted[1].activation == "silu"


def test_revert_refuses_a_layer_given_an_activation_after_convert_and_changes_nothing():
    model, _ = zoo_model("mobilenet")
    converted = fastbn.convert(model, fuse="safe")
    converted.features[1].conv[7].activation = "relu"
    modules = list(converted.named_modules())
    with pytest.raises(ValueError, match="computes activation='relu'"):
        fastbn.revert(converted)
    assert list(converted.named_modules()) == modules
    assert converted.features[0][1].activation == "silu"


def test_revert_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="expected an nn.Module, got str"):
        fastbn.revert("model")


def _built_block(norm_layer) -> nn.Module:
    """A torchvision-style conv/BN/ReLU stack taking its norm layer as an argument."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), norm_layer(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1), norm_layer(4))


def test_revert_built_gives_torch_layers_to_a_model_built_with_fastbn_norm_layers():
    """norm_layer=functools.partial(fastbn.BatchNorm2d, ...): revert(built=True) makes each
    layer torch's BatchNorm2d holding the same tensors, hooks and attributes, computing the
    same bits, and quantization's fuse_modules then folds it as in the torch model."""
    import functools

    from torch.ao.quantization import fuse_modules

    torch.manual_seed(0)
    model = _built_block(functools.partial(fastbn.BatchNorm2d, eps=1e-3, momentum=0.01))
    reference = _built_block(functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01))
    x = make_input((4, 3, 9, 9), torch.float64)
    model.double(), reference.double()
    model(x)  # a training step: the running statistics move
    reference.load_state_dict(model.state_dict())
    layer = model[1]
    layer.no_weight_decay = True
    calls = []
    layer.register_forward_hook(lambda *args: calls.append(1))
    tensors = (layer.weight, layer.bias, layer.running_mean, layer.running_var,
               layer.num_batches_tracked)
    assert type(fastbn.revert(model)[1]) is fastbn.BatchNorm2d  # the default keeps them
    reverted = fastbn.revert(model, built=True).eval()
    assert [type(m) for m in reverted] == [type(m) for m in reference]
    torch_layer = reverted[1]
    assert (torch_layer.weight, torch_layer.bias, torch_layer.running_mean,
            torch_layer.running_var, torch_layer.num_batches_tracked) == tensors
    assert (torch_layer.eps, torch_layer.momentum, torch_layer.no_weight_decay) == (
        1e-3, 0.01, True)
    assert torch.equal(reverted(x), reference.eval()(x)) and calls == [1]  # (the hook ran)
    folded = fuse_modules(copy.deepcopy(reverted), [["0", "1", "2"], ["3", "4"]])
    expected = fuse_modules(copy.deepcopy(reference), [["0", "1", "2"], ["3", "4"]])
    assert torch.equal(folded(x), expected(x))


@pytest.mark.parametrize(("layer", "expected"), [
    (lambda: fastbn.BatchNorm1d(3), nn.BatchNorm1d),
    (lambda: fastbn.BatchNorm3d(3, affine=False), nn.BatchNorm3d),
    (lambda: fastbn.BatchNorm(3, num_dims=2), nn.BatchNorm1d),
    (lambda: fastbn.BatchNorm(3, num_dims=3, momentum=None), nn.BatchNorm1d),
    (lambda: fastbn.BatchNorm(3, num_dims=4, track_running_stats=False), nn.BatchNorm2d),
    (lambda: fastbn.BatchNorm(3, num_dims=5), nn.BatchNorm3d),
    (lambda: fastbn.SyncBatchNorm(3), nn.SyncBatchNorm),
])
def test_revert_built_gives_each_built_layer_torchs_class_of_its_kind(layer, expected):
    built = layer().train(False)
    reverted = fastbn.revert(nn.Sequential(built), built=True)[0]
    assert type(reverted) is expected
    assert not reverted.training
    assert (reverted.num_features, reverted.eps, reverted.momentum, reverted.affine,
            reverted.track_running_stats) == (built.num_features, built.eps, built.momentum,
                                              built.affine, built.track_running_stats)
    assert reverted.state_dict().keys() == built.state_dict().keys()
    assert not hasattr(reverted, "activation") and not hasattr(reverted, "num_dims")


def test_revert_built_puts_back_a_folded_activation_and_then_gives_torchs_layer():
    model = nn.Sequential(fastbn.BatchNorm2d(3), nn.ReLU())
    converted = fastbn.convert(model, fuse="safe")
    assert converted[0].activation == "relu"
    reverted = fastbn.revert(converted, built=True)
    assert [type(m) for m in reverted] == [nn.BatchNorm2d, nn.ReLU]


class _OwnForward(fastbn.BatchNorm2d):
    def forward(self, input, residual=None):
        return super().forward(input, residual) * 2


class _OwnAttribute(fastbn.BatchNorm2d):
    frozen = True


class _OwnInit(fastbn.BatchNorm2d):
    def __init__(self, num_features):
        super().__init__(num_features, eps=1e-3)


def test_revert_built_takes_a_subclass_that_only_sets_constructor_defaults():
    reverted = fastbn.revert(nn.Sequential(_OwnInit(3)), built=True)[0]
    assert type(reverted) is nn.BatchNorm2d and reverted.eps == 1e-3


@pytest.mark.parametrize(("layer", "message"), [
    (lambda: fastbn.BatchNorm2d(3, activation="relu"), "computes activation='relu'"),
    (lambda: _OwnForward(3), "its class defines forward over fastbn.BatchNorm2d"),
    (lambda: _OwnAttribute(3), "its class defines frozen over fastbn.BatchNorm2d"),
])
def test_revert_built_refuses_a_layer_torchs_would_not_compute_and_changes_nothing(
        layer, message):
    model = nn.Sequential(fastbn.BatchNorm2d(3), nn.Sequential(layer()))
    modules = list(model.named_modules())
    with pytest.raises(ValueError, match=rf"built=True\): 1\.0: .*{message}"):
        fastbn.revert(model, built=True)
    assert list(model.named_modules()) == modules


def test_revert_built_refuses_a_parametrized_layer_and_what_is_not_a_bool():
    from torch.nn.utils import parametrize

    layer = fastbn.BatchNorm2d(3)
    parametrize.register_parametrization(layer, "weight", nn.Identity())
    with pytest.raises(ValueError, match="weight is not among its parameters"):
        fastbn.revert(nn.Sequential(layer), built=True)
    with pytest.raises(TypeError, match="built must be a bool, got str"):
        fastbn.revert(nn.Sequential(fastbn.BatchNorm2d(3)), built="yes")


# ---------------------------------------------------------------------------------------------
# State: state_dict both ways, functional_call


@pytest.mark.parametrize("level", FUSE_LEVELS)
@pytest.mark.parametrize("name", ["resnet", "timm_norm_act"])
def test_state_dict_loads_both_ways_between_converted_and_original(name, level):
    model, shape = zoo_model(name)
    original = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = fastbn.convert(model, fuse=level)
    training_record(converted, shape)  # two steps: new weights and statistics
    original.load_state_dict(converted.state_dict(), strict=True)
    x = make_input(shape, torch.float64)
    assert_matches("original with the converted state", original.eval()(x), converted.eval()(x))
    fresh, _ = zoo_model(name)
    converted.load_state_dict(fresh.state_dict(), strict=True)
    assert_matches("converted with the fresh state", converted(x), fresh.eval()(x))


def test_functional_call_of_a_converted_model_uses_the_given_tensors():
    model, shape = zoo_model("resnet")
    reference = copy.deepcopy(model).eval()
    converted = fastbn.convert(model).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.mul_(1.5)
    tensors = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
    x = make_input(shape, torch.float64)
    output = torch.func.functional_call(converted, tensors, (x,))
    assert_matches("output", output, reference(x))


class FlaggedResidual(nn.Module):
    """A block whose forward reads plain attributes (a flag, a scale) that may change."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.use_residual = True
        self.scale = 1.0

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.use_residual:
            y = y + x * self.scale
        return F.relu(y)


@pytest.mark.parametrize("change", [dict(use_residual=False), dict(scale=0.5)])
def test_graph_fusion_refuses_a_forward_reading_python_attributes_a_trace_would_freeze(change):
    torch.manual_seed(0)
    model = FlaggedResidual().double()
    original = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = fastbn.convert(model, fuse="graph")
    assert type(converted) is FlaggedResidual
    assert "its forward reads self.scale = 1.0, self.use_residual = True" in str(caught[0].message)
    for name, value in change.items():
        setattr(converted, name, value)
        setattr(original, name, value)
    x = make_input((2, 4, 5, 5), torch.float64)
    assert_matches("output after the attribute changed", converted(x), original(x))


class InPlaceIntoInput(nn.Module):
    """A block adding into the tensor its caller passed: the caller sees the change."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x += self.bn(self.conv(x))
        return F.relu(x)


class CallerOfInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 4, 1)
        self.block = InPlaceIntoInput()

    def forward(self, x):
        h = self.stem(x)
        return self.block(h) + h


def test_graph_fusion_refuses_a_forward_adding_in_place_into_its_input():
    torch.manual_seed(0)
    model = CallerOfInPlace().double().eval()
    original = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = fastbn.convert(model, fuse="graph")
    assert "block (InPlaceIntoInput): its forward updates x in place" in str(caught[0].message)
    x = make_input((2, 4, 3, 3), torch.float64)
    with torch.no_grad():
        assert_matches("output", converted(x), original(x))


@pytest.mark.parametrize("residual", [
    torch.zeros(4, 3, 5, 5, dtype=torch.float64, device="meta"),  # another device
    torch.zeros(4, 3, 5, 5, dtype=torch.complex64),  # a complex sum relu cannot take
], ids=["other_device", "complex"])
def test_refused_residual_of_another_dtype_changes_no_state(residual):
    layer = fastbn.BatchNorm2d(3, activation="relu")
    before = {name: (t.clone(), t._version) for name, t in layer.state_dict().items()}
    with pytest.raises((RuntimeError, TypeError), match="residual"):
        layer(make_input((4, 3, 5, 5)), residual=residual)
    for name, t in layer.state_dict().items():
        assert torch.equal(t, before[name][0]) and t._version == before[name][1], name


class TwoFlaggedBlocks(nn.Module):
    """Two blocks of one class, so the second's attribute reads count too."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = FlaggedResidual(), FlaggedResidual()
        self.second.use_residual = False

    def forward(self, x):
        return self.second(self.first(x))


def test_graph_fusion_records_attribute_reads_of_every_instance_of_a_class():
    model = TwoFlaggedBlocks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = fastbn.convert(model, fuse="graph")
    message = str(caught[0].message)
    assert "first.use_residual = True" in message and "second.use_residual = False" in message
    assert type(converted.first) is FlaggedResidual and type(converted.second) is FlaggedResidual
