"""fastbn.convert: swap torch BatchNorm layers for fastbn's and fuse activations and adds.

The models are small torchvision-style ResNets from tests/convert_models.py. Each
converted model is run side by side with an untouched deep copy of the original: outputs,
gradients and running statistics must agree within tests/helpers.py's tolerance for the
dtype. Fusion is asked for explicitly (``fuse="safe"`` or ``"graph"``) where it is tested.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from convert_models import (
    BasicBlock,
    BatchNormAct2d,
    Bottleneck,
    DataDependent,
    InputResidual,
    TrainingBranch,
    Wrapper,
    assert_same_outputs,
    converted_pair,
    fused_layers,
    residual_calls,
    resnet,
)
from helpers import assert_matches, make_input, torch_batch_norm
from torch import nn

import fastbn

# ---------------------------------------------------------------------------------------------
# Numerics: the converted model computes what the original did


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_converted_resnet_matches_original_in_train_and_eval(backend, device, block):
    converted, reference = converted_pair(resnet(block), device)
    for step in range(2):
        x = make_input((2, 3, 32, 32), seed=step, device=device)
        grad_out = make_input((2, 5), seed=10 + step, device=device)
        results = []
        for model in (converted, reference):
            x_leaf = x.clone().requires_grad_(True)
            output = model(x_leaf)
            output.backward(grad_out)
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
            results.append((output, x_leaf.grad, grads))
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
                    p.grad = None
        (output, x_grad, grads), (ref_output, ref_x_grad, ref_grads) = results
        assert_matches(f"step {step} output", output, ref_output)
        assert_matches(f"step {step} input grad", x_grad, ref_x_grad)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            assert_matches(f"step {step} grad of {name}", grad, ref_grads[name])
    ref_buffers = dict(reference.named_buffers())
    for name, buffer in converted.named_buffers():
        if buffer.is_floating_point():
            assert_matches(name, buffer, ref_buffers[name])
        else:
            assert torch.equal(buffer, ref_buffers[name]), name
    converted.eval()
    reference.eval()
    x = make_input((2, 3, 32, 32), seed=5, device=device)
    assert_matches("eval output", converted(x), reference(x))


def test_double_model_stays_double_and_matches(device):
    converted, reference = converted_pair(resnet().double(), device)
    assert {p.dtype for p in converted.parameters()} == {torch.float64}
    assert {p.device for p in converted.parameters()} == {device}
    assert_same_outputs(converted, reference, make_input((2, 3, 16, 16), torch.float64))


def test_argument_keeps_computing_the_same_after_its_root_is_replaced(device):
    model = resnet().to(device).eval()
    reference = copy.deepcopy(model)
    converted = fastbn.convert(model, fuse="graph")
    assert converted is not model
    assert_same_outputs(model, reference, make_input((2, 3, 16, 16), device=device))


# ---------------------------------------------------------------------------------------------
# State: the same tensors under the same names


def test_converted_model_holds_the_original_parameters_and_buffers():
    model = resnet(Bottleneck)
    parameters, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    keys = list(model.state_dict())
    converted = fastbn.convert(model)
    assert list(converted.state_dict()) == keys
    assert dict(converted.named_parameters()).keys() == parameters.keys()
    for name, parameter in converted.named_parameters():
        assert parameter is parameters[name], name
    for name, buffer in converted.named_buffers():
        assert buffer is buffers[name], name


def test_every_batchnorm_becomes_a_fastbn_layer():
    converted = fastbn.convert(resnet(Bottleneck))
    layers = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(layers) == 12
    assert all(type(m) is fastbn.BatchNorm2d for m in layers)


@pytest.mark.parametrize(
    "options",
    [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None, "eps": 1e-3},
     {"bias": False}],
)
def test_root_batchnorm_is_replaced_keeping_options_tensors_and_qconfig(options):
    layer = torch_batch_norm(nn.BatchNorm2d, 6, **options)
    layer.qconfig = "qconfig marker"
    layer.eval()
    swapped = fastbn.convert(layer)
    assert type(swapped) is fastbn.BatchNorm2d
    for name in ("eps", "momentum", "affine", "track_running_stats", "training", "qconfig"):
        assert getattr(swapped, name) == getattr(layer, name), name
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(swapped, name) is getattr(layer, name), name
    assert list(swapped.state_dict()) == list(layer.state_dict())


def test_training_flags_are_kept():
    model = resnet()
    model.eval()
    model.layer1[0].bn1.train()
    flags = {name: m.training for name, m in model.named_modules()}
    converted = fastbn.convert(model)
    assert converted.training is False
    for name, module in converted.named_modules():
        assert module.training is flags[name], name


def test_deep_copy_of_converted_model_keeps_keys_and_results():
    converted = fastbn.convert(resnet()).eval()
    duplicate = copy.deepcopy(converted)
    assert list(duplicate.state_dict()) == list(converted.state_dict())
    assert_same_outputs(duplicate, converted, make_input((2, 3, 16, 16)))


# ---------------------------------------------------------------------------------------------
# Fusion


def test_resnet_activations_and_residual_adds_are_fused():
    converted = fastbn.convert(resnet(BasicBlock, layers=(2, 1)), fuse="graph")
    assert isinstance(converted, torch.fx.GraphModule)
    blocks = ["layer1.0", "layer1.1", "layer2.0"]
    expected = {"bn1": "relu"} | {f"{b}.{bn}": "relu" for b in blocks for bn in ("bn1", "bn2")}
    assert fused_layers(converted) == expected
    assert residual_calls(converted) == [f"{b}.bn2" for b in blocks]
    assert "layer2.0.downsample.1" not in fused_layers(converted)


def test_bottleneck_fuses_module_functional_and_torch_relu():
    converted = fastbn.convert(resnet(Bottleneck, layers=(1, 1)), fuse="graph")
    blocks = ["layer1.0", "layer2.0"]
    expected = {"bn1": "relu"} | {f"{b}.bn{i}": "relu" for b in blocks for i in (1, 2, 3)}
    assert fused_layers(converted) == expected
    assert residual_calls(converted) == [f"{b}.bn3" for b in blocks]


def test_residual_fusion_is_shown_in_the_graph_module_code():
    converted = fastbn.convert(resnet(), fuse="graph")
    assert 'getattr(self.layer1, "0").bn2(layer1_0_conv2, residual = maxpool)' in converted.code
    assert "activation=relu" in repr(converted.layer1[0].bn2)


@pytest.mark.parametrize(
    ("activation", "name", "slope"),
    [(nn.ReLU(inplace=True), "relu", 0.01), (nn.ReLU6(), "relu6", 0.01),
     (nn.LeakyReLU(0.2), "leaky_relu", 0.2), (nn.SiLU(), "silu", 0.01),
     (nn.Hardswish(), "hardswish", 0.01)],
)
def test_sequential_activation_is_folded_into_the_layer(device, activation, name, slope):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), activation)
    converted, reference = converted_pair(model, device, fuse="safe")
    assert converted is model
    assert (converted[1].activation, converted[1].negative_slope) == (name, slope)
    assert type(converted[2]) is nn.Identity
    assert list(converted.state_dict()) == list(reference.state_dict())
    assert_same_outputs(converted, reference, make_input((2, 3, 8, 8), device=device))


def test_mlp_batchnorm1d_takes_the_following_relu(device):
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    converted, reference = converted_pair(model, device, fuse="safe")
    assert type(converted[1]) is fastbn.BatchNorm1d
    assert converted[1].activation == "relu"
    assert type(converted[2]) is nn.Identity
    assert_same_outputs(converted, reference, make_input((4, 6), device=device))


@pytest.mark.parametrize(
    ("write", "expected"),
    [(lambda y: F.leaky_relu(y, 0.3), ("leaky_relu", 0.3)),
     (lambda y: F.relu6(y), ("relu6", 0.01)),
     (lambda y: F.hardswish(y), ("hardswish", 0.01)),
     (lambda y: y.relu(), ("relu", 0.01))],
)
def test_functional_activation_is_fused_with_its_arguments(device, write, expected):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return write(self.bn(x))

    converted, reference = converted_pair(Model(), device, fuse="graph")
    bn = converted.get_submodule("bn")
    assert (bn.activation, bn.negative_slope) == expected
    assert_same_outputs(converted, reference, make_input((5, 4), device=device))


def test_shared_relu_module_is_fused_per_call_site(device):
    class Block(BasicBlock):
        def forward(self, x):
            return super().forward(self.relu(x - 0.5))

    converted, reference = converted_pair(Block(4, 4), device, fuse="graph")
    assert fused_layers(converted) == {"bn1": "relu", "bn2": "relu"}
    relu_calls = [n for n in converted.graph.nodes if n.op == "call_module" and n.target == "relu"]
    assert len(relu_calls) == 1  # the call on the block's input stays
    assert_same_outputs(converted, reference, make_input((2, 4, 6, 6), device=device))


def test_add_without_activation_fuses_the_residual(device):
    class InvertedResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1),
                nn.BatchNorm2d(4),
            )

        def forward(self, x):
            return x + self.conv(x)

    converted, reference = converted_pair(InvertedResidual(), device, fuse="graph")
    assert residual_calls(converted) == ["conv.4"]
    assert fused_layers(converted) == {"conv.1": "relu6"}
    assert_same_outputs(converted, reference, make_input((2, 4, 5, 5), device=device))


def test_add_of_a_parameter_is_not_taken_for_a_residual(device):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.offset = nn.Parameter(torch.linspace(-1, 1, 4).view(4, 1, 1))

        def forward(self, x):
            return F.relu(self.bn(x) + self.offset)

    converted, reference = converted_pair(Model(), device, fuse="graph")
    assert residual_calls(converted) == []
    assert_same_outputs(converted, reference, make_input((2, 4, 5, 5), device=device))


def test_batchnorm_output_with_another_use_is_not_fused(device):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(x)
            return F.relu(y) + y

    converted, reference = converted_pair(Model(), device, fuse="graph")
    assert fused_layers(converted) == {}
    assert type(converted.bn) is fastbn.BatchNorm2d
    assert_same_outputs(converted, reference, make_input((2, 4, 5, 5), device=device))


def test_add_written_into_the_other_operand_is_not_fused(device):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            skip = x * 1
            skip.add_(self.bn(x))
            return torch.relu(skip), skip

    converted, reference = converted_pair(Model(), device, fuse="graph")
    assert residual_calls(converted) == []
    x = make_input((2, 4, 5, 5), device=device)
    for output, expected in zip(converted(x), reference(x), strict=True):
        assert_matches("output", output, expected)


def test_batchnorm_with_hooks_keeps_them_and_is_not_fused(device):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    seen = []
    model[1].register_forward_pre_hook(lambda module, args: seen.append("pre"))
    handle = model[1].register_forward_hook(lambda module, args, output: seen.append("post"))
    converted, reference = converted_pair(model, device, fuse="safe")
    assert type(converted[1]) is fastbn.BatchNorm2d
    assert converted[1].activation is None
    assert type(converted[2]) is nn.ReLU
    x = make_input((2, 3, 6, 6), device=device)
    assert_same_outputs(converted, reference, x)
    assert seen == ["pre", "post", "pre", "post"]  # converted, then the deep copy
    handle.remove()
    converted(x)
    assert seen[4:] == ["pre"]


def test_container_with_hooks_is_kept_whole_and_fused_inside(device):
    model = resnet()
    calls = []
    model.layer1.register_forward_hook(lambda module, args, output: calls.append(module))
    converted, reference = converted_pair(model, device, fuse="graph")
    assert type(converted.layer1) is nn.Sequential
    assert all(isinstance(block, torch.fx.GraphModule) for block in converted.layer1)
    assert residual_calls(converted) == ["layer2.0.bn2", "bn2", "bn2"]
    calls.clear()
    assert_same_outputs(converted, reference, make_input((2, 3, 16, 16), device=device))
    assert calls == [converted.layer1, reference.layer1]


def test_inlined_containers_stay_indexable_but_refuse_to_run_alone():
    converted = fastbn.convert(resnet(), fuse="graph")
    assert isinstance(converted.layer1[0], BasicBlock)
    assert converted.layer1[0].bn2.activation == "relu"
    with pytest.raises(RuntimeError, match="inlined this BasicBlock's forward"):
        converted.layer1[0](make_input((2, 8, 4, 4)))


def test_root_with_patterns_only_in_submodules_keeps_its_class(device):
    converted, reference = converted_pair(Wrapper(), device, fuse="graph")
    assert type(converted) is Wrapper
    assert converted.describe() == "wrapper"
    assert isinstance(converted.block, torch.fx.GraphModule)
    assert residual_calls(converted) == ["bn2"]
    assert_same_outputs(converted, reference, make_input((2, 3, 6, 6), device=device))


def test_converting_twice_changes_nothing():
    converted = fastbn.convert(resnet(), fuse="graph")
    code, keys, fused = converted.code, list(converted.state_dict()), fused_layers(converted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = fastbn.convert(converted, fuse="graph")
    assert again is converted
    assert (again.code, list(again.state_dict()), fused_layers(again)) == (code, keys, fused)


def test_fuse_false_only_swaps():
    model = resnet()
    converted = fastbn.convert(model, fuse=False)
    assert converted is model
    assert fused_layers(converted) == {}
    assert type(converted.bn1) is fastbn.BatchNorm2d


# ---------------------------------------------------------------------------------------------
# What is left alone, and why it is said


def test_untraceable_model_is_swapped_and_warns_once(device):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted, reference = converted_pair(DataDependent(), device, fuse="graph")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "DataDependent" in message
    assert "TraceError" in message
    assert type(converted) is DataDependent
    assert converted.features[1].activation == "relu"
    assert type(converted.features[2]) is nn.Identity
    assert residual_calls(converted) == ["bn2"]  # the block on its own traces
    assert_same_outputs(converted, reference, make_input((2, 3, 6, 6), device=device))


def test_forward_that_depends_on_training_is_not_frozen(device):
    with pytest.warns(UserWarning, match="depends on self.training"):
        converted, reference = converted_pair(TrainingBranch(), device, fuse="graph")
    assert type(converted.bn) is fastbn.BatchNorm2d
    assert fused_layers(converted) == {}
    converted.eval()
    reference.eval()
    assert_same_outputs(converted, reference, make_input((2, 3, 5, 5), device=device))


def test_sync_batchnorm_is_left_alone_with_a_warning():
    model = nn.Sequential(nn.SyncBatchNorm(4), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"0 \(SyncBatchNorm\): .* with sync=True only"):
        converted = fastbn.convert(model)
    assert type(converted[0]) is nn.SyncBatchNorm
    assert type(converted[1]) is fastbn.BatchNorm2d


def test_subclass_with_its_own_forward_is_left_alone_with_a_warning():
    class Scaled(nn.BatchNorm2d):
        def forward(self, input):
            return 2 * super().forward(input)

    class Tagged(nn.BatchNorm2d):
        pass

    with pytest.warns(UserWarning, match=r"0 \(Scaled\): its class has its own forward"):
        converted = fastbn.convert(nn.Sequential(Scaled(4), Tagged(4)))
    assert type(converted[0]) is Scaled
    assert type(converted[1]) is fastbn.BatchNorm2d


class _FrozenStatistics(nn.BatchNorm2d):
    """A detection backbone's frozen BatchNorm: train() keeps it in eval."""

    def train(self, mode=True):
        return super().train(False)


