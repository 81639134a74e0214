"""Drop-in BatchNorm modules: subclasses of torch's, with fused residual and activation.

``fastbn.BatchNorm2d`` *is* a ``torch.nn.BatchNorm2d``: same constructor, parameters,
buffers and state_dict keys (loadable in both directions), same train/eval semantics and
errors. What it adds is keyword-only: ``activation`` / ``negative_slope`` fused into the
layer, and ``forward(input, residual=None)`` adding a residual before the activation.

The layers also serve the tools that read a model's forward: torch.fx records each layer
inside a traced module as one ``call_module`` node (a layer traced alone as one
``fastbn.functional.batch_norm`` node); ONNX export (both exporters) sees torch's
``batch_norm`` followed by the residual add and activation as standard operators; torch.jit.script
is refused with the way out (``fastbn.revert``). ``from_torch`` / ``to_torch`` are the
per-layer halves of ``fastbn.convert`` / ``fastbn.revert``; ``built_to_torch`` is
``fastbn.revert(model, built=True)``'s for layers built as fastbn's.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from fastbn.conventions import ACTIVATIONS
from fastbn.distributed import sync_batch_norm, sync_world_size
from fastbn.functional import batch_norm
from fastbn.swap import (
    SwapTargets,
    defines_forward,
    fastbn_class_of,
    moved_tensors,
    own_attributes,
    swap_model,
)

# torch.fx records these calls as single nodes instead of tracing into them.
torch.fx.wrap("batch_norm")
torch.fx.wrap("sync_batch_norm")

HOOK_STATE = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_is_full_backward_hook",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
# A fastbn layer's public attributes that the torch layer it gives back has its own of (or
# none): every other public attribute (track_running_stats, affine, one a user set) goes back.
FASTBN_ONLY = ("activation", "negative_slope", "process_group")
# What a swapped layer takes over from the layer it replaces, and gives back to it.
_SHARED_STATE = ("training", "eps", "momentum", "qconfig", *HOOK_STATE)
_LIVE_STATE = (*_SHARED_STATE, "_parameters", "_buffers", "_non_persistent_buffers_set")
# The attributes of a built fastbn layer that torch's layer of its kind does not have.
_BUILT_ONLY = (*FASTBN_ONLY, "num_dims", "_torch_origin", "_folded_module")
_TORCH_ACTIVATIONS = {
    "relu": lambda u, slope: F.relu(u),
    "relu6": lambda u, slope: F.relu6(u),
    "leaky_relu": F.leaky_relu,
    "silu": lambda u, slope: F.silu(u),
    "hardswish": lambda u, slope: F.hardswish(u),
}


@dataclass
class TorchOrigin:
    """The torch layer a fastbn layer replaced, as ``to_torch`` rebuilds it."""

    cls: type[_BatchNorm]
    state: dict[str, Any]  # its attributes but the live ones (_LIVE_STATE), children included
    activation: str | None  # what its own forward applies after the normalization
    negative_slope: float


def _take_state(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Give target source's tensors (the same objects, in dictionaries of its own), hook
    dictionaries (so handles keep working), training flag, eps, momentum and qconfig."""
    for name in _SHARED_STATE:
        if name in vars(source):
            target.__dict__[name] = vars(source)[name]
    target._parameters = dict(source._parameters)
    target._buffers = dict(source._buffers)
    target._non_persistent_buffers_set = set(source._non_persistent_buffers_set)


def _module_call_node(layer: torch.nn.Module, input: torch.fx.Proxy,
                      residual: torch.fx.Proxy | Tensor | None) -> torch.fx.Proxy:
    """Under torch.fx: one ``call_module`` node for a layer inside the traced module, as
    torch's own BatchNorm layers get (torch.fx keeps modules of torch.nn as calls, not
    fastbn's). The graph then calls the layer when it runs, so its training flag, momentum
    and buffers are read then, not frozen at trace time."""
    tracer = input.tracer
    args = (input,) if residual is None else (input, residual)
    return tracer.create_proxy("call_module", tracer.path_of_module(layer), args, {})


def _in_onnx_export() -> bool:
    """torch.onnx.is_in_onnx_export(), asked only while something traces the call: both
    exporters run the model so (the TorchScript one under torch.jit tracing, the dynamo one
    through torch.export, which sets is_compiling: asked first, as dynamo cannot trace
    _is_tracing). The question itself imports two modules per call (1-2 µs on the 2-core
    CPU this was measured on)."""
    return (torch.compiler.is_compiling() or torch._C._is_tracing()) and (
        torch.onnx.is_in_onnx_export())


