"""Exact incremental occlusion inference: recompute only the part of each layer a square changes.

Nakandala, Kumar & Papakonstantinou, "Incremental and Approximate Inference for Faster
Occlusion-based Deep CNN Explanations" (SIGMOD 2019), Sec. 3 (incremental inference, "Krypton").
An occluding square changes the input only inside itself; a convolution or pooling layer then
changes only the outputs whose receptive field meets the changed inputs, a pointwise layer only
the same positions. So for every layer up to the point where the changed region covers the
whole map, each occluded copy needs just that region: its values are computed from a window of
the layer's input that is the clean image's activation with the copy's own changed region laid
over it. From the first layer whose region is the whole map (or a global layer: adaptive
pooling, flatten, linear, ...) on, the copies run in full, as in the plain sweep. Nothing is
approximated: the maps equal the batched sweep's up to float rounding.

Per layer the region has one size for all square positions (the largest), its origin moved
inside the map where it would stick out (recomputing unchanged values changes nothing), so all
copies of a chunk run as one batch of small tensors. Padding is explicit: the gathered windows
carry the zeros (convolution, average pooling) or -inf (max pooling) the layer would have added.

Supported before the full point (:func:`incremental_plan` returns None otherwise and the caller
falls back to the batched sweep): ``Conv2d`` (zeros padding; any kernel, stride, numeric padding,
dilation, groups), ``MaxPool2d``/``AvgPool2d`` and their functions (no ceil mode), eval ``BatchNorm2d`` with running
statistics, elementwise activations (modules and functions), ``Identity``/``Dropout``, channel
slicing and strided spatial slicing, channel-only ``F.pad``, scalar arithmetic and the residual
``+``/``-`` of two such tensors (region: the bounding box of both).
"""

from __future__ import annotations

import copy
import math
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

# ----------------------------------------------------------------------------- what is supported

_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout,
)
_POINTWISE_FUNCTIONS: set[Any] = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, torch.sigmoid, torch.tanh, F.softplus, F.dropout, F.dropout2d,
}
_POINTWISE_METHODS: set[str] = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_min", "clamp_max",
                                "contiguous", "float", "clone"}
_BINARY_FUNCTIONS: dict[Any, Callable[[Any, Any], Any]] = {
    operator.add: operator.add, torch.add: operator.add, operator.iadd: operator.add,
    operator.sub: operator.sub, torch.sub: operator.sub, operator.isub: operator.sub,
}
_SCALAR_FUNCTIONS: dict[Any, Callable[[Any, Any], Any]] = {
    **_BINARY_FUNCTIONS, operator.mul: operator.mul, torch.mul: operator.mul, operator.imul: operator.mul,
    operator.truediv: operator.truediv, torch.div: operator.truediv, operator.itruediv: operator.truediv,
}
_BINARY_METHODS: dict[str, Callable[[Any, Any], Any]] = {"add": operator.add, "add_": operator.add,
                                                          "sub": operator.sub, "sub_": operator.sub}
_SCALAR_METHODS: dict[str, Callable[[Any, Any], Any]] = {**_BINARY_METHODS, "mul": operator.mul,
                                                          "mul_": operator.mul, "div": operator.truediv,
                                                          "div_": operator.truediv}
_POOL_FUNCTIONS: dict[Any, tuple[type[nn.Module], tuple[str, ...]]] = {
    F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                  "divisor_override")),
}
# Layers that read the whole spatial map: their input is made whole first, then all runs in full.
_GLOBAL_MODULES: tuple[type[nn.Module], ...] = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear)
_GLOBAL_FUNCTIONS: set[Any] = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten, torch.mean,
                               torch.sum, torch.amax, torch.reshape, F.linear}
_GLOBAL_METHODS: set[str] = {"flatten", "view", "reshape", "mean", "sum", "amax", "max", "size", "dim"}


def _stock(module: nn.Module, cls: type[nn.Module]) -> bool:
    """``module`` is a ``cls`` whose forward was not overridden (its maths is the documented one)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


@dataclass
class _Window:
    """A sliding-window layer, per axis (y, x): kernel extent, stride, padding, dilation."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    pad_value: float
    op: Callable[[torch.Tensor], torch.Tensor]  # the layer on an explicitly padded window, no padding
    count: tuple[int, int] | None = None  # avg pooling without count_include_pad: divide by valid count
    cost: int = 0  # multiply-adds per output position (all channels)


@dataclass
class _Step:
    """How one graph node is computed: ``kind`` and what that kind needs."""

    kind: str  # input | window | pointwise | binary | global | other | static | output
    fn: Callable[..., Any] | None = None  # pointwise: tensor -> tensor; binary: (a, b) -> a op b
    window: _Window | None = None
    shape: tuple[int, ...] | None = None  # the output's shape without the batch axis


