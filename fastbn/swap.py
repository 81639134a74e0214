"""The swap of a model's torch BatchNorm layers for fastbn's: fastbn.convert's first step,
and all of fastbn.SyncBatchNorm.convert_sync_batchnorm.

It lies beneath both fastbn.modules and fastbn.convert and imports neither: the fastbn
classes and torch's activation functions come in as a SwapTargets (made by
fastbn.modules.swap_targets).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

# An activation as fastbn layers take it: (activation, negative_slope).
Activation = tuple[str, float]
# torch's function for each activation name: (u, negative_slope) -> act(u).
Activations = Mapping[str, Callable[[Tensor, float], Tensor]]

DEFAULT_SLOPE = 0.01
ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_PARAMETERS = ["weight", "bias"]
_BUFFERS = ["running_mean", "running_var", "num_batches_tracked"]


@dataclass(frozen=True)
class SwapTargets:
    """What a swap puts in place of torch's layers."""

    classes: Mapping[type[_BatchNorm], type[_BatchNorm]]  # torch class -> the fastbn class
    fastbn: type[_BatchNorm]  # the base of every fastbn layer
    activations: Activations  # to check what a BatchNormAct layer's forward computes
    extra: Mapping[str, Any]  # the new layers' other constructor arguments (process_group)


def check_module(module: Any, caller: str) -> None:
    """Raise TypeError unless module is an nn.Module."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{caller}: expected an nn.Module, got {type(module).__name__}")


def swap_model(module: nn.Module, targets: SwapTargets) -> nn.Module:
    """module with its swappable layers swapped (see swap), changing nothing when it raises;
    one warning names the layers left and why."""
    check_module(module, "fastbn.convert")
    edits = Edits()
    try:
        module, left = swap(module, targets, edits)
    except BaseException:
        edits.undo()
        raise
    warn("left these BatchNorm layers as they were", left, stacklevel=3)
    return module


def warn(what: str, items: list[str], stacklevel: int) -> None:
    """One warning for a convert call, naming each item; stacklevel as warnings.warn's,
    counted from warn's caller."""
    if items:
        listed = "; ".join(items)
        warnings.warn(f"fastbn.convert {what}: {listed}", stacklevel=stacklevel + 1)


class Edits:
    """The assignments into dictionaries (a module's _modules or __dict__) that convert and
    revert make, so that a failure can undo them in reverse order."""

    _MISSING = object()

    def __init__(self) -> None:
        self._log: list[tuple[dict, str, Any]] = []

    def set(self, mapping: dict, key: str, value: Any) -> None:
        self._log.append((mapping, key, mapping.get(key, self._MISSING)))
        mapping[key] = value

    def undo(self) -> None:
        for mapping, key, old in reversed(self._log):
            if old is self._MISSING:
                del mapping[key]
            else:
                mapping[key] = old
        self._log.clear()


