"""fastbn.convert: swap a model's torch BatchNorm layers for fastbn's and fuse around them.

Three steps, none of which changes a parameter, a buffer or a state_dict key:

1. Swap. Each torch.nn.BatchNorm1d/2d/3d (or a subclass that keeps torch's ``forward``)
   becomes the fastbn class of the same rank (with sync=True, it and torch.nn.SyncBatchNorm
   become fastbn.SyncBatchNorm), holding the same Parameter and buffer
   objects, hooks, training flag and qconfig. ``_fastbn_classes`` is the one map from a
   torch class to the fastbn class that replaces it.
2. Fold in nn.Sequential. A fastbn layer directly followed by an activation module takes the
   activation, and the activation's slot becomes nn.Identity, so indices stay.
3. Fuse in traced graphs. torch.fx traces a module with its BatchNorm layers kept as calls
   and finds BN -> activation, BN -> add and BN -> add -> activation; each becomes one call
   ``bn(x, residual=other)`` of a copy of the layer that carries the activation (the copy
   shares every tensor with the layer, which is left as it was, so the module passed in
   keeps computing the same thing). The smallest module whose own forward holds such a
   pattern is replaced by a torch.fx.GraphModule that keeps its submodule tree; a module
   that does not trace is left as it is, and its children are tried in turn.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from fastbn.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm, _FastBatchNorm

# An activation as fastbn layers take it: (activation, negative_slope).
_Activation = tuple[str, float]

_DEFAULT_SLOPE = 0.01
_ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
}
# (function, activation, the arguments it takes after the input); `inplace` is irrelevant
# once fused: the layer writes a fresh output either way.
_ACTIVATION_FUNCTIONS = (
    (F.relu, "relu", ("inplace",)),
    (torch.relu, "relu", ()),
    (torch.relu_, "relu", ()),
    (F.relu6, "relu6", ("inplace",)),
    (F.leaky_relu, "leaky_relu", ("negative_slope", "inplace")),
    (F.silu, "silu", ("inplace",)),
    (F.hardswish, "hardswish", ("inplace",)),
)
_ACTIVATION_METHODS = ("relu", "relu_")
# How fx records `a + b`, `a += b` (both as operator.add for tensors), torch.add and Tensor.add_.
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_IN_PLACE_ADDS = (operator.iadd, "add_")

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_STATE = (
    *_HOOKS,
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_is_full_backward_hook",
)
_STATE_DICT_HOOKS = (
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_STATE_DICT_METHODS = (
    "_save_to_state_dict", "_load_from_state_dict", "get_extra_state", "set_extra_state",
)
_PARAMETERS = ["weight", "bias"]
_BUFFERS = ["running_mean", "running_var", "num_batches_tracked"]


def convert(
    module: nn.Module, *, fuse: bool = True, sync: bool = False, process_group: Any = None
) -> nn.Module:
    """Swap every torch BatchNorm layer of ``module`` for fastbn's and, with fuse, fuse around it.

    The fastbn layers hold the original Parameter and buffer objects (so the device, dtype
    and state_dict keys stay), the training flag, eps, momentum, hooks and qconfig. Layers
    whose class overrides torch's ``forward``, and torch.nn.SyncBatchNorm, are left alone;
    with sync=True every layer, torch.nn.SyncBatchNorm included, becomes a
    fastbn.SyncBatchNorm over ``process_group``.

    fuse=True folds into a fastbn layer that has no hooks (they would see the fused output):
    - the activation module (ReLU, ReLU6, LeakyReLU, SiLU, Hardswish) that follows it in an
      nn.Sequential; that slot becomes nn.Identity;
    - where torch.fx traces the model: an activation (one of those modules, F.relu and the
      like, torch.relu, Tensor.relu) of the layer's output, and an add (``+``, ``+=``,
      torch.add, Tensor.add_) of the layer's output and another computed tensor with the
      activation that may follow, where the layer has one call site and each intermediate
      result no other use. fx records no shapes: the other tensor is taken to have the
      output's shape and dtype, as in residual blocks (a broadcasting add would make the
      layer raise; convert with fuse=False then). The smallest module whose forward holds
      such a pattern is replaced by a torch.fx.GraphModule with the same submodule tree,
      parameters, buffers and state_dict keys, calling ``bn(x, residual=other)``; the
      containers it inlines keep their class and attributes but raise if called alone.
      Modules with hooks or their own state_dict logic are not inlined but rewritten on
      their own; a module that does not trace, or whose forward depends on
      ``self.training`` (a trace would freeze it), keeps its forward, its children are
      tried instead, and one warning per call says which module did not trace and why.

    Converts in place where it can and returns the result, which is a new object when
    ``module`` is itself a BatchNorm layer or was replaced by a GraphModule, so use the
    returned module (``module`` itself then still computes the same, unfused).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fastbn.convert: expected an nn.Module, got {type(module).__name__}")
    if process_group is not None and not sync:
        raise ValueError("fastbn.convert: process_group is only used with sync=True")
    classes = _fastbn_classes(sync)
    extra = {"process_group": process_group} if sync else {}
    module = _swap(module, classes, extra, {})
    if not fuse:
        return module
    _fold_sequentials(module)
    failures: list[str] = []
    for rewrite in _plan(module, "", failures):
        module = _apply(module, rewrite)
    if failures:
        others = f"; {len(failures) - 1} more module(s) did not trace" if len(failures) > 1 else ""
        warnings.warn(
            f"fastbn.convert: torch.fx cannot trace {failures[0]}{others}. Its BatchNorm "
            "layers were swapped and activations in nn.Sequential folded, but activations "
            "and residual adds in its forward were not fused.",
            stacklevel=2,
        )
    return module


