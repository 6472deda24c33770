"""Gradient-based attribution kernels: saliency, guided backprop, deconvnet, CAM and Grad-CAM.

Conventions: ``x`` is a batch of normalised inputs (N, C, H, W), the model is in eval mode
(BatchNorm on running statistics, so the images of a batch are independent), ``targets`` is a
LongTensor (N,) of class indices and an image's class score is its pre-softmax logit
``model(x)[i, targets[i]]``. Because the images are independent, the gradient of the *sum* of
the selected logits gives every image's own gradient in one forward and one backward.

Nothing here changes the caller's model: gradients come from ``torch.autograd.grad`` (the
parameters' ``.grad`` stay as they were), hooks are removed in ``finally`` blocks, and the
modified ReLU rules are applied by a torch-function mode, not by replacing modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from jobs.core.hooks import forward_to, record_calls

RULES = ("guided", "deconvnet")

# Every public spelling of ReLU. ``F.relu_`` is ``torch.relu_`` itself; ``nn.ReLU.forward``
# calls ``F.relu``. The mode sees only the outermost call: while ``__torch_function__`` runs,
# the mode is popped, so ``F.relu``'s own call to ``torch.relu`` never reaches it (one ReLU,
# one rule).
_RELU_OUT_OF_PLACE = (F.relu, torch.relu, torch.Tensor.relu)
_RELU_IN_PLACE = (torch.relu_, torch.Tensor.relu_)


class _ReluWithRule(torch.autograd.Function):
    """ReLU whose forward is exactly ``relu`` and whose backward follows ``rule``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rule: str, inplace: bool) -> torch.Tensor:
        ctx.rule = rule
        if inplace:
            # True in-place, as the plain model does it: autograd rebases the tensor's history.
            out = x.relu_()
            ctx.mark_dirty(out)
        else:
            out = torch.relu(x)
        # relu(x) > 0 exactly where x > 0, so the output carries the forward mask (and, unlike
        # the input, survives an in-place ReLU).
        ctx.save_for_backward(out if rule == "guided" else None)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        g = grad.clamp(min=0)
        if ctx.rule == "guided":
            (out,) = ctx.saved_tensors
            g = g.masked_fill(out <= 0, 0)
        return g, None, None


class ReluRuleMode(TorchFunctionMode):
    """Torch-function mode that routes every ReLU of a forward through ``_ReluWithRule``.

    ``calls`` counts the ReLUs it rewrote (those whose input needs a gradient).
    """

    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule
        self.calls = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        inplace = func in _RELU_IN_PLACE
        if inplace or func in _RELU_OUT_OF_PLACE:
            x = args[0] if args else kwargs.get("input")
            if func is F.relu:
                inplace = bool(args[1] if len(args) > 1 else kwargs.get("inplace", False))
            # Without a graph to record there is no backward to change: run the plain op.
            if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
                self.calls += 1
                return _ReluWithRule.apply(x, self.rule, inplace)
        return func(*args, **kwargs)


def _check_rule(rule: str | None) -> None:
    if rule is not None and rule not in RULES:
        raise ValueError(f"unknown backprop rule {rule!r}; expected one of {', '.join(RULES)} or None")


@contextmanager
def relu_rule(rule: Literal["guided", "deconvnet"]) -> Iterator[ReluRuleMode]:
    """Make every ReLU of the forward passes run inside the block use a modified backward.

    guided: Springenberg et al., "Striving for Simplicity: The All Convolutional Net",
    ICLR-W 2015 -- ``grad_in = clamp(grad_out, min=0) * (input > 0)``.
    deconvnet: Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks",
    ECCV 2014 -- ``grad_in = clamp(grad_out, min=0)``.

    The forward value is exactly ``relu(input)``. Module ReLUs (``nn.ReLU``, in place or not)
    and functional ones inside a model's ``forward`` (``F.relu``, ``F.relu_``, ``torch.relu``,
    ``torch.relu_``, ``Tensor.relu``, ``Tensor.relu_``) are all caught, without touching the
    model. In-place ReLUs stay in place (``ctx.mark_dirty``, views included), so a forward
    that drops the return value of an in-place ReLU still sees the rectified tensor. Only
    ReLUs that record a graph (grad mode on, input requiring grad) are rewritten; the graph
    keeps the rule, so the backward may run after the block ends. Yields the mode; its
    ``calls`` counts the ReLUs rewritten so far. Other ReLU-like ops (``relu6``,
    ``leaky_relu``, ``clamp``) keep their ordinary backward.
    """
    if rule not in RULES:
        raise ValueError(f"unknown backprop rule {rule!r}; expected one of {', '.join(RULES)}")
    mode = ReluRuleMode(rule)
    with mode:
        yield mode