class _OldCheckpoints(nn.BatchNorm2d):
    """Loads checkpoints that name the affine parameters gamma and beta."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in (("gamma", "weight"), ("beta", "bias")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _ZeroInit(nn.BatchNorm2d):
    def reset_parameters(self):
        super().reset_parameters()
        nn.init.zeros_(self.weight)


class _FrozenMixin:
    def train(self, mode=True):
        return super().train(False)


class _MixedIn(_FrozenMixin, nn.BatchNorm2d):
    pass


@pytest.mark.parametrize("layer_class, defines", [
    (_FrozenStatistics, "train"), (_OldCheckpoints, "_load_from_state_dict"),
    (_ZeroInit, "reset_parameters"), (_MixedIn, "train"),
], ids=["train", "load_from_state_dict", "reset_parameters", "mixin"])
def test_subclass_whose_class_defines_methods_is_left_alone_with_a_warning(layer_class,
                                                                          defines):
    """A swap to fastbn's class would drop the subclass's methods (a frozen BN would train
    and update its running statistics): such a layer stays, named with what it defines."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layer_class(4))
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=rf"1 \({layer_class.__name__}\): its class defines "
                                         rf"{defines}, which the fastbn layer would not keep"):
        converted = fastbn.convert(model)
    assert type(converted[1]) is layer_class
    x = make_input((2, 3, 6, 6))
    converted.train()
    reference.train()
    assert_matches("output", converted(x), reference(x))
    assert converted[1].training == reference[1].training
    assert torch.equal(converted[1].running_mean, reference[1].running_mean)