# ---------------------------------------------------------------------------------------------
# 1. Swap


def _fastbn_classes(sync: bool) -> dict[type[_BatchNorm], type[_FastBatchNorm]]:
    """The torch BatchNorm classes that convert replaces, each with the fastbn class it uses."""
    if sync:
        torch_classes = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
        return dict.fromkeys(torch_classes, SyncBatchNorm)
    return {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def _swap(
    module: nn.Module, classes: dict, extra: dict[str, Any], done: dict[int, nn.Module]
) -> nn.Module:
    """module with its torch BatchNorm layers (itself included) swapped; shared stays shared."""
    if id(module) in done:
        return done[id(module)]
    target = _fastbn_class(module, classes)
    result = module if target is None else _swapped(module, target, extra)
    done[id(module)] = result
    for name, child in list(module._modules.items()):
        if child is not None:
            swapped = _swap(child, classes, extra, done)
            if swapped is not child:
                module._modules[name] = swapped
    return result


def _fastbn_class(module: nn.Module, classes: dict) -> type[_FastBatchNorm] | None:
    """The class to swap module for, or None where a swap would lose behaviour or state."""
    for torch_class, fastbn_class in classes.items():
        if isinstance(module, torch_class) and not isinstance(module, fastbn_class):
            # torch's forward, or a fastbn layer's (fastbn.BatchNorm2d -> SyncBatchNorm).
            keeps_torch_forward = (
                type(module).forward in (torch_class.forward, _FastBatchNorm.forward)
                and type(module)._check_input_dim is torch_class._check_input_dim
            )
            plain = (
                list(module._parameters) == _PARAMETERS
                and list(module._buffers) == _BUFFERS
                and not module._modules
            )
            return fastbn_class if keeps_torch_forward and plain else None
    return None


def _swapped(layer: _BatchNorm, cls: type[_FastBatchNorm], extra: dict[str, Any]) -> nn.Module:
    """A cls layer with layer's tensors, hooks and flags, as convert_sync_batchnorm does."""
    new = cls(
        layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
        device="meta", **extra,
    )
    for name in _PARAMETERS:
        new._parameters[name] = layer._parameters[name]
    for name in _BUFFERS:
        new._buffers[name] = layer._buffers[name]
    new._non_persistent_buffers_set = set(layer._non_persistent_buffers_set)
    new.training = layer.training
    if isinstance(layer, _FastBatchNorm):
        new.activation, new.negative_slope = layer.activation, layer.negative_slope
    _share_hooks(layer, new)
    if hasattr(layer, "qconfig"):
        new.qconfig = layer.qconfig
    return new


def _share_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give target source's hook dictionaries, so the hooks fire and their handles still work."""
    for name in _HOOK_STATE:
        if name in vars(source):
            target.__dict__[name] = vars(source)[name]


# ---------------------------------------------------------------------------------------------
# 2. Fold in nn.Sequential


def _fold_sequentials(root: nn.Module) -> None:
    """Give each fusible layer the activation module that follows it in an nn.Sequential."""
    paths = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
    for sequential in list(root.modules()):
        if not isinstance(sequential, nn.Sequential):
            continue
        if type(sequential).forward is not nn.Sequential.forward:
            continue
        layers = list(sequential._modules.items())
        for (_, layer), (name, follower) in zip(layers, layers[1:], strict=False):
            activation = _module_activation(follower)
            # A layer reachable another way would take the activation there too.
            if activation is not None and _fusible(layer) and paths[id(layer)] == 1:
                layer.activation, layer.negative_slope = activation
                sequential._modules[name] = nn.Identity()


def _fusible(module: nn.Module | None) -> bool:
    """A fastbn layer that can take an activation and a residual: none yet, and no hooks
    (they would see the fused output)."""
    return (
        isinstance(module, _FastBatchNorm) and module.activation is None and not _has_hooks(module)
    )


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOKS)


