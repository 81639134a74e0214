"""Tracing and export of converted models: torch.fx (and the tools built on it), ONNX in
both exporters, torch.export, torch.jit.trace, and torch.jit.script's refusal.

Each converted model must compute what the torch original computes; the ONNX graphs must be
the ones torch's own layers give (standard BatchNormalization nodes, not a decomposition).
"""

from __future__ import annotations

import copy
import importlib.util
import io
import warnings

import pytest
import torch
from conftest import DEVICE, _triton_problem
from convert_models import (
    InputResidual,
    assert_same_buffers,
    randomize_batchnorms_,
    zoo_model,
)
from helpers import assert_matches, make_input
from torch import nn

import fastbn
from fastbn.functional import batch_norm

HAS_ONNX = importlib.util.find_spec("onnx") is not None
HAS_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None


class NormFirst(nn.Module):
    """A BatchNorm layer on the input (exporters keep it as BatchNormalization: no conv to
    fold it into), then a conv-BN-add-SiLU residual block."""

    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(4)
        self.block = InputResidual()
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.block(self.bn0(x)))


def norm_first() -> NormFirst:
    torch.manual_seed(0)
    model = NormFirst().to(DEVICE)
    randomize_batchnorms_(model)
    return model.eval()


def converted_copy(model: nn.Module, level: str) -> nn.Module:
    return fastbn.convert(copy.deepcopy(model), fuse=level).eval()


# ---------------------------------------------------------------------------------------------
# torch.fx


@pytest.mark.parametrize("level", ["none", "safe"])
@pytest.mark.parametrize("training", [True, False])
def test_symbolic_trace_records_each_layer_as_one_module_call(level, training):
    model, shape = zoo_model("mobilenet")
    model.train(training)
    reference = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(fastbn.convert(model, fuse=level))
    layers = dict(traced.named_modules())
    calls = [n for n in traced.graph.nodes if n.op == "call_module"
             and isinstance(layers[n.target], fastbn.BatchNorm2d)]
    assert len(calls) == 7
    x = make_input(shape, torch.float64)
    assert_matches("output", traced(x), reference(x))
    assert_same_buffers(traced, reference)


@pytest.mark.parametrize("traced_training", [True, False], ids=["traced_train", "traced_eval"])
def test_symbolic_trace_reads_the_training_flag_when_the_graph_runs(traced_training):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).double()
    model.train(traced_training)
    reference = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(fastbn.convert(model, fuse="safe"))
    for training in (not traced_training, traced_training):
        traced.train(training)
        reference.train(training)
        x = make_input((4, 3, 6, 6), torch.float64)
        assert_matches(f"output, training={training}", traced(x), reference(x))
        assert_same_buffers(traced, reference)


def test_symbolic_trace_of_a_lone_layer_is_one_batch_norm_call():
    traced = torch.fx.symbolic_trace(fastbn.BatchNorm2d(4).double())
    calls = [n for n in traced.graph.nodes if n.op == "call_function" and n.target is batch_norm]
    assert len(calls) == 1
    x = make_input((2, 4, 3, 3), torch.float64)
    assert_matches("output", traced(x), torch.nn.BatchNorm2d(4).double()(x))


def test_fx_tools_run_on_a_converted_model():
    from torch.ao.quantization.quantize_fx import fuse_fx
    from torch.fx.experimental.optimization import fuse

    model, shape = zoo_model("resnet", torch.float32)
    reference = copy.deepcopy(model).eval()
    converted = fastbn.convert(model).eval()
    x = make_input(shape)
    for tool in (fuse, fuse_fx):
        assert_matches(tool.__name__, tool(copy.deepcopy(converted))(x), reference(x))


# ---------------------------------------------------------------------------------------------
# ONNX