@contextmanager
def _grad_enabled() -> Iterator[None]:
    # Callers often sit inside no_grad / inference_mode; attribution needs a graph regardless.
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _forward(model: nn.Module, x: torch.Tensor, rule: str | None) -> torch.Tensor:
    if rule is None:
        return model(x)
    with relu_rule(rule):  # type: ignore[arg-type]
        return model(x)


def _class_score_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2:
        raise ValueError(f"expected (N, classes) logits, got shape {tuple(logits.shape)}")
    t = torch.as_tensor(targets, device=logits.device).long().reshape(-1)
    if t.numel() != logits.shape[0]:
        raise ValueError(f"{t.numel()} targets for a batch of {logits.shape[0]} images")
    return logits.gather(1, t[:, None]).sum()


def _leaf_input(x: torch.Tensor) -> torch.Tensor:
    # A fresh leaf: the caller's tensor may be an inference tensor or read-only.
    return x.detach().clone().requires_grad_(True)


def input_gradients(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, rule: str | None = None
) -> torch.Tensor:
    """Gradient of each image's class score w.r.t. its input pixels, (N, C, H, W).

    rule None: saliency, Simonyan et al., "Deep Inside Convolutional Networks: Visualising
    Image Classification Models and Saliency Maps", ICLR-W 2014 -- ``d y_c / d x``.
    rule "guided" / "deconvnet": the same backward with ReLUs following ``relu_rule``.
    """
    _check_rule(rule)
    with _grad_enabled():
        xg = _leaf_input(x)
        score = _class_score_sum(_forward(model, xg, rule), targets)
        (grad,) = torch.autograd.grad(score, xg)
    return grad.detach().float()