def _module_activation(module: nn.Module | None) -> _Activation | None:
    """The activation an activation module computes; None for other modules or with hooks."""
    name = _ACTIVATION_MODULES.get(type(module))
    if name is None or _has_hooks(module):
        return None
    return name, float(getattr(module, "negative_slope", _DEFAULT_SLOPE))


# ---------------------------------------------------------------------------------------------
# 3. Fuse in traced graphs


class _Untraceable(Exception):
    """A module's forward cannot be rewritten from a trace; the message says why."""


@dataclass
class _Fusion:
    target: str  # the layer's path in the traced module
    activation: str | None  # None: a residual only
    negative_slope: float | None  # None: the layer's own
    scope: tuple[str, ...]  # the submodules whose forward holds the pattern; (): the module's


@dataclass
class _Rewrite:
    """Replace the module at path (in the root) by a GraphModule of graph."""

    path: str
    module: nn.Module
    graph: fx.Graph
    traced_through: set[int]  # ids of the modules whose forward the graph inlines
    fusions: list[_Fusion]


class _Tracer(fx.Tracer):
    """Traces through containers, keeping as calls BatchNorm layers and the modules that
    _kept_whole names; records the modules whose forward it inlines."""

    def __init__(self) -> None:
        super().__init__()
        self.traced_through: set[int] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if (
            isinstance(m, _BatchNorm)
            or _kept_whole(m)
            or super().is_leaf_module(m, module_qualified_name)
        ):
            return True
        self.traced_through.add(id(m))
        return False


def _kept_whole(module: nn.Module) -> bool:
    """A module a trace must not inline: its hooks would not fire, its state_dict logic would
    be lost."""
    return not isinstance(module, _BatchNorm) and (
        _has_hooks(module) or _has_own_state_dict(module)
    )


def _has_own_state_dict(module: nn.Module) -> bool:
    return any(
        getattr(type(module), name) is not getattr(nn.Module, name) for name in _STATE_DICT_METHODS
    ) or any(getattr(module, name, None) for name in _STATE_DICT_HOOKS)


def _plan(module: nn.Module, path: str, failures: list[str]) -> list[_Rewrite]:
    """The rewrites in module's subtree: from its own trace, else from its children's."""
    if not any(_fusible(m) for m in module.modules() if m is not module):
        return []
    try:
        rewrites, kept_whole = _plan_traced(module, path)
    except _Untraceable as error:
        failures.append(f"{type(module).__name__} ({error})")
        return [
            rewrite
            for name, child in module.named_children()
            for rewrite in _plan(child, _join(path, name), failures)
        ]
    # The modules the trace kept as calls are rewritten on their own, after (inside) the rest.
    for name, submodule in kept_whole.items():
        rewrites += _plan(submodule, _join(path, name), failures)
    return rewrites


def _plan_traced(
    module: nn.Module, path: str
) -> tuple[list[_Rewrite], dict[str, nn.Module]]:
    """The rewrites from module's trace, at the deepest modules that hold the patterns, and
    the submodules the trace kept whole (see _kept_whole), by name.

    Raises _Untraceable when module itself does not trace.
    """
    graph, traced_through = _trace(module)
    modules = dict(module.named_modules())
    kept_whole = {
        node.target: modules[node.target]
        for node in graph.nodes
        if node.op == "call_module" and _kept_whole(modules[node.target])
    }
    fusions = _fuse_graph(graph, modules)
    here = [_Rewrite(path, module, graph, traced_through, fusions)] if fusions else []
    if not fusions or any(not fusion.scope for fusion in fusions):
        return here, kept_whole
    # Every pattern lies inside a submodule: rewrite those instead, keeping this module's
    # class and forward, unless one of them does not trace (or finds less) on its own.
    rewrites = []
    for name in dict.fromkeys(fusion.scope[0] for fusion in fusions):
        try:
            below, _ = _plan_traced(module.get_submodule(name), _join(path, name))
        except _Untraceable:
            return here, kept_whole
        if sum(len(r.fusions) for r in below) < sum(f.scope[0] == name for f in fusions):
            return here, kept_whole
        rewrites += below
    return rewrites, kept_whole