def _tensor(module: torch.nn.Module, store: dict, name: str) -> Tensor | None:
    """module's tensor ``name``: from its dictionary ``store`` (where torch.func.functional_call
    swaps it too) when it is there, else as ``getattr`` finds it (a parametrization's
    property, a plain attribute set by a weight_norm-style pre-hook), or None."""
    try:
        return store[name]
    except KeyError:
        return getattr(module, name, None)


class _FastBatchNorm(_BatchNorm):
    """Shared constructor and forward of the fastbn modules."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        if activation is not None and activation not in ACTIVATIONS[1:]:
            raise ValueError(
                f"unknown activation {activation!r}; expected None or one of {ACTIVATIONS[1:]}"
            )
        if not isinstance(negative_slope, numbers.Real):  # (as fastbn.batch_norm checks it)
            raise TypeError(f"{type(self).__name__}: negative_slope must be a number, got "
                            f"{type(negative_slope).__name__}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if affine and not bias:  # torch < 2.12 has no bias= keyword; same result either way
            self.register_parameter("bias", None)
        self.activation = activation
        self.negative_slope = negative_slope
        # What to_torch gives back (set by from_torch), and the activation module this layer
        # took over from the nn.Sequential slot after it (set by fastbn.convert's "safe"
        # fusion, given back by fastbn.revert).
        self._torch_origin: TorchOrigin | None = None
        self._folded_module: torch.nn.Module | None = None

    @classmethod
    def from_torch(
        cls, layer: _BatchNorm, *, activation: str | None = None,
        negative_slope: float = 0.01, **extra: Any,
    ) -> _FastBatchNorm:
        """A cls layer in place of ``layer``, computing ``activation`` after the normalization.

        It holds layer's Parameter and buffer objects, hooks, training flag, eps, momentum
        and qconfig, like torch.nn.SyncBatchNorm.convert_sync_batchnorm's layers, and the
        attributes of layer's own that a BatchNorm layer does not have (a flag such as
        ``no_weight_decay``, set on it or by a subclass's ``__init__``); ``extra``
        goes to cls's constructor (process_group). It remembers layer's class and other
        attributes (children such as a timm BatchNormAct2d's ``act`` included) for
        ``to_torch``; from a fastbn layer it takes over what that one remembers.
        """
        new = cls(
            layer.num_features, layer.eps, layer.momentum, layer.affine,
            layer.track_running_stats, device="meta", activation=activation,
            negative_slope=negative_slope, **extra,
        )
        _take_state(layer, new)
        for name, value in vars(layer).items():  # the user's own: flags set on the layer or
            if name not in vars(new):  # by a subclass's __init__ (the same objects)
                new.__dict__[name] = value
        if isinstance(layer, _FastBatchNorm) and layer._torch_origin is not None:
            new._torch_origin = layer._torch_origin
            new.__dict__["_folded_module"] = layer._folded_module
        else:
            state = {k: v for k, v in vars(layer).items() if k not in _LIVE_STATE}
            state["_modules"] = dict(layer._modules)
            new._torch_origin = TorchOrigin(type(layer), state, activation, negative_slope)
        return new

    def to_torch(self) -> _BatchNorm:
        """The layer ``from_torch`` replaced: its class and other attributes, with this
        layer's tensors, hooks, training flag, eps, momentum and qconfig.

        Raises ValueError when this layer computes an activation the torch layer would not
        (one set after the swap) or holds a tensor outside its dictionaries (a
        parametrization), and RuntimeError for a layer from_torch did not make.
        """
        origin = self._torch_origin
        if origin is None:
            raise RuntimeError(
                f"{type(self).__name__}.to_torch: this layer was built as a fastbn layer, "
                "not swapped in by from_torch, so there is no torch layer to give back"
            )
        self._refuse_moved_tensors("to_torch")
        if self.activation != origin.activation or (
            self.activation == "leaky_relu" and self.negative_slope != origin.negative_slope
        ):
            raise ValueError(
                f"{type(self).__name__}.to_torch: this layer computes activation="
                f"{self.activation!r} (negative_slope={self.negative_slope}), but the "
                f"{origin.cls.__name__} it replaced computes activation="
                f"{origin.activation!r}; set the activation back first"
            )
        layer = origin.cls.__new__(origin.cls)
        layer.__dict__.update(origin.state)
        layer._modules = dict(origin.state["_modules"])
        for name, value in vars(self).items():  # set since the swap: track_running_stats, ...
            if not name.startswith("_") and name not in FASTBN_ONLY:
                layer.__dict__[name] = value
        _take_state(self, layer)
        layer.train(self.training)
        return layer

    def _refuse_moved_tensors(self, method: str) -> None:
        """Raise ValueError when a tensor of this layer is outside its dictionaries (a
        parametrization, a weight_norm-style hook): the torch layer would lose it."""
        moved = moved_tensors(self)
        if moved:
            raise ValueError(
                f"{type(self).__name__}.{method}: this layer's {', '.join(moved)} is not "
                "among its parameters and buffers (a parametrization or a weight_norm-style "
                "hook moved it), so the torch layer would lose it; remove that first "
                "(torch.nn.utils.parametrize.remove_parametrizations)"
            )

    def built_to_torch(self) -> _BatchNorm:
        """For a layer built as a fastbn layer (not swapped in by from_torch): torch's own
        layer of its kind (``torch_class_of_built``), holding this layer's tensors, hooks,
        training flag, eps, momentum, qconfig and the attributes set on it, computing what
        it computes. What ``fastbn.revert(model, built=True)`` puts in its place.

        Raises ValueError when the torch layer would compute something else: this layer
        computes an activation, its class defines a forward, methods or class attributes of
        its own (a user's subclass; an ``__init__`` alone is fine), or it holds a tensor
        outside its dictionaries (a parametrization)."""
        name = type(self).__name__
        if self._torch_origin is not None:
            raise RuntimeError(f"{name}.built_to_torch: this layer was swapped in by "
                               "from_torch; to_torch gives back the layer it replaced")
        if self.activation is not None:
            raise ValueError(
                f"{name}.built_to_torch: this layer computes activation={self.activation!r}, "
                "which torch's layer does not; build it with activation=None and put the "
                "activation module after it"
            )
        self._refuse_moved_tensors("built_to_torch")
        fastbn_class = fastbn_class_of(self, __name__)
        own = own_attributes(type(self), fastbn_class)
        if defines_forward(type(self), fastbn_class):
            own = ["forward", *own]
        if own:
            raise ValueError(f"{name}.built_to_torch: its class defines {', '.join(own)} "
                             f"over fastbn.{fastbn_class.__name__}, which torch's layer "
                             "would not keep")
        cls = torch_class_of_built(self)
        extra = {"process_group": self.process_group} if cls is torch.nn.SyncBatchNorm else {}
        layer = cls(self.num_features, self.eps, self.momentum, self.affine,
                    self.track_running_stats, device="meta", **extra)
        _take_state(self, layer)
        for key, value in vars(self).items():  # the user's own flags (no_weight_decay, ...)
            if key not in vars(layer) and key not in _BUILT_ONLY:
                layer.__dict__[key] = value
        layer.train(self.training)
        return layer

    def __prepare_scriptable__(self) -> None:
        """torch.jit.script's hook: refuse, saying what works instead."""
        raise RuntimeError(
            f"torch.jit.script cannot compile fastbn.{type(self).__name__}: its forward "
            "chooses between the Triton kernels and the PyTorch implementation in Python, "
            "which TorchScript cannot represent. Script the torch model instead "
            "(model = fastbn.revert(model)), or use torch.jit.trace, torch.export or "
            "torch.compile, which run fastbn's custom ops."
        )

    def forward(self, input: Tensor, residual: Tensor | float | None = None) -> Tensor:
        """activation(BatchNorm(input) + residual).

        A residual of another dtype or shape than input (a float32 block input under
        autocast, a broadcast term), or a Python number, is added after the normalization
        by torch's ``+``, with its type promotion and broadcasting. ONNX export sees torch's
        batch_norm, the add and the activation: standard operators. Under torch.fx the call
        is one node, without the rank check.
        """
        if isinstance(input, torch.fx.Proxy) and input.tracer.root is not self:
            return _module_call_node(self, input, residual)
        if is_fx_symbolic_tracing():
            return self._normalize(input, residual, self.activation)
        self._check_input_dim(input)
        if _in_onnx_export():
            return self._add_and_activate(_BatchNorm.forward(self, input), residual)
        if residual is not None and not isinstance(residual, Tensor):
            self._check_number_residual(residual)  # before anything changes
            return self._add_and_activate(self._normalize(input, None, None), residual)
        if residual is not None and (
            residual.dtype != input.dtype or residual.shape != input.shape
        ):
            try:  # before anything changes
                torch.broadcast_shapes(input.shape, residual.shape)
            except RuntimeError as error:
                raise RuntimeError(
                    f"{type(self).__name__}: a residual of shape {tuple(residual.shape)} cannot "
                    f"be added to an output of shape {tuple(input.shape)} ({error})"
                ) from None
            if residual.device != input.device:
                raise RuntimeError(
                    f"{type(self).__name__}: expected the residual on the input's device "
                    f"{input.device}, but it is on {residual.device}"
                )
            if self.activation is not None and torch.promote_types(
                input.dtype, residual.dtype
            ).is_complex:
                raise TypeError(
                    f"{type(self).__name__}: a {residual.dtype} residual makes the sum complex, "
                    f"and {self.activation} takes real tensors"
                )
            return self._add_and_activate(self._normalize(input, None, None), residual)
        return self._normalize(input, residual, self.activation)

    def _check_number_residual(self, residual: object) -> None:
        """Raise for a residual that is neither a Tensor nor a number torch's ``+`` adds (a
        Python number is added after the normalization, as ``bn(x) + 1.0``), or a complex
        one before a real activation."""
        if not isinstance(residual, numbers.Number):
            raise TypeError(f"{type(self).__name__}: residual must be a Tensor or a number, "
                            f"got {type(residual).__name__}")
        if self.activation is not None and isinstance(residual, complex):
            raise TypeError(f"{type(self).__name__}: a complex residual makes the sum "
                            f"complex, and {self.activation} takes real tensors")

    def _add_and_activate(self, normalized: Tensor, residual: Tensor | float | None
                          ) -> Tensor:
        """activation(normalized + residual) by torch's own operators."""
        u = normalized if residual is None else normalized + residual
        if self.activation is None:
            return u
        return _TORCH_ACTIVATIONS[self.activation](u, self.negative_slope)

    def _normalize(self, input: Tensor, residual: Tensor | None, activation: str | None) -> Tensor:
        """activation(BatchNorm(input) + residual) in one fastbn call."""
        # The tensors straight from the module's dictionaries (where torch.func.functional_call
        # swaps them too): nn.Module.__getattr__ would cost more than the rest of this.
        # A name missing from its dictionary (a parametrization, a weight_norm-style hook
        # that sets a plain attribute) is read the ordinary way, as torch's forward does.
        buffers, parameters = self._buffers, self._parameters
        running_mean = _tensor(self, buffers, "running_mean")
        running_var = _tensor(self, buffers, "running_var")
        num_batches_tracked = _tensor(self, buffers, "num_batches_tracked")
        training = self.training
        keeps_stats = not training or self.track_running_stats
        # Batch statistics in training, and in eval when no running statistics are kept.
        use_batch_stats = training or (running_mean is None and running_var is None)
        momentum = self.momentum
        if momentum is None and num_batches_tracked is None:
            momentum = 0.0  # torch's factor for a cumulative average without a step counter
        return batch_norm(
            input,
            running_mean if keeps_stats else None,
            running_var if keeps_stats else None,
            _tensor(self, parameters, "weight"),
            _tensor(self, parameters, "bias"),
            use_batch_stats,
            momentum,
            self.eps,
            residual=residual,
            activation=activation,
            negative_slope=self.negative_slope,
            num_batches_tracked=num_batches_tracked if training and self.track_running_stats
            else None,
        )

    def extra_repr(self) -> str:
        # torch's own text, which names bias= from torch 2.12 on; before, it cannot show an
        # affine layer without bias, so that is said after it.
        text = super().extra_repr()
        if "bias=" not in text and self.affine and self.bias is None:
            text += ", bias=False"
        if self.activation is not None:
            text += f", activation={self.activation}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.negative_slope}"
        return text


class BatchNorm1d(_FastBatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on fastbn: (N, C) or (N, C, L) input."""


class BatchNorm2d(_FastBatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on fastbn: (N, C, H, W) input, NCHW or channels_last."""


class BatchNorm3d(_FastBatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on fastbn: (N, C, D, H, W) input, NCDHW or channels_last_3d."""


class BatchNorm(_FastBatchNorm):
    """BatchNorm for inputs of rank ``num_dims`` (2 to 5), checked on every call."""

    def __init__(
        self,
        num_features: int,
        num_dims: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        # (The arguments spelled out, as the other layers': torch.nn.utils.skip_init looks
        # for ``device`` in the signature.)
        if not isinstance(num_dims, int) or not 2 <= num_dims <= 5:
            raise ValueError(f"BatchNorm: num_dims must be an int from 2 to 5, got {num_dims!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias, activation=activation, negative_slope=negative_slope)
        self.num_dims = num_dims

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != self.num_dims:
            raise ValueError(f"expected {self.num_dims}D input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_dims={self.num_dims}"


_TORCH_CLASS_OF_RANK = {
    2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}


def torch_class_of_built(layer: _FastBatchNorm) -> type[_BatchNorm]:
    """torch's layer class for a fastbn layer built as one: torch.nn.SyncBatchNorm for
    fastbn.SyncBatchNorm, BatchNorm1d/2d/3d for fastbn.BatchNorm by its num_dims (BatchNorm1d
    for 2 and 3), else the torch class fastbn's class derives from (fastbn.BatchNorm2d:
    torch.nn.BatchNorm2d)."""
    if isinstance(layer, SyncBatchNorm):
        return torch.nn.SyncBatchNorm
    if isinstance(layer, BatchNorm):
        return _TORCH_CLASS_OF_RANK[layer.num_dims]
    return next(k for k in type(layer).__mro__ if k.__module__ == _BatchNorm.__module__
                and k is not _BatchNorm)


class SyncBatchNorm(_FastBatchNorm):
    """torch.nn.SyncBatchNorm on fastbn: training statistics over every rank of
    ``process_group`` (the default group when None); input of any rank from 2 to 5.

    Outside an initialised process group, with a group of one rank, and in eval it is a
    fastbn BatchNorm of its input's rank and communicates nothing (eval without running
    statistics normalizes with the local batch's, as torch's does). Training across ranks
    is ``fastbn.distributed.sync_batch_norm``: one all_gather forward, one all_reduce
    backward, and parameter gradients that are this rank's sums, like torch's (see there).

    torch.nn.SyncBatchNorm's constructor, state_dict and errors, but not its class: torch's
    DistributedDataParallel refuses CPU modules holding a torch.nn.SyncBatchNorm, and this
    one also trains on CPU tensors over gloo.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, activation=activation, negative_slope=negative_slope,
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        """torch's SyncBatchNorm checks: the rank, then the channel count."""
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module,
                               process_group: Any = None) -> torch.nn.Module:
        """torch.nn.SyncBatchNorm.convert_sync_batchnorm's contract: every BatchNorm layer of
        module (torch's or fastbn's) becomes a fastbn.SyncBatchNorm holding the same
        tensors; the same as ``fastbn.convert(module, fuse="none", sync=True, ...)``."""
        return swap_model(module, swap_targets(True, process_group))

    # forward is the layers' (_FastBatchNorm.forward): its checks (this class's
    # _check_input_dim), ONNX export, and the residual torch's + adds (a number, a broadcast
    # shape, another dtype) around one _normalize call, which synchronises here.

    def _normalize(self, input: Tensor, residual: Tensor | None, activation: str | None) -> Tensor:
        """activation(SyncBatchNorm(input) + residual) in one fastbn call: in training, over
        more than one process, with the statistics of the whole group's batch (torch's
        rule); otherwise the layer's own."""
        if not self.training or sync_world_size(self.process_group) == 1:
            return super()._normalize(input, residual, activation)
        tracking = self.track_running_stats
        return sync_batch_norm(
            input,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.weight,
            self.bias,
            self.momentum,
            self.eps,
            self.process_group,
            residual=residual,
            activation=activation,
            negative_slope=self.negative_slope,
            num_batches_tracked=self.num_batches_tracked if tracking else None,
        )


def swap_targets(sync: bool, process_group: Any = None) -> SwapTargets:
    """What fastbn.convert swaps torch's BatchNorm layers for: the fastbn class of the same
    rank; with sync=True, a SyncBatchNorm over process_group for every rank and for
    torch.nn.SyncBatchNorm."""
    if sync:
        torch_classes = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                         torch.nn.SyncBatchNorm)
        classes = dict.fromkeys(torch_classes, SyncBatchNorm)
        extra = {"process_group": process_group}
    else:
        classes = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
                   torch.nn.BatchNorm3d: BatchNorm3d}
        extra = {}
    return SwapTargets(classes, _FastBatchNorm, _TORCH_ACTIVATIONS, extra)
