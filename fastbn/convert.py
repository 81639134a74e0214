"""fastbn.convert and fastbn.revert: swap a model's torch BatchNorm layers for fastbn's (and
back), fusing activations and residual adds into them only where asked.

``fuse`` chooses how far convert goes; every level keeps what the model computes, its
parameters, buffers and state_dict keys:

- ``"none"`` (the default): swap only. Each torch.nn.BatchNorm1d/2d/3d (or a subclass that
  keeps torch's ``forward`` and defines no other method or class attribute, which the fastbn
  class would drop: ``swap.own_attributes``) becomes the fastbn class of the same rank in
  the same slot,
  holding the same Parameter and buffer objects, hooks, training flag and qconfig
  (``_FastBatchNorm.from_torch``); with sync=True, it and torch.nn.SyncBatchNorm become
  fastbn.SyncBatchNorm. Every other module keeps its class, forward, methods and
  children, so conv-BN folding for deployment sees exactly the pairs it saw before. A
  timm-style BatchNormAct layer (a BatchNorm subclass whose only children are ``drop``, an
  nn.Identity, and ``act``, an activation fastbn computes or nn.Identity) becomes a
  fastbn layer computing that activation: its activation was inside the layer before too.
- ``"safe"``: also, in each plain nn.Sequential, a fastbn layer takes the activation module
  right after it, whose slot becomes nn.Identity (indices and keys stay). The Sequential
  runs the same for every input, but the layer called alone (or a slice ending at it) now
  applies the activation, and conv-BN folding would miss it: ``revert`` before folding.
- ``"graph"``: also torch.fx traces modules whose forward holds BatchNorm layers and fuses
  BN -> activation, BN -> add and BN -> add -> activation into one call
  ``bn(x, residual=other)`` of a copy of the layer; the smallest module whose forward holds
  such a pattern becomes a torch.fx.GraphModule (a different class). A module is rewritten
  only where the trace holds for every call: not when its forward takes more than its one
  input (a trace would freeze ``if shortcut is None``), branches on a tensor's value or on
  ``self.training``, or reads something the trace cannot place. Modules without a
  BatchNorm layer are traced as leaves, never inlined.

``revert`` undoes all three: the GraphModules give back the modules they replaced, the
folded activation modules return to their slots, and each layer convert swapped becomes
the torch layer it was (its class and attributes, the same tensors). convert and revert
change nothing when they raise.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import inspect
import operator
import textwrap
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from fastbn.modules import FASTBN_ONLY, HOOK_STATE, _FastBatchNorm, swap_targets
from fastbn.swap import (
    DEFAULT_SLOPE,
    Activation,
    Edits,
    adds_behaviour,
    check_module,
    fastbn_class_of,
    has_hooks,
    module_activation,
    swap,
    warn,
)

FUSE_LEVELS = ("none", "safe", "graph")

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

_STATE_DICT_HOOKS = (
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_STATE_DICT_METHODS = (
    "_save_to_state_dict", "_load_from_state_dict", "get_extra_state", "set_extra_state",
)
# Where a GraphModule keeps the module it replaced (for revert), under GraphModule's own
# mechanism for attributes that survive deepcopy and pickling.
_ORIGINAL = "_fastbn_replaced"


def convert(
    module: nn.Module, *, fuse: str | bool = "none", sync: bool = False,
    process_group: Any = None,
) -> nn.Module:
    """Swap every torch BatchNorm layer of ``module`` for fastbn's, in place; fuse as asked.

    fuse: ``"none"`` (default) swaps only and keeps every other module as it is;
    ``"safe"`` also folds the activation module after a layer in an nn.Sequential into it
    (the slot becomes nn.Identity); ``"graph"`` also fuses activations and residual adds
    found by torch.fx, replacing the smallest module that holds them by a
    torch.fx.GraphModule (see the module docstring for when it refuses). ``fuse=False`` and
    ``fuse=True`` are accepted as ``"none"`` and ``"graph"`` (True was the old default).
    The fused levels hide activations from conv-BN folding: ``fastbn.revert`` first.

    sync=True swaps every layer, torch.nn.SyncBatchNorm included, for a fastbn.SyncBatchNorm
    over ``process_group``. Layers that cannot be swapped without changing what they
    compute are left, and so are modules graph fusion cannot prove: one warning for the
    layers and one for the modules name each and say why.

    Returns the converted module: ``module`` itself, unless it is a BatchNorm layer or
    became a GraphModule (it then still computes the same, unfused). When convert raises,
    the model is as it was.
    """
    level = _fuse_level(fuse)
    check_module(module, "fastbn.convert")
    if process_group is not None and not sync:
        raise ValueError("fastbn.convert: process_group is only used with sync=True")
    edits = Edits()
    refused: list[str] = []
    try:
        module, left = swap(module, swap_targets(sync, process_group), edits)
        if level != "none":
            _fold_sequentials(module, edits)
        if level == "graph":
            rewrites = _plan(module, "", refused)
            built = [(rewrite.path, _graph_module(rewrite)) for rewrite in rewrites]
            for path, graph_module in built:
                module = _replace(module, path, graph_module, edits)
    except BaseException:
        edits.undo()
        raise
    warn("left these BatchNorm layers as they were", left, stacklevel=2)
    warn(
        "did not fuse inside these modules (their BatchNorm layers are swapped, and "
        "activations in nn.Sequential folded)", refused, stacklevel=2,
    )
    return module


def revert(module: nn.Module, *, built: bool = False) -> nn.Module:
    """Undo ``fastbn.convert``: torch BatchNorm layers and explicit activations again.

    Every GraphModule convert made becomes the module it replaced, every activation module
    folded out of an nn.Sequential goes back to its slot, and every layer convert swapped
    becomes the torch layer it was (its class and attributes, children such as a
    BatchNormAct's ``act`` included), holding the layer's current Parameter and buffer
    objects, hooks, training flag, eps and momentum. The result computes bit for bit what
    the model computed before convert, and folds for deployment the same way. fastbn layers
    that convert did not make stay as they are, unless ``built=True``: then each becomes
    torch's layer of its kind (``_FastBatchNorm.built_to_torch``: fastbn.BatchNorm2d a
    torch.nn.BatchNorm2d), so that a model built with ``norm_layer=fastbn.BatchNorm2d`` can
    be quantized or folded as torch's.

    Reverts in place and returns the result (a new object when ``module`` itself was
    swapped or replaced). Raises ValueError, changing nothing, where a swapped layer was
    given an activation after convert that its torch layer would not compute, or a
    parametrization (which the torch layer would lose); with ``built=True`` also where a
    built layer computes an activation or is a subclass with methods of its own, naming it.
    """
    check_module(module, "fastbn.revert")
    if type(built) is not bool:
        raise TypeError(f"fastbn.revert: built must be a bool, got {type(built).__name__}")
    edits = Edits()
    try:
        return _revert(module, edits, {}, built, "")
    except BaseException:
        edits.undo()
        raise


def _fuse_level(fuse: str | bool) -> str:
    if fuse is True or fuse is False:
        return "graph" if fuse else "none"
    if not isinstance(fuse, str):
        raise TypeError(
            f"fastbn.convert: fuse must be one of {FUSE_LEVELS} (or a bool), "
            f"got {type(fuse).__name__}"
        )
    if fuse not in FUSE_LEVELS:
        raise ValueError(f"fastbn.convert: fuse must be one of {FUSE_LEVELS}, got {fuse!r}")
    return fuse


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _replace(root: nn.Module, path: str, new: nn.Module, edits: Edits) -> nn.Module:
    """root with the module at path replaced by new (new itself when path is the root's)."""
    if not path:
        return new
    parent, _, name = path.rpartition(".")
    edits.set(root.get_submodule(parent)._modules, name, new)
    return root


# ---------------------------------------------------------------------------------------------
# 1. Fold in nn.Sequential ("safe"), after fastbn.swap swapped the layers


def _fold_sequentials(root: nn.Module, edits: Edits) -> None:
    """Give each fusible layer the activation module that follows it in an nn.Sequential,
    keeping the module in the layer for revert; its slot becomes nn.Identity."""
    paths = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
    for sequential in list(root.modules()):
        if type(sequential).forward is not nn.Sequential.forward:
            continue
        layers = list(sequential._modules.items())
        for (_, layer), (name, follower) in zip(layers, layers[1:], strict=False):
            activation = module_activation(follower)
            # A layer reachable another way would take the activation there too.
            if activation is not None and _fusible(layer) and paths[id(layer)] == 1:
                edits.set(layer.__dict__, "activation", activation[0])
                edits.set(layer.__dict__, "negative_slope", activation[1])
                edits.set(layer.__dict__, "_folded_module", follower)
                edits.set(sequential._modules, name, nn.Identity())


def _fusible(module: nn.Module | None) -> bool:
    """A fastbn layer that can take an activation and a residual: none yet, no hooks (they
    would see the fused output), and fastbn's own forward (a user's subclass with a forward
    or methods of its own computes more than BatchNorm, which the fused call would skip or
    misplace)."""
    return (
        isinstance(module, _FastBatchNorm) and module.activation is None and not has_hooks(module)
        and not adds_behaviour(type(module), fastbn_class_of(module, _FastBatchNorm.__module__))
    )


# ---------------------------------------------------------------------------------------------
# 2. Revert


def _revert(module: nn.Module, edits: Edits, done: dict[int, nn.Module], built: bool,
            path: str) -> nn.Module:
    """module as it was before convert (with ``built``, its built fastbn layers torch's); a
    module reachable by two paths is reverted once."""
    if id(module) in done:
        return done[id(module)]
    result = module
    replaced = getattr(module, _ORIGINAL, None)
    if replaced is not None:
        result = _replaced_module(module, replaced.module, edits)
    if type(result).forward is nn.Sequential.forward:
        _unfold(result, edits)
    for name, child in list(result._modules.items()):
        if child is not None:
            reverted = _revert(child, edits, done, built, _join(path, name))
            if reverted is not child:
                edits.set(result._modules, name, reverted)
    if isinstance(result, _FastBatchNorm) and result._torch_origin is not None:
        result = result.to_torch()
    elif built and isinstance(result, _FastBatchNorm):
        try:
            result = result.built_to_torch()
        except ValueError as error:
            raise ValueError(f"fastbn.revert(built=True): {path or 'the model'}: {error}"
                             ) from None
    done[id(module)] = result
    return result


def _replaced_module(graph_module: nn.Module, original: nn.Module, edits: Edits) -> nn.Module:
    """The module a GraphModule replaced, holding the GraphModule's current tensors and
    training flags (``.to()`` and ``.train()`` reached only the GraphModule's tree) and, from
    each copy in that tree, what was set on the copy since convert (its hooks, a layer's
    momentum or eps: the copy is what the model ran)."""
    for path, mirror in graph_module.named_modules(remove_duplicate=False):
        target = original.get_submodule(path)
        if target is mirror:
            continue
        for name in ("_parameters", "_buffers"):
            for key, tensor in getattr(mirror, name).items():
                edits.set(getattr(target, name), key, tensor)
        if path:  # (the root is the GraphModule itself: fx's own state, not the module's)
            for key, value in vars(mirror).items():
                if _set_since_convert(key, mirror) and (
                        target.__dict__.get(key, _ABSENT) is not value):
                    edits.set(target.__dict__, key, value)
        edits.set(target.__dict__, "training", mirror.training)
    return original


_ABSENT = object()


def _set_since_convert(key: str, copy_: nn.Module) -> bool:
    """Whether a tree copy's attribute ``key`` is state a user sets on the module (its hook
    dictionaries, a public attribute such as a layer's momentum or eps), not what convert
    set on the copy: an inlined container's stand-in forward, a fused layer's activation."""
    if key in HOOK_STATE:
        return True
    if key.startswith("_") or key == "forward":
        return False
    return not (isinstance(copy_, _FastBatchNorm) and key in FASTBN_ONLY)


def _unfold(sequential: nn.Module, edits: Edits) -> None:
    """Put the activation modules that fastbn layers took over back into their slots."""
    layers = list(sequential._modules.items())
    for (_, layer), (name, follower) in zip(layers, layers[1:], strict=False):
        if isinstance(layer, _FastBatchNorm) and layer._folded_module is not None:
            if type(follower) is not nn.Identity:
                raise ValueError(
                    f"fastbn.revert: the slot {name!r} after a fastbn layer that took over "
                    f"its {type(layer._folded_module).__name__} holds a "
                    f"{type(follower).__name__}, not the nn.Identity convert left there"
                )
            folded = layer._folded_module
            edits.set(folded.__dict__, "training", follower.training)
            edits.set(sequential._modules, name, folded)
            edits.set(layer.__dict__, "activation", None)  # as _fusible required
            edits.set(layer.__dict__, "negative_slope", DEFAULT_SLOPE)
            edits.set(layer.__dict__, "_folded_module", None)


# ---------------------------------------------------------------------------------------------
# 3. Fuse in traced graphs ("graph")


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
    constants: dict[str, Any] = field(default_factory=dict)  # tensors the trace made up


class _Tracer(fx.Tracer):
    """Traces through the modules that hold BatchNorm layers, keeping as calls the layers,
    every module without one (fastbn has no business there: a conv subclass, an attention
    block) and the modules that _kept_whole names; records the modules it inlines."""

    def __init__(self) -> None:
        super().__init__()
        self.traced_through: set[int] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if (
            isinstance(m, _BatchNorm)
            or not any(isinstance(sub, _BatchNorm) for sub in m.modules())
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
        has_hooks(module) or _has_own_state_dict(module)
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
        failures.append(f"{path or '<root>'} ({type(module).__name__}): {error}")
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
    graph, traced_through, constants = _trace(module)
    modules = dict(module.named_modules())
    kept_whole = {
        node.target: modules[node.target]
        for node in graph.nodes
        if node.op == "call_module" and _kept_whole(modules[node.target])
    }
    fusions = _fuse_graph(graph, modules)
    here = [_Rewrite(path, module, graph, traced_through, fusions, constants)] if fusions else []
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


def _trace(module: nn.Module) -> tuple[fx.Graph, set[int], dict[str, Any]]:
    """module's forward as a graph that holds for every call: one whose forward takes its
    one input only and does not depend on the modules' training flags; also the modules
    it inlines (ids) and the tensor constants it made up, which stay off module."""
    _check_signature(module)
    if _has_own_state_dict(module):
        raise _Untraceable("it has its own state_dict logic, which a GraphModule would lose")
    flags = [(m, m.training) for m in module.modules()]
    attributes = set(vars(module))
    traces = []
    reads: dict[str, Any] = {}
    try:
        for flip in (False, True):
            for m, training in flags:
                m.training = training != flip
            tracer = _Tracer()
            try:
                with warnings.catch_warnings(), _recording_attribute_reads(module, reads):
                    warnings.simplefilter("ignore")  # the call's one warning is convert's
                    graph = tracer.trace(module)
            except Exception as error:  # tracing runs arbitrary user code
                reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise _Untraceable(f"{type(error).__name__}: {reason}") from error
            finally:
                made_up = set(vars(module)) - attributes
                constants = {name: vars(module).pop(name) for name in made_up}
            traces.append((graph, tracer.traced_through | {id(module)}, constants))
    finally:
        for m, training in flags:
            m.training = training
    (graph, traced_through, constants), (flipped, _, _) = traces
    if graph.python_code("self").src != flipped.python_code("self").src:
        raise _Untraceable("its forward depends on self.training, which a trace would freeze")
    if reads:
        names = ", ".join(f"{name} = {value!r}" for name, value in sorted(reads.items()))
        raise _Untraceable(f"its forward reads {names}, which a trace would freeze")
    for m in module.modules():
        if id(m) in traced_through:
            _check_no_augmented_assignment_to_arguments(m)
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in constants:
            try:
                _get_path(module, node.target)
            except AttributeError as error:
                raise _Untraceable(f"the trace reads {node.target}, not found: {error}") from error
    return graph, traced_through, constants


_FREEZABLE = (bool, int, float, str)


@contextlib.contextmanager
def _recording_attribute_reads(root: nn.Module, reads: dict[str, Any]) -> Iterator[None]:
    """Record in reads ({path: value}) every public plain attribute of a bool, int, float or
    str value (``self.use_res``, ``self.scale``) that the modules under root read while the
    block runs: a trace bakes such values into its code, and the module computes something
    else once the attribute changes. (Leaves of the trace are called when the graph runs,
    so their reads are not recorded: they are not run while tracing.)"""
    originals = {}
    try:
        for path, m in root.named_modules():  # each module once, however often it is shared
            if not isinstance(m, _BatchNorm):
                originals[m] = _record_reads(m, path, reads)
        yield
    finally:
        for m, cls in originals.items():
            m.__class__ = cls


def _record_reads(m: nn.Module, path: str, reads: dict[str, Any]) -> type:
    """Make m record its reads of freezable attributes into reads; returns its own class."""
    cls = type(m)

    def __getattribute__(self, name):
        value = cls.__getattribute__(self, name)
        if (not name.startswith("_") and name != "training"
                and isinstance(value, _FREEZABLE)
                and name in object.__getattribute__(self, "__dict__")):
            reads[f"{path}.{name}" if path else f"self.{name}"] = value
        return value

    m.__class__ = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__,
                                              "__module__": cls.__module__})
    return cls