def onnx_graph(model: nn.Module, x: torch.Tensor, dynamo: bool):
    """model's ONNX graph (the ModelProto) from one of the two exporters."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        if dynamo:
            return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.skipif(not HAS_ONNX, reason="onnx is not installed")
@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("level", ["none", "graph"])
def test_onnx_export_writes_the_operators_torch_writes(level, dynamo):
    if dynamo and not HAS_ONNXSCRIPT:
        pytest.skip("onnxscript is not installed")
    from onnx.reference import ReferenceEvaluator

    model = norm_first()
    converted = converted_copy(model, level)
    x = make_input((2, 4, 6, 6))
    expected = onnx_graph(model, x, dynamo)
    graph = onnx_graph(converted, x, dynamo)
    operators = [node.op_type for node in graph.graph.node]
    assert operators == [node.op_type for node in expected.graph.node]
    assert "BatchNormalization" in operators
    (output,) = ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: x.cpu().numpy()})
    assert_matches("onnx output", torch.from_numpy(output), model(x))


# ---------------------------------------------------------------------------------------------
# torch.export, torch.jit


@pytest.mark.parametrize("level", ["none", "graph"])
def test_torch_export_and_jit_trace_compute_what_the_original_does(level):
    model, shape = zoo_model("resnet", torch.float32)
    model.eval()
    converted = converted_copy(model, level)
    x = make_input(shape)
    exported = torch.export.export(converted, (x,)).module()
    assert_matches("torch.export", exported(x), model(x))
    for grad_mode in (torch.no_grad(), torch.enable_grad()):
        with warnings.catch_warnings(), grad_mode:
            warnings.simplefilter("ignore")  # TracerWarnings from the shape checks
            traced = torch.jit.trace(converted, (x,))
        assert_matches("torch.jit.trace", traced(x), model(x))


@pytest.mark.parametrize("training", [True, False])
def test_a_saved_jit_trace_holds_for_other_sizes_layouts_and_strides(training):
    """A converted model traced at one small NCHW size (its TracerWarnings notwithstanding),
    saved and loaded, computes what torch's model computes at a larger size, in
    channels_last and on a strided view, running statistics included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).train(training)
    randomize_batchnorms_(model)
    converted = fastbn.convert(copy.deepcopy(model), fuse="safe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from the shape checks
        traced = torch.jit.trace(converted, (make_input((2, 3, 4, 4)),), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    loaded.load_state_dict(model.state_dict())  # (before the update tracing ran)
    for x in (make_input((8, 3, 32, 32)) * 3 + 100,
              make_input((4, 3, 16, 16)).to(memory_format=torch.channels_last),
              make_input((2, 3, 16, 16))[:, :, ::2, ::3]):
        assert_matches("output", loaded(x), model(x))
        assert loaded(x).stride() == model(x).stride()
    expected = dict(model.named_buffers())
    for name, buffer_ in loaded.state_dict().items():
        if buffer_.is_floating_point() and name in expected:
            assert_matches(name, buffer_, expected[name])


@pytest.mark.parametrize("level", ["none", "graph"])
def test_torch_export_in_training_mode_trains_like_the_original(level):
    """A converted model exported in train mode (e.g. for quantization-aware training) runs
    a training step as torch's model does: output, running statistics and step counters,
    and the gradients of the input and of every parameter (the exported graph holds the
    statistics op and the differentiable normalize, not the one mutating training op, which
    has no autograd formula)."""
    model, shape = zoo_model("resnet", torch.float32)
    randomize_batchnorms_(model)
    model.train()
    converted = fastbn.convert(copy.deepcopy(model), fuse=level).train()
    x = make_input(shape)
    exported = torch.export.export(converted, (x,)).module()
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.fastbn.batch_norm_train_.default not in targets
    runs = []
    for net in (model, exported):
        leaf = x.clone().requires_grad_(True)
        y = net(leaf)
        params = [p for _, p in sorted(net.named_parameters())]
        grads = torch.autograd.grad(y, [leaf, *params], torch.ones_like(y))
        runs.append((y, grads, dict(net.named_buffers())))
    (y_torch, grads_torch, buffers_torch), (y, grads, buffers) = runs
    assert_matches("output", y, y_torch)
    for index, (grad, grad_torch) in enumerate(zip(grads, grads_torch, strict=True)):
        assert_matches(f"gradient {index}", grad, grad_torch)
    assert sorted(buffers) == sorted(buffers_torch)
    for name, buffer in buffers.items():
        if buffer.is_floating_point():
            assert_matches(name, buffer, buffers_torch[name])
        else:
            assert torch.equal(buffer, buffers_torch[name]), name


def _fastbn_backends(graph: torch.fx.Graph | torch._C.Graph) -> set[str]:
    """The backend argument (the last) of every fastbn op in an export or jit.trace graph."""
    if isinstance(graph, torch.fx.Graph):
        return {node.args[-1] for node in graph.nodes
                if node.op == "call_function" and str(node.target).startswith("fastbn.")}
    return {node.inputsAt(node.inputsSize() - 1).toIValue() for node in graph.nodes()
            if node.kind().startswith("fastbn::")}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_exported_and_traced_programs_pick_the_backend_when_they_run(training, backend,
                                                                     monkeypatch):
    """A program made by torch.export or torch.jit.trace records backend "auto" in every
    fastbn op, whatever ran while it was made (a program exported on a GPU machine must run
    on a CPU one, and the other way round), and each op picks its implementation when it
    runs: the backend in force then, by the tensors' device, use_backend and FASTBN_BACKEND,
    as an eager call does. Made under one backend, run under the other: torch's results."""
    model, shape = zoo_model("resnet", torch.float32)
    randomize_batchnorms_(model)
    model.train(training)
    x = make_input(shape)
    converted = fastbn.convert(copy.deepcopy(model), fuse="graph").train(training)
    exported = torch.export.export(copy.deepcopy(converted), (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from the shape checks
        traced = torch.jit.trace(copy.deepcopy(converted), (x,), check_trace=False)
    assert _fastbn_backends(exported.graph) == {"auto"}
    assert _fastbn_backends(traced.inlined_graph) == {"auto"}
    other = "torch" if backend == "triton" else "triton"
    if other == "triton" and _triton_problem():
        pytest.skip(_triton_problem())
    ran = []
    implementation = fastbn.ops.implementation
    monkeypatch.setattr(fastbn.ops, "implementation",
                        lambda name: ran.append(name) or implementation(name))
    # torch's model in the state each program starts from: jit.trace ran the forward once.
    references = {"torch.export": copy.deepcopy(model), "torch.jit.trace": copy.deepcopy(model)}
    references["torch.jit.trace"](x)
    for name, program in (("torch.export", exported.module()), ("torch.jit.trace", traced)):
        ran.clear()
        with fastbn.use_backend(other):
            assert_matches(name, program(x), references[name](x))
        assert set(ran) == {other}, name
        assert_same_buffers(program, references[name])


class FusedBlock(nn.Module):
    """relu-family(BN(x) + z) as one fastbn layer (``fused``) or torch's layers."""

    def __init__(self, activation: str, fused: bool):
        super().__init__()
        self.activation, self.fused = activation, fused
        self.bn = (fastbn.BatchNorm2d(4, activation=activation) if fused
                   else nn.BatchNorm2d(4))

    def forward(self, x, z):
        if self.fused:
            return self.bn(x, residual=z)
        u = self.bn(x) + z
        return {"relu": torch.relu, "relu6": nn.functional.relu6,
                "leaky_relu": nn.functional.leaky_relu}[self.activation](u)


@pytest.mark.parametrize("activation", ["relu", "relu6", "leaky_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_with_dynamic_spatial_sizes_down_to_two_by_two(activation, training):
    """torch.export with a dynamic H = W whose range reaches 2 x 2 (8 positions or fewer: a
    packed activation mask of one byte per row, whose contiguity check used to add a guard
    the range violates) exports a fused relu-family layer with a residual as torch's
    layers export, and the program computes what they compute at 2 x 2 and 7 x 7 (in
    training, the input's and the parameters' gradients too)."""
    torch.manual_seed(0)
    reference = FusedBlock(activation, fused=False).to(DEVICE).train(training)
    randomize_batchnorms_(reference)
    fused = FusedBlock(activation, fused=True).to(DEVICE).train(training)
    fused.bn.load_state_dict(reference.bn.state_dict())
    side = torch.export.Dim("side", min=2, max=16)
    shapes = {"x": {2: side, 3: side}, "z": {2: side, 3: side}}
    x, z = make_input((2, 4, 6, 6)), make_input((2, 4, 6, 6), seed=1)
    program = torch.export.export(copy.deepcopy(fused), (x, z), dynamic_shapes=shapes).module()
    for size in (2, 7):
        x, z = make_input((2, 4, size, size), seed=size), make_input((2, 4, size, size))
        runs = []
        for net in (reference, program):
            leaf = x.clone().requires_grad_(True)
            y = net(leaf, z)
            params = [p for _, p in sorted(net.named_parameters())]
            runs.append((y, torch.autograd.grad(y, [leaf, *params], torch.ones_like(y))))
        (y_torch, grads_torch), (y, grads) = runs
        assert_matches(f"output at {size} x {size}", y, y_torch)
        for index, (grad, grad_torch) in enumerate(zip(grads, grads_torch, strict=True)):
            assert_matches(f"gradient {index} at {size} x {size}", grad, grad_torch)


def test_compiled_graph_fused_model_trains_like_the_original():
    torch.manual_seed(0)
    model = InputResidual().to(DEVICE)
    randomize_batchnorms_(model)
    reference = copy.deepcopy(model)
    converted = fastbn.convert(model, fuse="graph")
    compiled = torch.compile(converted, fullgraph=True)
    x = make_input((2, 4, 6, 6))
    assert_matches("compiled output", compiled(x), reference(x))
    assert_same_buffers(converted, reference)


def test_jit_script_is_refused_with_the_way_out_and_works_after_revert():
    model, shape = zoo_model("resnet", torch.float32)
    model.eval()
    converted = converted_copy(model, "none")
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile.*fastbn\.revert"):
        torch.jit.script(converted)
    assert type(converted.bn1) is fastbn.BatchNorm2d  # scripting changed nothing
    scripted = torch.jit.script(fastbn.revert(converted))
    x = make_input(shape)
    assert torch.equal(scripted(x), model(x))