def _trace(module: nn.Module) -> tuple[fx.Graph, set[int]]:
    """module's forward as a graph, which must not depend on the modules' training flags."""
    if _has_own_state_dict(module):
        raise _Untraceable("it has its own state_dict logic, which a GraphModule would lose")
    flags = [(m, m.training) for m in module.modules()]
    traces = []
    try:
        for flip in (False, True):
            for m, training in flags:
                m.training = training != flip
            tracer = _Tracer()
            try:
                with warnings.catch_warnings():  # the call's one warning is convert's
                    warnings.simplefilter("ignore")
                    graph = tracer.trace(module)
            except Exception as error:  # tracing runs arbitrary user code
                reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise _Untraceable(f"{type(error).__name__}: {reason}") from error
            traces.append((graph, tracer.traced_through | {id(module)}))
    finally:
        for m, training in flags:
            m.training = training
    (graph, traced_through), (flipped, _) = traces
    if graph.python_code("self").src != flipped.python_code("self").src:
        raise _Untraceable("its forward depends on self.training, which a trace would freeze")
    return graph, traced_through


def _fuse_graph(graph: fx.Graph, modules: dict[str, nn.Module]) -> list[_Fusion]:
    """Rewrite graph so each fusible layer computes the activation and add that follow it."""
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    fusions = []
    for node in list(graph.nodes):
        if (
            node.op == "call_module"
            and calls[node.target] == 1  # one call site: the layer changes for all of them
            and _fusible(modules.get(node.target))
            and len(node.args) == 1
            and isinstance(node.args[0], fx.Node)
            and not node.kwargs
            and len(node.users) == 1
        ):
            fusion = _fuse_node(graph, node, modules)
            if fusion is not None:
                fusions.append(fusion)
    graph.lint()
    return fusions


def _fuse_node(graph: fx.Graph, node: fx.Node, modules: dict[str, nn.Module]) -> _Fusion | None:
    """Fold into the layer call `node` its user: an activation, or an add (and an activation)."""
    (user,) = node.users
    activation = _activation(user, node, modules)
    if activation is not None:
        user.replace_all_uses_with(node)
        graph.erase_node(user)
        return _Fusion(node.target, *activation, _scope(node, user))
    residual = _residual(user, node)
    if residual is None:
        return None
    add = user
    follower = next(iter(add.users)) if len(add.users) == 1 else None
    activation = None if follower is None else _activation(follower, add, modules)
    if not _call_before(node, add, residual):
        return None
    node.kwargs = {"residual": residual}
    if activation is None:
        add.replace_all_uses_with(node)
        graph.erase_node(add)
        return _Fusion(node.target, None, None, _scope(node, add))
    follower.replace_all_uses_with(node)
    graph.erase_node(follower)
    graph.erase_node(add)
    return _Fusion(node.target, *activation, _scope(node, add, follower))


def _activation(
    node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]
) -> _Activation | None:
    """The activation node applies to source (its only argument), or None."""
    if node.op == "call_module":
        if node.args != (source,) or node.kwargs:
            return None
        return _module_activation(modules.get(node.target))
    if node.op == "call_method":
        plain = node.target in _ACTIVATION_METHODS and node.args == (source,) and not node.kwargs
        return ("relu", _DEFAULT_SLOPE) if plain else None
    if node.op != "call_function" or not node.args or node.args[0] is not source:
        return None
    found = [(name, parameters) for function, name, parameters in _ACTIVATION_FUNCTIONS
             if node.target is function]
    if not found:
        return None
    ((name, parameters),) = found
    if len(node.args) > 1 + len(parameters) or not set(node.kwargs) <= set(parameters):
        return None
    options = {**dict(zip(parameters, node.args[1:], strict=False)), **node.kwargs}
    slope = options.get("negative_slope", _DEFAULT_SLOPE)
    if not isinstance(options.get("inplace", False), bool):
        return None
    if isinstance(slope, bool) or not isinstance(slope, (int, float)):
        return None
    return name, float(slope)


def _residual(add: fx.Node, source: fx.Node) -> fx.Node | None:
    """The other operand when add is a plain add of source and another node, else None.

    An in-place add must write into source: writing into the other operand is a change that
    later readers of it would miss.
    """
    if add.op == "call_function":
        is_add = any(add.target is function for function in _ADD_FUNCTIONS)
    else:
        is_add = add.op == "call_method" and add.target in _ADD_METHODS
    if not is_add or add.kwargs or len(add.args) != 2:
        return None
    first, second = add.args
    if first is source:
        other = second
    elif second is source and add.target not in _IN_PLACE_ADDS:
        other = first
    else:
        return None
    # A parameter or buffer is a broadcast bias, not a residual of the output's shape.
    if not isinstance(other, fx.Node) or other is source or other.op == "get_attr":
        return None
    return other