def test_frozen_statistics_layer_keeps_its_running_statistics_in_a_converted_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), _FrozenStatistics(4))
    with pytest.warns(UserWarning, match="its class defines train"):
        converted = fastbn.convert(model).train()
    before = converted[2].running_mean.clone()
    converted(make_input((2, 3, 6, 6), offset=2.0))
    assert type(converted[1]) is fastbn.BatchNorm2d
    assert not converted[2].training
    assert torch.equal(converted[2].running_mean, before)


def test_sync_convert_leaves_a_fastbn_subclass_that_defines_methods_with_a_warning():
    class Frozen(fastbn.BatchNorm2d):
        def train(self, mode=True):
            return super().train(False)

    layer = Frozen(3)
    with pytest.warns(UserWarning, match=r"0 \(Frozen\): its class defines train"):
        converted = fastbn.convert(nn.Sequential(layer), sync=True)
    assert converted[0] is layer


class _ScaledFast(fastbn.BatchNorm2d):
    """A user's subclass of a fastbn layer whose forward computes more than BatchNorm."""

    def forward(self, input, residual=None):
        return 3 * super().forward(input, residual) - 1


class _ExtraBuffer(fastbn.BatchNorm2d):
    def __init__(self, num_features):
        super().__init__(num_features)
        self.register_buffer("scale", torch.full((num_features,), 2.0))