@dataclass
class Plan:
    """A model traced for incremental occlusion: the graph and how each node is computed."""

    gm: fx.GraphModule
    input_shape: tuple[int, ...]
    steps: dict[fx.Node, _Step]
    modules: dict[str, int]  # name -> id(module) when traced: a swapped module invalidates the plan
    geometry: dict[tuple[int, int, str], _Geometry] = field(default_factory=dict)  # (window, stride, device)

    def node_of(self, layer: str) -> fx.Node | None:
        """The one node that calls module ``layer`` (None when it is not a leaf called once)."""
        hits = [n for n in self.gm.graph.nodes if n.op == "call_module" and n.target == layer]
        return hits[0] if len(hits) == 1 else None


class Unsupported(ValueError):
    """The model has a layer incremental occlusion cannot run exactly; use the plain sweep."""


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _window_step(mod: nn.Module) -> _Window | None:
    """The :class:`_Window` of a stock Conv2d / MaxPool2d / AvgPool2d, None for other modules."""
    if _stock(mod, nn.Conv2d):
        assert isinstance(mod, nn.Conv2d)
        if mod.padding_mode != "zeros":
            raise Unsupported(f"Conv2d padding_mode {mod.padding_mode!r}")
        if isinstance(mod.padding, str):
            if mod.padding != "valid":
                raise Unsupported(f"Conv2d padding {mod.padding!r}")
            padding = (0, 0)
        else:
            padding = _pair(mod.padding)
        conv = mod

        def conv_op(t: torch.Tensor) -> torch.Tensor:
            return F.conv2d(t, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)

        return _Window(_pair(mod.kernel_size), _pair(mod.stride), padding, _pair(mod.dilation), 0.0, conv_op,
                       cost=mod.weight.numel())
    if _stock(mod, nn.MaxPool2d):
        assert isinstance(mod, nn.MaxPool2d)
        if mod.ceil_mode or mod.return_indices:
            raise Unsupported("MaxPool2d with ceil_mode or return_indices")
        mp = mod

        def max_op(t: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(t, mp.kernel_size, mp.stride, 0, mp.dilation)

        return _Window(_pair(mod.kernel_size), _pair(mod.stride), _pair(mod.padding), _pair(mod.dilation),
                       -math.inf, max_op)
    if _stock(mod, nn.AvgPool2d):
        assert isinstance(mod, nn.AvgPool2d)
        if mod.ceil_mode:
            raise Unsupported("AvgPool2d with ceil_mode")
        ap = mod
        kernel, stride = _pair(ap.kernel_size), _pair(ap.stride or ap.kernel_size)
        exclude = not ap.count_include_pad and ap.divisor_override is None and _pair(ap.padding) != (0, 0)

        def avg_op(t: torch.Tensor) -> torch.Tensor:
            # Without count_include_pad the sum is divided by the valid count (see _Window.count).
            divisor = 1 if exclude else ap.divisor_override
            return F.avg_pool2d(t, kernel, stride, 0, False, True, divisor)

        return _Window(kernel, stride, _pair(ap.padding), (1, 1), 0.0, avg_op, kernel if exclude else None)
    return None


def _slice_step(node: fx.Node) -> _Step | None:
    """``x[:, c0:c1, y0:y1:sy, x0:x1:sx]``: pointwise when only channels are sliced, else a window."""
    index = node.args[1]
    if not isinstance(index, tuple) or not 1 <= len(index) <= 4 or not all(isinstance(s, slice) for s in index):
        return None
    spec = list(index) + [slice(None)] * (4 - len(index))
    if spec[0] != slice(None):
        return None
    if spec[2] == slice(None) and spec[3] == slice(None):
        ch = spec[1]
        return _Step("pointwise", fn=lambda t: t[:, ch])
    starts, steps = [], []
    for s in spec[2:]:
        for v in (s.start, s.stop, s.step):
            if v is not None and (not isinstance(v, int) or v < 0):
                return None
        starts.append(s.start or 0)
        steps.append(s.step or 1)
    if any(s.stop is not None for s in spec[2:]):
        return None  # a stop changes the map size; rare, so not handled
    ch = spec[1]
    sy, sx = steps

    def slice_op(t: torch.Tensor) -> torch.Tensor:
        return t[:, ch, ::sy, ::sx]

    # A slice is a 1x1 window with stride ``step`` whose first tap sits at ``start``: padding -start.
    return _Step("window", window=_Window((1, 1), (sy, sx), (-starts[0], -starts[1]), (1, 1), 0.0, slice_op))


def _pointwise_module(mod: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if any(_stock(mod, cls) for cls in _POINTWISE_MODULES):
        if getattr(mod, "inplace", False):  # a region must never overwrite the tensor it came from
            mod = copy.copy(mod)
            mod.inplace = False  # type: ignore[assignment]
        return mod
    if _stock(mod, nn.BatchNorm2d):
        assert isinstance(mod, nn.BatchNorm2d)
        if mod.training or mod.running_mean is None or mod.running_var is None:
            raise Unsupported("BatchNorm2d must be in eval mode with running statistics")
        return mod
    return None


def _classify(modules: dict[str, nn.Module], node: fx.Node, dep: dict[fx.Node, bool]) -> _Step:
    """The :class:`_Step` of ``node`` (kind ``other`` for anything not recognised)."""
    args, kwargs = node.args, dict(node.kwargs)
    tensors = [a for a in node.all_input_nodes if dep[a]]
    if node.op == "placeholder":
        return _Step("input")
    if node.op == "output":
        return _Step("output")
    if not tensors:
        return _Step("static")
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if mod._forward_hooks or mod._forward_pre_hooks:
            raise Unsupported(f"module {node.target!r} has hooks")
        win = _window_step(mod)
        if win is not None:
            return _Step("window", window=win)
        pw = _pointwise_module(mod)
        if pw is not None:
            return _Step("pointwise", fn=pw)
        if isinstance(mod, _GLOBAL_MODULES):
            return _Step("global")
        return _Step("other")
    one = len(tensors) == 1 and isinstance(args[0], fx.Node) and dep[args[0]]
    if node.op == "call_function":
        fn = node.target
        if fn in _POINTWISE_FUNCTIONS and one:
            rest, kw = args[1:], {k: v for k, v in kwargs.items() if k != "inplace"}
            if kw.get("training", False) or (fn in (F.dropout, F.dropout2d) and len(rest) >= 2 and rest[1]):
                return _Step("other")
            if any(isinstance(a, fx.Node) for a in [*rest, *kw.values()]):
                return _Step("other")
            # Without ``inplace``: in place on a region would overwrite its source; same maths.
            return _Step("pointwise", fn=lambda t, f=fn, r=rest, k=kw: f(t, *r, **k))
        if fn in _POOL_FUNCTIONS and one and not any(isinstance(v, fx.Node) for v in [*args[1:], *kwargs.values()]):
            # F.max_pool2d / F.avg_pool2d: the same maths as the module with those arguments.
            cls, names = _POOL_FUNCTIONS[fn]
            bound = dict(zip(names, args[1:]), **kwargs)
            try:
                win = _window_step(cls(**bound))
            except TypeError:
                return _Step("other")
            return _Step("window", window=win) if win is not None else _Step("other")
        if fn is operator.getitem and one:
            return _slice_step(node) or _Step("other")
        if fn is F.pad and one:
            pad = args[1] if len(args) > 1 else kwargs.get("pad")
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            if (isinstance(pad, (tuple, list)) and len(pad) >= 4 and not any(pad[:4]) and mode == "constant"
                    and not any(isinstance(a, fx.Node) for a in args[1:])):
                return _Step("pointwise", fn=lambda t, a=args[1:], k=kwargs: F.pad(t, *a, **k))
            return _Step("other")
        return _binary(fn, _BINARY_FUNCTIONS, _SCALAR_FUNCTIONS, node, dep, kwargs) or _global(fn in _GLOBAL_FUNCTIONS)
    if node.op == "call_method":
        name = str(node.target)
        if name in _POINTWISE_METHODS and one and not any(isinstance(a, fx.Node) for a in args[1:]):
            plain = name.rstrip("_")
            return _Step("pointwise", fn=lambda t, m=plain, r=args[1:], k=kwargs: getattr(t, m)(*r, **k))
        return _binary(name, _BINARY_METHODS, _SCALAR_METHODS, node, dep, kwargs) or _global(name in _GLOBAL_METHODS)
    return _Step("other")


def _global(known: bool) -> _Step:
    return _Step("global" if known else "other")


def _binary(key: Any, binary: dict[Any, Callable[[Any, Any], Any]], scalar: dict[Any, Callable[[Any, Any], Any]],
            node: fx.Node, dep: dict[fx.Node, bool], kwargs: dict[str, Any]) -> _Step | None:
    """``a + b`` / ``a - b`` of two input-dependent tensors, or ``a op number`` (pointwise)."""
    if key not in scalar or kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    dep_a = isinstance(a, fx.Node) and dep[a]
    dep_b = isinstance(b, fx.Node) and dep[b]
    if dep_a and dep_b:
        return _Step("binary", fn=binary[key]) if key in binary else None
    number = b if dep_a else a
    if isinstance(number, (int, float)) and not isinstance(number, bool):
        op = scalar[key]
        return _Step("pointwise", fn=(lambda t: op(t, number)) if dep_a else (lambda t: op(number, t)))
    return None


def incremental_plan(model: nn.Module, input_shape: tuple[int, ...]) -> Plan:
    """Trace ``model`` for inputs (N, *input_shape) and check every layer before the full point.

    Raises :class:`Unsupported` with the reason when the model cannot run incrementally (it does
    not trace, or a layer that is not supported reads a partly changed map).
    """
    if len(input_shape) != 3:
        raise Unsupported(f"images (C, H, W) expected, got {input_shape}")
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        raise Unsupported("global forward hooks are registered")
    was_training = model.training
    model.eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # tracing fails on data-dependent control flow and the like
        raise Unsupported(f"the model does not trace with torch.fx: {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise Unsupported(f"the model takes {len(placeholders)} inputs, not one")
    try:
        param = next(model.parameters(), None)
        probe = torch.zeros(1, *input_shape, dtype=param.dtype if param is not None else torch.float32,
                            device=param.device if param is not None else "cpu")
        with torch.no_grad():
            model.eval()
            ShapeProp(gm).propagate(probe)
    except Exception as e:
        raise Unsupported(f"shape propagation failed: {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)

    dep: dict[fx.Node, bool] = {}
    whole: dict[fx.Node, bool] = {}  # surely full on the copies (after a global layer)
    steps: dict[fx.Node, _Step] = {}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        dep[node] = node.op == "placeholder" or any(dep[a] for a in node.all_input_nodes)
        step = _classify(modules, node, dep)
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            step.shape = tuple(meta.shape)[1:]
        inputs = [a for a in node.all_input_nodes if dep[a]]
        partial = [a for a in inputs if not whole[a]]
        if step.kind == "output":
            if not isinstance(node.args[0], fx.Node):
                raise Unsupported("the model does not return one tensor")
        elif step.kind == "other" and partial:
            raise Unsupported(f"node {node.name!r} ({node.op} {getattr(node.target, '__name__', node.target)}) "
                              "reads a partly changed map and is not supported")
        elif step.kind in ("window", "pointwise", "binary"):
            if partial and (step.shape is None or len(step.shape) != 3):
                raise Unsupported(f"node {node.name!r} is not a (N, C, H, W) map")
        if step.kind == "binary" and len(partial) == 2:
            a, b = (steps[p].shape for p in partial)
            if a != b or a != step.shape:
                raise Unsupported(f"node {node.name!r} broadcasts between maps of shapes {a} and {b}")
        whole[node] = dep[node] and (step.kind in ("global", "other") or (bool(inputs) and not partial))
        steps[node] = step
    return Plan(gm, tuple(input_shape), steps, {n: id(m) for n, m in model.named_modules()})


WORTH_IT = 0.6
"""Run incrementally only when the copies' convolution work is at most this share of the plain
sweep's: the gathers and the small windows cost time of their own (on a 2-thread CPU a
ResNet-20 on 32x32 images with an 8px square, whose region fills the map after the first
stage, keeps about 70% of the work and runs no faster than the batched sweep)."""

_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], Plan | str]] = weakref.WeakKeyDictionary()


def cached_plan(model: nn.Module, input_shape: tuple[int, ...]) -> Plan | str:
    """:func:`incremental_plan`, remembered per model and input shape; the reason (str) when unsupported."""
    per_model = _PLANS.setdefault(model, {})
    plan = per_model.get(tuple(input_shape))
    if isinstance(plan, Plan) and plan.modules != {n: id(m) for n, m in model.named_modules()}:
        plan = None  # a submodule was replaced since tracing
    if plan is None:
        try:
            plan = incremental_plan(model, tuple(input_shape))
        except Unsupported as e:
            plan = str(e)
        per_model[tuple(input_shape)] = plan
    return plan


def has_hooks(model: nn.Module) -> bool:
    """Whether forward hooks are registered (on ``model``, a layer of it or globally): the
    incremental path calls no module the way a forward does, so the caller runs in full."""
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------- geometry of the regions


@dataclass
class _Region:
    """A node's changed box per square position: exact [lo, hi) per axis, and the fixed-size box run."""

    size: tuple[int, int]  # the map (H, W)
    lo: tuple[torch.Tensor, torch.Tensor]  # (P,) each
    hi: tuple[torch.Tensor, torch.Tensor]
    box: tuple[int, int] = field(init=False)  # run size (h, w): the largest exact box
    origin: tuple[torch.Tensor, torch.Tensor] = field(init=False)  # run origin per position, inside the map

    def __post_init__(self) -> None:
        # Empty boxes (a strided layer can skip every changed input) become empty at lo; the run
        # box is the largest exact box, moved inside the map where it would stick out.
        lo = tuple(self.lo[ax].clamp(0, self.size[ax]) for ax in range(2))
        hi = tuple(torch.maximum(self.hi[ax].clamp(0, self.size[ax]), lo[ax]) for ax in range(2))
        box = tuple(max(1, int((hi[ax] - lo[ax]).max())) for ax in range(2))
        self.lo, self.hi = (lo[0], lo[1]), (hi[0], hi[1])
        self.box = (box[0], box[1])
        self.origin = (lo[0].clamp(max=self.size[0] - box[0]), lo[1].clamp(max=self.size[1] - box[1]))

    @property
    def full(self) -> bool:
        return self.box == self.size


@dataclass
class _Gather:
    """Which cells of a producer's (padded) clean map and changed region make a window, per position."""

    source: fx.Node
    pad: tuple[int, int]
    pad_value: float
    shape: tuple[int, int]  # window (L, Lw)
    cells: torch.Tensor  # (P, L * Lw) flat index into the padded clean map
    in_region: torch.Tensor  # (P, L * Lw) bool
    region_cells: torch.Tensor  # (P, L * Lw) flat index into the region box (0 where not in it)
    map_cells: int  # cells of the padded map, per image
    mask_count: torch.Tensor | None = None  # (P, 1, L, Lw) 1 on real (unpadded) cells


@dataclass
class _Geometry:
    regions: dict[fx.Node, _Region]  # nodes computed as a (partial) region
    gathers: dict[tuple[fx.Node, int], _Gather]  # (consumer, which input) -> window gather
    full: set[fx.Node]  # nodes computed in full on the copies
    work: float  # convolution multiply-adds run, as a share of the plain sweep's
    binary: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)  # a + b from regions: [a, b]