def _call_before(node: fx.Node, add: fx.Node, residual: fx.Node) -> bool:
    """Make residual available to the layer call node, moving the call down to add if needed.

    The move is refused when another node reads the layer's input in between: it might
    change it in place.
    """
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    if order[residual] < order[node]:
        return True
    (layer_input,) = node.args
    if any(order[node] < order[user] < order[add] for user in layer_input.users):
        return False
    add.prepend(node)
    return True


def _scope(*nodes: fx.Node) -> tuple[str, ...]:
    """The submodules (qualified names, outermost first) whose forward ran all of nodes."""
    owners = []
    for node in nodes:
        stack = [name for name, _ in node.meta.get("nn_module_stack", {}).values()]
        owners.append(stack[:-1] if node.op == "call_module" else stack)
    common = []
    for names in zip(*owners, strict=False):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return tuple(common)


def _apply(root: nn.Module, rewrite: _Rewrite) -> nn.Module:
    """root with the module at rewrite.path replaced by its GraphModule."""
    replacement = _graph_module(rewrite)
    if not rewrite.path:
        return replacement
    parent, _, name = rewrite.path.rpartition(".")
    root.get_submodule(parent)._modules[name] = replacement
    return root


def _graph_module(rewrite: _Rewrite) -> fx.GraphModule:
    """A GraphModule running rewrite.graph over the module's own tree of submodules.

    GraphModule alone would keep only the modules the graph calls, under bare containers.
    Here the tree stays whole: each fused layer is a copy that shares every tensor with the
    original, and the containers above it are copies too (same class, parameters, buffers
    and attributes); a container whose forward the graph inlined gets a forward that raises,
    since running its old forward over the fused layers would compute something else.
    """
    module = rewrite.module
    layers = dict(module.named_modules())
    fused = {
        fusion.target: _fused_copy(layers[fusion.target], fusion.activation, fusion.negative_slope)
        for fusion in rewrite.fusions
    }
    tree = _mirror(module, "", rewrite.traced_through, fused)
    graph_module = fx.GraphModule(tree, rewrite.graph, type(module).__name__)
    for name in ("_parameters", "_buffers", "_modules"):
        getattr(graph_module, name).clear()
        getattr(graph_module, name).update(getattr(tree, name))
    graph_module._non_persistent_buffers_set = set(tree._non_persistent_buffers_set)
    for name, value in vars(module).items():  # plain attributes such as num_classes
        if not name.startswith("_") and not hasattr(graph_module, name):
            graph_module.__dict__[name] = value
    for node in rewrite.graph.nodes:  # tensors the trace stored on the module itself
        if node.op == "get_attr" and not hasattr(graph_module, node.target):
            setattr(graph_module, node.target, getattr(module, node.target))
    _share_hooks(module, graph_module)
    return graph_module


def _copy_module(module: nn.Module) -> nn.Module:
    """module's copy: the same tensors, submodules and attributes, but its own dictionaries."""
    clone = copy.copy(module)
    for name, value in vars(module).items():
        if isinstance(value, (dict, set)):
            clone.__dict__[name] = copy.copy(value)
    return clone


def _fused_copy(
    layer: nn.Module, activation: str | None, negative_slope: float | None
) -> nn.Module:
    """A copy of layer that applies the activation."""
    fused = _copy_module(layer)
    fused.activation = activation
    if negative_slope is not None:
        fused.negative_slope = negative_slope
    return fused


def _mirror(
    module: nn.Module, path: str, traced_through: set[int], fused: dict[str, nn.Module]
) -> nn.Module:
    """module's tree with the fused layers in place: module itself where nothing under it
    changed, else a copy, whose forward raises if the graph inlined it."""
    if path in fused:
        return fused[path]
    children = {
        name: None if child is None else _mirror(child, _join(path, name), traced_through, fused)
        for name, child in module._modules.items()
    }
    inlined = id(module) in traced_through
    if not inlined and all(children[name] is child for name, child in module._modules.items()):
        return module
    clone = _copy_module(module)
    clone._modules.update(children)
    if inlined:
        clone.forward = _Inlined(type(module).__name__)
    return clone


class _Inlined:
    """The forward of a container that a GraphModule inlined (a class, so it pickles)."""

    def __init__(self, class_name: str) -> None:
        self.class_name = class_name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"fastbn.convert inlined this {self.class_name}'s forward into the "
            "torch.fx.GraphModule that holds it, with its BatchNorm layers fused; call that "
            "GraphModule (or convert with fuse=False)"
        )


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