@pytest.mark.parametrize("layer_class", [_ScaledFast, _ExtraBuffer])
def test_sync_convert_leaves_a_fastbn_subclass_with_its_own_forward_or_buffers(layer_class):
    """convert(sync=True) keeps a user's subclass of fastbn.BatchNorm2d with a forward or
    buffers of its own, as it keeps such subclasses of torch's (it used to swap it for a
    SyncBatchNorm, which dropped the forward)."""
    layer = layer_class(3)
    reason = ("its class has its own forward" if layer_class is _ScaledFast
              else "it holds parameters or buffers of its own")
    with pytest.warns(UserWarning, match=rf"0 \({layer_class.__name__}\): {reason}"):
        converted = fastbn.convert(nn.Sequential(layer), sync=True)
    assert converted[0] is layer


class _ScaledBlock(nn.Module):
    """relu(bn(conv(x)) + x) and bn2 -> ReLU in a Sequential, bn and bn2 _ScaledFast."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = _ScaledFast(4)
        self.tail = nn.Sequential(_ScaledFast(4), nn.ReLU())

    def forward(self, x):
        return self.tail(torch.relu(self.bn(self.conv(x)) + x))


@pytest.mark.parametrize("level", ["safe", "graph"])
def test_fusing_levels_leave_a_fastbn_subclass_with_its_own_forward_unfused(level):
    """An activation or a residual is never taken into a user's subclass of a fastbn layer
    whose forward does more than BatchNorm: the converted model computes what it did (the
    fused layer used to apply its own forward's extra steps after the activation)."""
    torch.manual_seed(0)
    model = _ScaledBlock().eval()
    x = make_input((2, 4, 3, 3))
    before = model(x)
    converted = fastbn.convert(model, fuse=level)
    assert all(m.activation is None for m in converted.modules() if isinstance(m, _ScaledFast))
    assert torch.equal(converted(x), before)


class _LambdaForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    forward = lambda self, x: torch.relu(self.bn(x))  # noqa: E731 (what is tested)


def test_graph_fuse_leaves_a_module_whose_forward_is_a_lambda_with_a_warning(device):
    with pytest.warns(UserWarning, match="its forward is not a def statement"):
        converted, reference = converted_pair(_LambdaForward(), device, fuse="graph")
    assert type(converted) is _LambdaForward
    assert type(converted.bn) is fastbn.BatchNorm2d
    assert_same_outputs(converted, reference, make_input((2, 4, 5, 5), device=device))


@pytest.mark.parametrize("fuse", ["none", "safe", "graph"])
def test_revert_keeps_what_was_set_on_a_layer_after_convert(device, fuse):
    """The layer a user reaches after convert is what the model runs (under "graph", a fused
    copy): its momentum, eps and hooks come back with revert."""
    model = fastbn.convert(InputResidual().to(device), fuse=fuse)
    model.bn.momentum, model.bn.eps = 0.5, 1e-3
    calls = []
    model.bn.register_forward_hook(lambda *args: calls.append(1))
    reverted = fastbn.revert(model)
    reverted(make_input((2, 4, 5, 5), device=device))
    assert type(reverted.bn) is nn.BatchNorm2d
    assert (reverted.bn.momentum, reverted.bn.eps, len(calls)) == (0.5, 1e-3, 1)


def test_state_dict_hooks_carry_over_through_convert_and_revert():
    """A layer's state_dict and load_state_dict hooks are hooks too: they come with it."""
    def add_extra(module, state_dict, prefix, local_metadata):
        state_dict[prefix + "extra"] = torch.ones(1)

    def drop_extra(state_dict, prefix, *args):
        state_dict.pop(prefix + "extra", None)

    loaded = []
    layer = nn.BatchNorm2d(3)
    layer._register_state_dict_hook(add_extra)
    layer._register_load_state_dict_pre_hook(drop_extra)
    layer.register_load_state_dict_post_hook(lambda module, keys: loaded.append(1))
    checkpoint = nn.Sequential(layer).state_dict()
    converted = fastbn.convert(nn.Sequential(layer))
    assert type(converted[0]) is fastbn.BatchNorm2d
    assert "0.extra" in converted.state_dict()
    converted.load_state_dict(checkpoint)  # strict: the pre-hook takes "extra" out
    reverted = fastbn.revert(converted)
    assert type(reverted[0]) is nn.BatchNorm2d
    assert "0.extra" in reverted.state_dict()
    reverted.load_state_dict(checkpoint)
    assert loaded == [1, 1]


def test_revert_keeps_attributes_set_on_the_layer_after_convert():
    """Freezing the running statistics after convert (track_running_stats=False) must
    survive revert, as must an attribute of the user's."""
    model = fastbn.convert(nn.Sequential(nn.BatchNorm2d(3))).train()
    model[0].track_running_stats = False
    model[0].tag = "frozen"
    reverted = fastbn.revert(model)
    reverted(make_input((2, 3, 4, 4), offset=1.0))
    assert type(reverted[0]) is nn.BatchNorm2d
    assert reverted[0].track_running_stats is False and reverted[0].tag == "frozen"
    assert torch.equal(reverted[0].running_mean, torch.zeros(3))


class _Tagged(nn.BatchNorm2d):
    def __init__(self, num_features, zero_init=False):
        super().__init__(num_features)
        self.zero_init = zero_init


def test_convert_keeps_the_attributes_a_layer_holds_of_its_own():
    """A flag set by a subclass's __init__ or on the layer (weight-decay exemptions,
    zero-init markers that training code reads) is there on the fastbn layer, the same
    object; the class becomes fastbn's (isinstance of the subclass is False) and revert
    gives it back."""
    model = nn.Sequential(_Tagged(4, zero_init=True), nn.BatchNorm2d(4))
    groups = {"decay": False}
    model[1].no_weight_decay = groups
    converted = fastbn.convert(model)
    assert type(converted[0]) is fastbn.BatchNorm2d and converted[0].zero_init is True
    assert converted[1].no_weight_decay is groups
    reverted = fastbn.revert(converted)
    assert type(reverted[0]) is _Tagged and reverted[0].zero_init is True
    assert reverted[1].no_weight_decay is groups


def test_convert_runs_none_of_the_users_hooks():
    """Probing a BatchNormAct layer's forward (on copies, with a made-up input) calls no
    hook of the user's; the swapped layer keeps its hooks and calls them on real calls."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8))
    seen = []
    model[1].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    model[1].register_forward_pre_hook(lambda module, args: seen.append("pre"))
    converted = fastbn.convert(model)
    assert isinstance(converted[1], fastbn.BatchNorm2d) and seen == []
    converted(make_input((2, 3, 6, 6)))
    assert seen == ["pre", torch.Size([2, 8, 4, 4])]


def test_lazy_layer_is_left_with_a_warning_until_its_first_forward():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.warns(UserWarning, match=r"1 \(LazyBatchNorm2d\): a lazy layer takes its "
                                         r"shape at its first forward"):
        converted = fastbn.convert(model)
    assert type(converted[1]) is nn.LazyBatchNorm2d
    converted(make_input((2, 3, 4, 4)))
    assert type(fastbn.convert(converted)[1]) is fastbn.BatchNorm2d


def test_process_group_without_sync_is_rejected():
    with pytest.raises(ValueError, match="process_group is only used with sync=True"):
        fastbn.convert(resnet(), process_group=object())


def test_broadcasting_add_fused_as_a_residual_computes_what_torch_does(device):
    class SqueezeAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            squeezed = x.mean((2, 3), keepdim=True)
            return F.relu(self.bn(x) + squeezed)

    converted, reference = converted_pair(SqueezeAdd(), device, fuse="graph")
    assert residual_calls(converted) == ["bn"]
    assert_same_outputs(converted, reference, make_input((2, 4, 5, 5), device=device))


def test_tensor_made_in_forward_stays_off_the_model_and_in_the_graph_module(device):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            scaled = torch.tensor([1.0, 2.0, 3.0, 4.0]).to(x.device).view(4, 1, 1) * x
            return F.relu(self.bn(x) + scaled)

    model = Scaled()
    attributes = set(vars(model))
    converted, reference = converted_pair(model, device, fuse="graph")
    assert set(vars(model)) == attributes
    assert residual_calls(converted) == ["bn"]
    assert_same_outputs(converted, reference, make_input((2, 4, 5, 5), device=device))
    assert set(vars(fastbn.revert(converted))) == attributes


class _Doubled(nn.Module):
    def forward(self, w):
        return w * 2


def test_sync_convert_leaves_a_parametrized_fastbn_layer_with_a_warning():
    # A swap carries _parameters over; a parametrized weight is not there and was lost.
    layer = fastbn.BatchNorm2d(3).eval()
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", _Doubled())
    model = nn.Sequential(layer)
    x = make_input((2, 3, 4, 4))
    expected = model(x)
    with pytest.warns(UserWarning, match="weight is not among its parameters"):
        converted = fastbn.convert(model, sync=True)
    assert converted[0] is layer
    assert_matches("output", converted(x), expected)


def test_revert_refuses_a_layer_parametrized_after_convert_and_changes_nothing():
    model = fastbn.convert(nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3))).eval()
    torch.nn.utils.parametrize.register_parametrization(model[1], "weight", _Doubled())
    x = make_input((2, 3, 4, 4))
    expected = model(x)
    first = model[0]
    with pytest.raises(ValueError, match="weight is not among its parameters"):
        fastbn.revert(model)
    assert model[0] is first and isinstance(model[1], fastbn.BatchNorm2d)
    assert_matches("output", model(x), expected)