def neuron_positions(acts: torch.Tensor, channel: int | torch.Tensor,
                     at: str | tuple[int, int] | torch.Tensor) -> torch.Tensor:
    """Where in each image's map of ``channel`` the chosen unit sits, (N, 2) as (y, x).

    ``acts`` is a layer's output (N, K, h, w) (or (N, K): a unit per channel, at (0, 0));
    ``channel`` one index, or one per image (N,).
    ``at``: ``"max"`` -- the position of the channel's largest value in each image (the first
    in row-major order on ties); ``"center"`` -- ``(h // 2, w // 2)``; ``(y, x)`` -- that
    position in every image; an (N, 2) tensor -- given per image.
    """
    if acts.dim() == 2:
        acts = acts[:, :, None, None]
    if acts.dim() != 4:
        raise ValueError(f"a neuron target needs a (N, K, h, w) or (N, K) layer output, got {tuple(acts.shape)}")
    n, k, h, w = acts.shape
    channels = torch.as_tensor(channel, dtype=torch.long).reshape(-1)
    if len(channels) not in (1, n):
        raise ValueError(f"{len(channels)} neuron channels for {n} images: give one, or one per image")
    channels = channels.expand(n) if n else channels[:0]
    if len(channels) and not (0 <= int(channels.min()) and int(channels.max()) < k):
        shown = channel if isinstance(channel, int) else channels.tolist()
        raise ValueError(f"neuron channel {shown} is out of range: the layer has {k} channels (0..{k - 1})")
    if isinstance(at, torch.Tensor):
        pos = at.to("cpu", torch.long).reshape(n, 2)
    elif at == "max":
        maps = acts.detach()[torch.arange(n, device=acts.device), channels.to(acts.device)]
        flat = maps.reshape(n, -1).float().argmax(dim=1).cpu()
        pos = torch.stack([flat // w, flat % w], dim=1)
    elif at == "center":
        pos = torch.tensor([[h // 2, w // 2]]).expand(n, 2)
    else:
        pos = torch.tensor([list(at)], dtype=torch.long).expand(n, 2)
    if len(pos) and not (0 <= int(pos[:, 0].min()) and int(pos[:, 0].max()) < h
                         and 0 <= int(pos[:, 1].min()) and int(pos[:, 1].max()) < w):
        raise ValueError(f"neuron position {pos.tolist()[0]} is outside the layer's {h}x{w} map")
    return pos.contiguous()


def neuron_gradients(
    model: nn.Module, x: torch.Tensor, layer: str, channel: int | torch.Tensor,
    at: str | tuple[int, int] | torch.Tensor = "max", rule: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of one activation per image w.r.t. its input pixels, under a ReLU ``rule``.

    "Pick a single intermediate neuron and compute the gradient of its value with respect to
    the image pixels": the unit is ``layer``'s output at ``(channel, y, x)``, the position
    chosen per image by ``at`` (see :func:`neuron_positions`). With ``rule`` "guided" or
    "deconvnet" the ReLUs up to the layer (its own included) follow :func:`relu_rule`: the
    projections of Zeiler & Fergus (ECCV 2014, Fig. 2) and Springenberg et al. (2015).
    The forward stops at ``layer``.

    Returns ``(grads (N, C, H, W), positions (N, 2) as (y, x), values (N,))``, detached.
    """
    _check_rule(rule)
    with _grad_enabled():
        xg = _leaf_input(x)
        if rule is None:
            acts = forward_to(model, layer, xg)
        else:
            with relu_rule(rule):  # type: ignore[arg-type]
                acts = forward_to(model, layer, xg)
        pos = neuron_positions(acts, channel, at)
        a = acts if acts.dim() == 4 else acts[:, :, None, None]
        rows = torch.arange(len(x), device=a.device)
        # A copy: the caller's indices may be inference tensors, which autograd cannot save.
        channels = torch.as_tensor(channel, dtype=torch.long).reshape(-1).expand(len(x)).to(a.device).clone()
        values = a[rows, channels, pos[:, 0].to(a.device), pos[:, 1].to(a.device)]
        if not values.requires_grad:
            raise ValueError(f"layer {layer!r} output is not part of the autograd graph")
        (grad,) = torch.autograd.grad(values.sum(), xg)
    return grad.detach().float(), pos, values.detach().float().cpu()


def _only_call(seen: list[torch.Tensor], layer: str) -> torch.Tensor:
    if len(seen) != 1:
        raise ValueError(
            f"layer {layer!r} ran {len(seen)} times in one forward; pick a layer that runs exactly once"
        )
    return seen[0]


def layer_gradients(
    model: nn.Module, x: torch.Tensor, layer: str, targets: torch.Tensor, rule: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations of ``layer``, the class score's gradient w.r.t. them, and the logits.

    Returns ``(A, d y_c / d A, logits)``: (N, K, h, w), (N, K, h, w), (N, classes), detached.
    The gradient is the input of Grad-CAM (Selvaraju et al., ICCV 2017); ``rule`` applies
    ``relu_rule`` to the ReLUs between the layer and the logits.
    """
    _check_rule(rule)
    with _grad_enabled(), record_calls(model, layer) as seen:
        xg = _leaf_input(x)
        logits = _forward(model, xg, rule)
        acts = _only_call(seen, layer)
        if not acts.requires_grad:
            raise ValueError(f"layer {layer!r} output is not part of the autograd graph")
        (grad,) = torch.autograd.grad(_class_score_sum(logits, targets), acts)
    return acts.detach(), grad.detach(), logits.detach()


class ClassForward:
    """One forward of ``x`` with a graph: its logits choose the targets, then :meth:`gradients`
    backpropagates the chosen class scores through that same graph (no second forward).

    The gradients are taken w.r.t. the input pixels, or w.r.t. ``layer``'s output when given
    (Grad-CAM); ``rule`` applies :func:`relu_rule` to the ReLUs, whose forward values are
    exactly ``relu``'s, so the logits are the plain model's. ``logits`` is detached.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, rule: str | None = None, layer: str | None = None):
        _check_rule(rule)
        with _grad_enabled():
            self.input = _leaf_input(x)
            if layer is None:
                out = _forward(model, self.input, rule)
                self.wrt = self.input
            else:
                with record_calls(model, layer) as seen:
                    out = _forward(model, self.input, rule)
                self.wrt = _only_call(seen, layer)
                if not self.wrt.requires_grad:
                    raise ValueError(f"layer {layer!r} output is not part of the autograd graph")
        self.out = out
        self.logits = out.detach()

    def gradients(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """d logits[rows[m], targets[m]] / d (input or layer output) of image ``rows[m]``, for
        every m: (M, ...) detached float32, in the order given.

        An image may be listed several times (top-k targets): its j-th listing is taken in the
        j-th backward of the graph, each backward the gradient of a sum over distinct images
        (which are independent in eval mode), so k targets per image cost k backwards. Call it
        once: its last backward frees the graph.
        """
        if self.out.dim() != 2:
            raise ValueError(f"expected (N, classes) logits, got shape {tuple(self.out.shape)}")
        rows = torch.as_tensor(rows).long().cpu()
        targets = torch.as_tensor(targets).long().cpu()
        grads = torch.empty((len(rows), *self.wrt.shape[1:]), dtype=torch.float32, device=self.wrt.device)
        if not len(rows):
            return grads
        # The how-many-th listing of its image each pair is.
        seen: dict[int, int] = {}
        listing = []
        for r in rows.tolist():
            listing.append(seen.get(r, 0))
            seen[r] = listing[-1] + 1
        occurrence = torch.tensor(listing, dtype=torch.long)
        last = max(listing)
        device = self.out.device
        with _grad_enabled():
            for j in range(last + 1):
                pick = torch.nonzero(occurrence == j).flatten()
                r, t = rows[pick].to(device), targets[pick].to(device)
                score = self.out[r, t].sum()
                (grad,) = torch.autograd.grad(score, self.wrt, retain_graph=j < last)
                grads[pick.to(grads.device)] = grad[r.to(grad.device)].float()
        return grads

    def activations(self, rows: torch.Tensor) -> torch.Tensor:
        """The layer's output (or the input) of the images ``rows``, detached."""
        return self.wrt.detach()[torch.as_tensor(rows).long().to(self.wrt.device)]


def grad_cam(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps (N, K, h, w) x2 -> (N, h, w).

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017: ``alpha_k = mean_ij dy/dA_k[i,j]``,
    ``map = ReLU(sum_k alpha_k A_k)``.
    """
    if activations.dim() != 4 or activations.shape != grads.shape:
        raise ValueError(
            f"grad_cam expects two (N, K, h, w) tensors of one shape, got "
            f"{tuple(activations.shape)} and {tuple(grads.shape)}"
        )
    alpha = grads.mean(dim=(2, 3))
    return torch.einsum("nkhw,nk->nhw", activations, alpha).clamp(min=0)


def cam(activations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Class activation maps (N, K, h, w), (N, K) -> (N, h, w), raw (no ReLU).

    Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016:
    ``map_c = sum_k w_{c,k} A_k``, with ``weights[i]`` the final linear layer's row for image
    i's target class.
    """
    if activations.dim() != 4 or weights.shape != activations.shape[:2]:
        raise ValueError(
            f"cam expects (N, K, h, w) activations and (N, K) weights, got "
            f"{tuple(activations.shape)} and {tuple(weights.shape)}"
        )
    return torch.einsum("nkhw,nk->nhw", activations, weights.to(activations.dtype))


def find_cam_head(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The (classes, K) matrix W with ``logits = W @ mean_ij(A) + b`` for ``layer``'s A.

    CAM (Zhou et al., CVPR 2016) needs this head. W is the last ``nn.Linear`` in
    ``model.modules()`` order; the identity is then checked on ``x`` in one forward, so a
    head that merely looks right (flatten + linear, a ReLU after the layer) is refused.
    """

    def refuse(found: str) -> ValueError:
        return ValueError(
            "cam needs a model whose logits are a linear layer applied to the global average "
            f"pool of layer '{layer}'; {found}; use grad_cam for other models"
        )

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise refuse("the model has no nn.Linear")
    fc = linears[-1]
    with torch.no_grad(), record_calls(model, layer) as seen:
        logits = model(x)
        acts = _only_call(seen, layer)
    if acts.dim() != 4:
        raise refuse(f"the layer's output has shape {tuple(acts.shape)}, not (N, K, h, w)")
    if logits.dim() != 2:
        raise refuse(f"the logits have shape {tuple(logits.shape)}, not (N, classes)")
    weight = fc.weight.detach()
    if weight.shape != (logits.shape[1], acts.shape[1]):
        raise refuse(
            f"the last linear layer is {fc.in_features} -> {fc.out_features}, but the layer has "
            f"{acts.shape[1]} channels and the logits {logits.shape[1]} classes"
        )
    pooled = acts.mean(dim=(2, 3)).to(weight.dtype)
    expected = pooled @ weight.T
    if fc.bias is not None:
        expected = expected + fc.bias.detach()
    # 1e-4 relative to the logits' size: float32 sums in a different order differ by about that.
    atol = 1e-4 * max(1.0, float(logits.abs().max()))
    if not torch.allclose(expected.to(logits.dtype), logits, rtol=1e-4, atol=atol):
        diff = float((expected.to(logits.dtype) - logits).abs().max())
        raise refuse(
            f"the last linear layer applied to the pooled activations misses the logits by up to {diff:.3g}"
        )
    return weight.clone().float()


def reduce_channels(grads: torch.Tensor, signed: bool) -> torch.Tensor:
    """Pixel gradients (N, C, H, W) -> (N, H, W) by max_c |g| (Simonyan et al. 2014), or as is.

    signed=False: ``max_c |grad_c|`` per pixel, the saliency map of Simonyan et al.
    signed=True: the gradients unchanged, (N, C, H, W).
    """
    if grads.dim() != 4:
        raise ValueError(f"reduce_channels expects (N, C, H, W) gradients, got shape {tuple(grads.shape)}")
    if signed:
        return grads
    return grads.abs().amax(dim=1)