def _make_gather(source: fx.Node, region: _Region, start: tuple[torch.Tensor, torch.Tensor],
                 shape: tuple[int, int], pad: tuple[int, int], pad_value: float, device: torch.device,
                 with_mask: bool = False) -> _Gather:
    """Index tables for windows of ``shape`` at ``start`` (unpadded coordinates, per position)."""
    (ly, lx), (py, px) = shape, pad
    wp = region.size[1] + 2 * px
    ys = start[0][:, None] + torch.arange(ly)[None]  # (P, L)
    xs = start[1][:, None] + torch.arange(lx)[None]
    cells = ((ys + py)[:, :, None] * wp + (xs + px)[:, None, :]).reshape(len(ys), -1)
    ry = ys - region.origin[0][:, None]
    rx = xs - region.origin[1][:, None]
    iny = (ry >= 0) & (ry < region.box[0])
    inx = (rx >= 0) & (rx < region.box[1])
    inside = (iny[:, :, None] & inx[:, None, :]).reshape(len(ys), -1)
    rcells = (ry.clamp(0, region.box[0] - 1)[:, :, None] * region.box[1]
              + rx.clamp(0, region.box[1] - 1)[:, None, :]).reshape(len(ys), -1)
    mask = None
    if with_mask:
        real = (((ys >= 0) & (ys < region.size[0]))[:, :, None] & ((xs >= 0) & (xs < region.size[1]))[:, None, :])
        mask = real[:, None].float()
    return _Gather(source, pad, pad_value, shape, cells.to(device), inside.to(device), rcells.to(device),
                   (region.size[0] + 2 * py) * wp, None if mask is None else mask.to(device))