def _check_no_augmented_assignment_to_arguments(module: nn.Module) -> None:
    """Raise _Untraceable when module's forward writes ``arg += ...`` (or into an attribute or
    an item): torch.fx records ``x += y`` on a tensor as ``x = x + y``, so a graph would not
    change the caller's tensor as the module does. (Assignments to the forward's own
    locals, like ResNet's ``out += identity``, change nothing the caller holds.)"""
    forward = type(module).forward
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError) as error:
        raise _Untraceable(f"its forward's source cannot be read ({error})") from error
    # (A lambda's source is the whole line that assigns it: no def to read.)
    function = tree.body[0] if tree.body else None
    if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
        raise _Untraceable("its forward is not a def statement whose source can be read")
    arguments = {a.arg for a in (*function.args.posonlyargs, *function.args.args)}
    for node in ast.walk(function):
        if isinstance(node, ast.AugAssign) and (
            not isinstance(node.target, ast.Name) or node.target.id in arguments
        ):
            raise _Untraceable(
                f"its forward updates {ast.unparse(node.target)} in place (line "
                f"{node.lineno} of forward), which torch.fx records as a new tensor"
            )


def _check_signature(module: nn.Module) -> None:
    """Raise _Untraceable unless module's forward takes exactly one argument, with no
    default: a trace turns every argument into a graph input and freezes each test on
    one (``if shortcut is None``), so it holds only for the calls it was traced for."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError) as error:
        raise _Untraceable(f"its forward has no signature to check ({error})") from error
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    plain = (
        len(parameters) == 1
        and parameters[0].kind in positional
        and parameters[0].default is inspect.Parameter.empty
    )
    if not plain:
        signature = ", ".join(str(p) for p in parameters)
        raise _Untraceable(
            f"forward({signature}) takes more than one input, and a trace would freeze how "
            "the others are used"
        )


def _get_path(root: Any, target: str) -> Any:
    """root.a.b for target "a.b"."""
    value = root
    for name in target.split("."):
        value = getattr(value, name)
    return value


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
) -> Activation | None:
    """The activation node applies to source (its only argument), or None."""
    if node.op == "call_module":
        if node.args != (source,) or node.kwargs:
            return None
        return module_activation(modules.get(node.target))
    if node.op == "call_method":
        plain = node.target in _ACTIVATION_METHODS and node.args == (source,) and not node.kwargs
        return ("relu", DEFAULT_SLOPE) if plain else None
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
    slope = options.get("negative_slope", DEFAULT_SLOPE)
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
    tree.__dict__.update(rewrite.constants)  # a copy: the root's forward is always inlined
    graph_module = fx.GraphModule(tree, rewrite.graph, type(module).__name__)
    for name in ("_parameters", "_buffers", "_modules"):
        getattr(graph_module, name).clear()
        getattr(graph_module, name).update(getattr(tree, name))
    graph_module._non_persistent_buffers_set = set(tree._non_persistent_buffers_set)
    for name, value in vars(module).items():  # plain attributes such as num_classes
        if not name.startswith("_") and not hasattr(graph_module, name):
            graph_module.__dict__[name] = value
    for name, tensor in rewrite.constants.items():
        setattr(graph_module, name, tensor)
    for name in HOOK_STATE:
        if name in vars(module):
            graph_module.__dict__[name] = vars(module)[name]
    replaced = _Replaced(module)
    graph_module.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[_ORIGINAL] = replaced
    graph_module.__dict__[_ORIGINAL] = replaced
    return graph_module


class _Replaced:
    """Holds the module a GraphModule replaced, as a plain attribute (not a submodule: its
    tensors are the GraphModule's own and must not count twice)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module


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
            "GraphModule (or convert with fuse=\"none\" or \"safe\", or fastbn.revert it)"
        )