def swap(root: nn.Module, targets: SwapTargets, edits: Edits) -> tuple[nn.Module, list[str]]:
    """root with its swappable layers (itself included) swapped, a layer reachable by two
    paths for one fastbn layer; and, for each layer left, its path, class and why."""
    swapped: dict[int, nn.Module] = {}
    left = []
    for path, layer in root.named_modules():
        if isinstance(layer, _BatchNorm):
            replacement, reason = _replacement(layer, targets)
            if replacement is not None:
                swapped[id(layer)] = replacement
            elif reason:
                left.append(f"{path or '<root>'} ({type(layer).__name__}): {reason}")
    for parent in list(root.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in swapped:
                edits.set(parent._modules, name, swapped[id(child)])
    return swapped.get(id(root), root), left


def moved_tensors(layer: torch.nn.Module) -> list[str]:
    """Which of layer's weight, bias, running_mean and running_var are not in its
    ``_parameters`` / ``_buffers`` (torch.nn.utils.parametrize, or a weight_norm-style hook,
    moved them): a swap, which carries those dictionaries over, would lose them."""
    moved = [name for name in ("weight", "bias") if name not in layer._parameters]
    return moved + [name for name in ("running_mean", "running_var")
                    if name not in layer._buffers]


def _replacement(layer: _BatchNorm, targets: SwapTargets) -> tuple[nn.Module | None, str]:
    """The fastbn layer that computes what layer does, or None and why not ("" when there
    is nothing to say: a fastbn layer already)."""
    extra = targets.extra
    for torch_class, fastbn_class in targets.classes.items():
        if not isinstance(layer, torch_class) or isinstance(layer, fastbn_class):
            continue
        if isinstance(layer, targets.fastbn):  # fastbn.BatchNorm2d -> fastbn.SyncBatchNorm
            moved = moved_tensors(layer)
            if moved:
                return None, (f"its {', '.join(moved)} is not among its parameters and "
                              "buffers (a parametrization or a hook moved it)")
            if list(layer._parameters) != _PARAMETERS or list(layer._buffers) != _BUFFERS:
                return None, "it holds parameters or buffers of its own"
            base = fastbn_class_of(layer, targets.fastbn.__module__)
            if defines_forward(type(layer), base):  # (a user's subclass of fastbn's class)
                return None, "its class has its own forward"
            reason = own_attributes_reason(layer, base)
            if reason:
                return None, reason
            return fastbn_class.from_torch(
                layer, activation=layer.activation, negative_slope=layer.negative_slope,
                **extra,
            ), ""
        if list(layer._parameters) != _PARAMETERS or list(layer._buffers) != _BUFFERS:
            return None, "it holds parameters or buffers of its own"
        if type(layer)._check_input_dim is not torch_class._check_input_dim:
            return None, "its class checks its input its own way"
        reason = own_attributes_reason(layer, torch_class)  # (a frozen BN's train(), ...)
        if reason:
            return None, reason
        if type(layer).forward is torch_class.forward:
            if layer._modules:
                return None, "it has submodules"
            return fastbn_class.from_torch(layer, **extra), ""
        activation, reason = _norm_act(layer)
        if reason:
            return None, reason
        name, slope = activation
        if not _computes_norm_then_act(layer, name, slope, targets.activations):
            return None, "its forward does not compute BatchNorm, then its drop, then its act"
        return fastbn_class.from_torch(layer, activation=name, negative_slope=slope, **extra), ""
    if isinstance(layer, nn.SyncBatchNorm):
        return None, "torch.nn.SyncBatchNorm is swapped with sync=True only"
    if isinstance(layer, LazyModuleMixin):  # (it becomes a torch BatchNorm at its first call)
        return None, "a lazy layer takes its shape at its first forward: convert after one"
    return None, ""


_CLASS_BOOKKEEPING = frozenset({
    "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
    "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__",
    "__slotnames__", "_abc_impl",
})
"""Names Python itself puts in a class's namespace: they say nothing of its behaviour."""

_CARRIED_OVER = frozenset({"__init__", "forward"})
"""Names a subclass may define and still be swapped: ``__init__`` has run already (the
swap keeps the built layer's attributes and tensors), and ``forward`` is checked on its own
(torch's, or a BatchNormAct layer's BatchNorm -> drop -> act)."""


def own_attributes(cls: type, torch_class: type) -> list[str]:
    """What the classes between cls and torch_class define beyond Python's bookkeeping,
    ``__init__`` and ``forward``: methods (train, _load_from_state_dict, reset_parameters,
    extra_repr, ...), properties and class attributes (a ``_version`` that changes how
    state_dicts load), none of which a swap to a fastbn class would keep."""
    own: list[str] = []
    for klass in cls.__mro__:  # (mixins before torch_class included: they override it too)
        if klass is torch_class:
            break
        own += [name for name in vars(klass) if name not in _CLASS_BOOKKEEPING
                and name not in _CARRIED_OVER and name not in own]
    return own


def defines_forward(cls: type, base: type) -> bool:
    """Whether a class between cls and base (a subclass of it) defines its own forward."""
    for klass in cls.__mro__:
        if klass is base:
            return False
        if "forward" in vars(klass):
            return True
    return False


def adds_behaviour(cls: type, base: type) -> bool:
    """Whether cls, a subclass of base, computes anything base does not: a forward or any
    other attribute of its own (``own_attributes``)."""
    return defines_forward(cls, base) or bool(own_attributes(cls, base))


def own_attributes_reason(layer: _BatchNorm, base: type) -> str:
    """Why layer cannot be swapped for its own attributes (``own_attributes`` of its class
    above ``base``), or "" when it has none."""
    own = own_attributes(type(layer), base)
    return f"its class defines {', '.join(own)}, which the fastbn layer would not keep" if (
        own) else ""


def fastbn_class_of(layer: _BatchNorm, home: str) -> type:
    """The first of fastbn's own classes (those of module ``home``) in the layer's class
    hierarchy (a user's subclass of fastbn.BatchNorm2d sits above fastbn.BatchNorm2d)."""
    return next(k for k in type(layer).__mro__ if k.__module__ == home)


def _norm_act(layer: _BatchNorm) -> tuple[tuple[str | None, float], str]:
    """The activation of a timm-style BatchNormAct layer, whose forward is torch's BatchNorm
    then its ``drop`` then its ``act`` child, and ""; or why layer is not one fastbn
    computes."""
    unknown = (None, DEFAULT_SLOPE)
    if set(layer._modules) != {"drop", "act"}:
        return unknown, "its class has its own forward"
    drop, act = layer._modules["drop"], layer._modules["act"]
    if type(drop) is not nn.Identity or has_hooks(drop):
        return unknown, f"its drop is {type(drop).__name__}, which fastbn does not compute"
    if type(act) is nn.Identity and not has_hooks(act):
        return unknown, ""
    activation = module_activation(act)
    if activation is None:
        return unknown, f"its act is {type(act).__name__}, which fastbn does not compute"
    return activation, ""


_PROBE_RANKS = (4, 5, 3, 2)


def _computes_norm_then_act(
    layer: _BatchNorm, activation: str | None, slope: float, activations: Activations
) -> bool:
    """Whether layer's own forward computes torch's BatchNorm, then the activation: its
    children's names and types say what it holds, not what its forward does with them, so
    both are run on a probe input, in eval and in training, on copies (layer is untouched).
    A layer on the meta device (no values) is taken at its children's word."""
    anchor = next(t for t in (layer.weight, layer.running_mean, torch.empty(0))
                  if t is not None)
    if anchor.device.type == "meta":
        return True
    rank = next((r for r in _PROBE_RANKS if _accepts_rank(layer, r)), None)
    if rank is None:
        return False
    shape = (3, layer.num_features, *[3] * (rank - 2))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = x.to(device=anchor.device, dtype=anchor.dtype if anchor.is_floating_point() else None)
    for training in (False, True):
        own, plain = (_without_hooks(copy.deepcopy(layer)).train(training) for _ in range(2))
        with torch.no_grad():
            got = own(x)
            want = _BatchNorm.forward(plain, x)
            if activation is not None:
                want = activations[activation](want, slope)
        same_buffers = all(
            a is None or torch.allclose(a.float(), b.float(), equal_nan=True)
            for a, b in zip(own.buffers(), plain.buffers(), strict=True)
        )
        if not (isinstance(got, torch.Tensor) and got.shape == want.shape and same_buffers
                and torch.allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)):
            return False
    return True


def _without_hooks(module: nn.Module) -> nn.Module:
    """module (a probe's copy) with the module hooks of it and its children removed, so
    probing runs none of the user's hooks (the swapped layer keeps and calls them)."""
    for submodule in module.modules():
        for name in _HOOKS:
            getattr(submodule, name).clear()
    return module


def _accepts_rank(layer: _BatchNorm, rank: int) -> bool:
    try:
        layer._check_input_dim(torch.empty((1,) * rank, device="meta"))
    except ValueError:
        return False
    return True


def has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOKS)


def module_activation(module: nn.Module | None) -> Activation | None:
    """The activation an activation module computes; None for other modules or with hooks."""
    name = ACTIVATION_MODULES.get(type(module))
    if name is None or has_hooks(module):
        return None
    return name, float(getattr(module, "negative_slope", DEFAULT_SLOPE))