def _place(node: fx.Node, region: _Region, regions: dict[fx.Node, _Region], full: set[fx.Node]) -> None:
    """``node`` is whole on the copies when its region covers the map, else a region."""
    if region.full:
        full.add(node)
    else:
        regions[node] = region


def _geometry(plan: Plan, window: int, stride: int, device: torch.device) -> _Geometry:
    """Changed regions of every node for a ``window`` square moved by ``stride``."""
    _, h, w = plan.input_shape
    ny, nx = (h - window) // stride + 1, (w - window) // stride + 1
    ys = (torch.arange(ny * nx) // nx) * stride
    xs = (torch.arange(ny * nx) % nx) * stride
    regions: dict[fx.Node, _Region] = {}
    gathers: dict[tuple[fx.Node, int], _Gather] = {}
    full: set[fx.Node] = set()
    binary: dict[fx.Node, list[fx.Node]] = {}
    for node, step in plan.steps.items():
        if step.kind in ("static", "output"):
            continue
        if step.kind == "input":
            _place(node, _Region((h, w), (ys, xs), (ys + window, xs + window)), regions, full)
            continue
        inputs = [a for a in node.all_input_nodes if a in regions or a in full]
        partial = [a for a in inputs if a in regions]
        if not partial or step.kind in ("global", "other"):
            full.add(node)
            continue
        if step.kind == "pointwise":
            src = regions[partial[0]]
            reg = _Region(src.size, src.lo, src.hi)
        elif step.kind == "binary":
            if len(partial) == 1:  # the other is already whole on the copies
                full.add(node)
                continue
            ra, rb = regions[partial[0]], regions[partial[1]]
            reg = _Region(ra.size, (torch.minimum(ra.lo[0], rb.lo[0]), torch.minimum(ra.lo[1], rb.lo[1])),
                          (torch.maximum(ra.hi[0], rb.hi[0]), torch.maximum(ra.hi[1], rb.hi[1])))
        else:
            assert step.window is not None and step.shape is not None
            src, win = regions[partial[0]], step.window
            los, his = [], []
            for ax in range(2):
                k, s, p, d = win.kernel[ax], win.stride[ax], win.padding[ax], win.dilation[ax]
                first, end = src.lo[ax], src.hi[ax]
                # Output o reads inputs o*s - p + j*d, j < k: it changes when that span meets [first, end).
                lo = -torch.div(-(first + p - d * (k - 1)), s, rounding_mode="floor")
                hi = torch.div(end - 1 + p, s, rounding_mode="floor") + 1
                los.append(torch.where(end > first, lo, torch.zeros_like(lo)))
                his.append(torch.where(end > first, hi, torch.zeros_like(hi)))
            reg = _Region((step.shape[1], step.shape[2]), (los[0], los[1]), (his[0], his[1]))
        if step.kind == "binary":
            binary[node] = partial
            for i, inp in enumerate(partial):
                same = regions[inp].box == reg.box and all(torch.equal(regions[inp].origin[ax], reg.origin[ax])
                                                           for ax in range(2))
                if not same:  # a branch whose box is the sum's box is used as it is
                    gathers[(node, i)] = _make_gather(inp, regions[inp], reg.origin, reg.box, (0, 0), 0.0, device)
        elif step.kind == "window":
            assert step.window is not None
            win = step.window
            src = regions[partial[0]]
            shape = ((reg.box[0] - 1) * win.stride[0] + win.dilation[0] * (win.kernel[0] - 1) + 1,
                     (reg.box[1] - 1) * win.stride[1] + win.dilation[1] * (win.kernel[1] - 1) + 1)
            start = (reg.origin[0] * win.stride[0] - win.padding[0], reg.origin[1] * win.stride[1] - win.padding[1])
            pad = (max(0, win.padding[0]), max(0, win.padding[1]))
            gathers[(node, 0)] = _make_gather(partial[0], src, start, shape, pad, win.pad_value, device,
                                              with_mask=win.count is not None)
        # Window and binary nodes whose region is the whole map are computed from their gathered
        # windows and are whole from here on; partial ones stay regions.
        _place(node, reg, regions, full)
    run = total = 0
    for node, step in plan.steps.items():
        if step.kind == "window" and step.window is not None and step.shape is not None and step.window.cost:
            area = step.shape[1] * step.shape[2]
            total += step.window.cost * area
            run += step.window.cost * (area if node not in regions else regions[node].box[0] * regions[node].box[1])
    return _Geometry(regions, gathers, full, run / total if total else 1.0, binary)


# ----------------------------------------------------------------------------- running the copies

_MATERIALIZE, _CLEAN_BOX, _FILL = -1, -2, -3  # gather keys besides a consumer's input index


def _run_node(gm: fx.GraphModule, node: fx.Node, value: Callable[[fx.Node], Any]) -> Any:
    """``node`` evaluated as the traced model would, its inputs from ``value``."""
    args = fx.node.map_arg(node.args, value)
    kwargs = fx.node.map_arg(node.kwargs, value)
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    raise RuntimeError(f"cannot evaluate node {node.name!r} ({node.op})")


class IncrementalRunner:
    """Logits (and a layer's channel totals) of occluded copies, computed incrementally.

    Nakandala et al. (SIGMOD 2019), Sec. 3. ``x`` (N, C, H, W) are the clean images and
    ``source`` what fills the square (:func:`jobs.attribution.occlusion.fill_source`); copy ``k`` of
    the flat stream is image ``k // P`` with the square at position ``k % P`` (row-major grid), as
    in :func:`jobs.attribution.occlusion.occluded_batch`. The clean activations the windows read
    are computed for a few images at a time, as the stream reaches them.
    """

    def __init__(self, plan: Plan, x: torch.Tensor, source: torch.Tensor, window: int, stride: int,
                 feature_layer: str | None, chunk: int):
        self.plan, self.x, self.window, self.stride = plan, x, window, stride
        h, w = x.shape[-2:]
        self.nx = (w - window) // stride + 1
        self.positions = ((h - window) // stride + 1) * self.nx
        key = (window, stride, str(x.device))
        if key not in plan.geometry:
            plan.geometry[key] = _geometry(plan, window, stride, x.device)
        self.geo = geo = plan.geometry[key]
        self.input = next(n for n in plan.steps if plan.steps[n].kind == "input")
        self.feature: fx.Node | None = None
        if feature_layer is not None:
            self.feature = plan.node_of(feature_layer)
            if self.feature is None or self.feature not in geo.regions and self.feature not in geo.full:
                raise Unsupported(f"layer {feature_layer!r} is not one node that depends on the input")
        device = x.device
        # Whole-map gathers for regions read by layers that run in full, and the feature's clean box.
        for node in [*geo.full, *(n for n in plan.steps if plan.steps[n].kind == "output")]:
            if (node, 0) in geo.gathers or node in geo.binary:
                continue
            for a in node.all_input_nodes:
                if a in geo.regions and (a, _MATERIALIZE) not in geo.gathers:
                    reg = geo.regions[a]
                    zero = torch.zeros(self.positions, dtype=torch.long)
                    geo.gathers[(a, _MATERIALIZE)] = _make_gather(a, reg, (zero, zero), reg.size, (0, 0), 0.0, device)
        if self.feature in geo.regions and (self.feature, _CLEAN_BOX) not in geo.gathers:
            reg = geo.regions[self.feature]
            geo.gathers[(self.feature, _CLEAN_BOX)] = _make_gather(self.feature, reg, reg.origin, reg.box,
                                                                   (0, 0), 0.0, device)
        if self.input in geo.regions and (self.input, _FILL) not in geo.gathers:
            reg = geo.regions[self.input]
            geo.gathers[(self.input, _FILL)] = _make_gather(self.input, reg, reg.origin, reg.box,
                                                            (0, 0), 0.0, device)
        self.needed = {(g.source, g.pad, g.pad_value) for k, g in geo.gathers.items() if k[1] != _FILL}
        self.source = source
        self.fill_flat: torch.Tensor | None = None
        if source.shape[-2:] != (1, 1):  # a per-pixel fill (blur): its square is gathered too
            self.fill_flat = source.expand_as(x).permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        # The most images ``chunk`` consecutive copies can span: their clean maps are kept together.
        self.group = min(x.shape[0], math.ceil((chunk - 1) / self.positions) + 1)
        self.lo, self.hi = 0, 0
        self.clean: dict[tuple[fx.Node, tuple[int, int], float], torch.Tensor] = {}
        self.clean_totals: torch.Tensor | None = None
        self.static: dict[fx.Node, Any] = {}

    # -- clean activations of images [lo, hi)

    def _ensure(self, first: int, last: int) -> None:
        if self.lo <= first and last < self.hi:
            return
        lo, hi = first, min(self.x.shape[0], max(last + 1, first + self.group))
        env: dict[fx.Node, Any] = {}
        clean: dict[tuple[fx.Node, tuple[int, int], float], torch.Tensor] = {}
        wanted: dict[fx.Node, list[tuple[tuple[int, int], float]]] = {}
        for src, pad, value in self.needed:
            wanted.setdefault(src, []).append((pad, value))
        steps = self.plan.steps
        for node, step in steps.items():
            if step.kind == "output":
                break
            if step.kind == "input":
                out = self.x[lo:hi]
            elif step.kind == "static" and node in self.static:
                out = self.static[node]
            elif step.kind == "pointwise":  # out of place: the stored clean maps must stay clean
                out = step.fn(env[self._dep_input(node)])  # type: ignore[misc]
            else:
                out = _run_node(self.plan.gm, node, env.__getitem__)
            if step.kind == "static":
                self.static[node] = out
            env[node] = out
            for pad, value in wanted.get(node, []):
                # Channels last and padded as the consuming layer would pad: one gather per window.
                t = out.permute(0, 2, 3, 1)
                if pad != (0, 0):
                    t = F.pad(t, (0, 0, pad[1], pad[1], pad[0], pad[0]), value=value)
                t = t.reshape(-1, out.shape[1]).contiguous()
                # A view of the activation could be overwritten by a later in-place layer.
                clean[(node, pad, value)] = t.clone() if t.data_ptr() == out.data_ptr() else t
            if node is self.feature:
                self.clean_totals = out.reshape(out.shape[0], out.shape[1], -1).double().sum(dim=2)
        self.clean, self.lo, self.hi = clean, lo, hi

    def _dep_input(self, node: fx.Node) -> fx.Node:
        steps = self.plan.steps
        return next(a for a in node.all_input_nodes if steps[a].kind != "static")

    # -- the copies

    def _gather(self, key: tuple[fx.Node, int], local: torch.Tensor, pos: torch.Tensor,
                region: torch.Tensor | None) -> torch.Tensor:
        """Windows (B, C, L, Lw) (channels last): clean cells of each copy's image, its region laid over."""
        g = self.geo.gathers[key]
        table = self.clean[(g.source, g.pad, g.pad_value)]
        index = local[:, None] * g.map_cells + g.cells[pos]  # (B, L * Lw) rows of the clean table
        if region is not None:
            # One gather from [clean rows | region rows]: cheaper than two gathers and a select.
            b, c, bh, bw = region.shape
            rows = region.permute(0, 2, 3, 1).reshape(b * bh * bw, c)
            in_region = torch.arange(b, device=pos.device)[:, None] * (bh * bw) + g.region_cells[pos] + len(table)
            index = torch.where(g.in_region[pos], in_region, index)
            table = torch.cat([table, rows.to(table.dtype)])
        out = table[index]  # (B, L * Lw, C)
        return out.view(len(pos), g.shape[0], g.shape[1], -1).permute(0, 3, 1, 2)

    def _fill_region(self, img: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        reg = self.geo.regions[self.input]
        if self.fill_flat is None:
            return self.source[img].expand(len(img), self.x.shape[1], *reg.box)
        g = self.geo.gathers[(self.input, _FILL)]
        out = self.fill_flat[img[:, None] * g.map_cells + g.cells[pos]]
        return out.view(len(pos), g.shape[0], g.shape[1], -1).permute(0, 3, 1, 2)

    def logits(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, classes) of the copies ``flat``, and the feature layer's channel totals (B, K)."""
        from jobs.attribution.occlusion import occluded_batch

        img, pos = flat // self.positions, flat % self.positions
        self._ensure(int(img.min()), int(img.max()))
        local = img - self.lo
        geo, steps = self.geo, self.plan.steps
        env: dict[fx.Node, Any] = {}
        whole: dict[fx.Node, torch.Tensor] = {}
        totals: torch.Tensor | None = None

        def value(a: fx.Node) -> Any:
            if a in geo.regions:  # read by a layer that runs in full: make the map whole
                if a not in whole:
                    whole[a] = self._gather((a, _MATERIALIZE), local, pos, env[a])
                return whole[a]
            return env[a]

        for node, step in steps.items():
            kind = step.kind
            if kind == "static":
                env[node] = self.static[node]
            elif kind == "input":
                env[node] = (self._fill_region(img, pos) if node in geo.regions else
                             occluded_batch(self.x, self.source, flat, self.nx, self.window, self.stride))
            elif kind == "output":
                return value(node.args[0]), totals  # type: ignore[arg-type]
            elif kind == "window" and (node, 0) in geo.gathers:
                win = step.window
                assert win is not None
                src = geo.gathers[(node, 0)].source
                out = win.op(self._gather((node, 0), local, pos, env[src] if src in geo.regions else None))
                mask = geo.gathers[(node, 0)].mask_count
                if mask is not None:  # average over the real cells only (count_include_pad=False)
                    out = out / win.op(mask[pos].to(out.dtype))
                env[node] = out
            elif kind == "binary" and node in geo.binary:
                a, b = (self._gather((node, i), local, pos, env[inp]) if (node, i) in geo.gathers else env[inp]
                        for i, inp in enumerate(geo.binary[node]))
                env[node] = step.fn(a, b)  # type: ignore[misc]
            elif kind == "pointwise" and node in geo.regions:
                env[node] = step.fn(env[self._dep_input(node)])  # type: ignore[misc]
            else:
                env[node] = _run_node(self.plan.gm, node, value)
            if node is self.feature:
                out = env[node]
                if node in geo.regions:
                    # Clean total - clean over the box + new over the box (the rest is unchanged).
                    assert self.clean_totals is not None
                    box = self._gather((node, _CLEAN_BOX), local, pos, None)
                    totals = (self.clean_totals[local] - box.double().sum(dim=(2, 3))
                              + out.double().sum(dim=(2, 3))).float()
                else:
                    totals = out.reshape(out.shape[0], out.shape[1], -1).float().sum(dim=2)
        raise RuntimeError("the graph has no output")
