"""Forward hooks on named layers: every hook convscope registers goes through here, and every
one is removed when its ``with`` block ends, whatever happens inside it.

A layer's output is its first tensor when the module returns a tuple or list (a recurrent
block, a detector head); hooks see that tensor and may return a replacement for it.

>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
>>> with capture(net, ["0", "2"]) as seen:
...     _ = net(torch.zeros(1, 3, 5, 5))
>>> {name: tuple(t.shape) for name, t in seen.items()}
{'0': (1, 4, 5, 5), '2': (1, 2, 5, 5)}
>>> forward_to(net, "1", torch.zeros(1, 3, 5, 5)).shape
torch.Size([1, 4, 5, 5])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# What a hook is given (a layer's first output tensor) and may return (its replacement).
Hook = Callable[[torch.Tensor], torch.Tensor | None]


def layer_module(model: nn.Module, layer: str, allow_root: bool = False) -> nn.Module:
    """The module named ``layer``; ``""`` (the model itself) only with ``allow_root``.

    Like ``nn.Module.get_submodule``, with an error that lists the layers there are.
    """
    modules = dict(model.named_modules())
    if layer not in modules or (not layer and not allow_root):
        names = [n for n in modules if n]
        raise ValueError(f"no layer {layer!r} in the model; valid layers: {', '.join(names)}")
    return modules[layer]


def first_tensor(output: Any, layer: str) -> torch.Tensor:
    """A layer's output tensor (the first element when it returns a tuple or list)."""
    first = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(first, torch.Tensor):
        raise ValueError(f"layer {layer!r} returned {type(first).__name__}, not a tensor")
    return first


def _replace_first(output: Any, first: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (first, *output[1:])
    if isinstance(output, list):
        return [first, *output[1:]]
    return first


@contextmanager
def forward_hooks(model: nn.Module, hooks: Mapping[str, Hook], allow_root: bool = False,
                  skip_unhookable: bool = False) -> Iterator[None]:
    """Call ``hooks[layer](output)`` after every forward of each named layer.

    A hook that returns a tensor replaces the layer's output (its first tensor) for the rest of
    the forward. ``skip_unhookable`` passes over modules that take no Python hooks
    (TorchScript submodules) and outputs that hold no tensor, instead of failing.
    """
    handles = []

    def wrap(name: str, hook: Hook) -> Callable[[nn.Module, Any, Any], Any]:
        def run(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            first = output[0] if isinstance(output, (tuple, list)) and output else output
            if skip_unhookable and not isinstance(first, torch.Tensor):
                return None
            replaced = hook(first_tensor(output, name))
            return None if replaced is None else _replace_first(output, replaced)
        return run

    try:
        for name, hook in hooks.items():
            module = layer_module(model, name, allow_root=allow_root)
            try:
                handles.append(module.register_forward_hook(wrap(name, hook)))
            except (RuntimeError, AttributeError):
                if not skip_unhookable:
                    raise
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(model: nn.Module, layers: Sequence[str], detach: bool = True, keep: str = "last"
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of each of ``layers`` into the yielded dict while the block runs.

    ``detach`` stores a detached clone (safe from later in-place ops); otherwise the output
    itself, still in the autograd graph. A layer that runs more than once in a forward keeps
    its ``last`` output, or its ``first`` one.
    """
    if keep not in ("first", "last"):
        raise ValueError(f"keep must be 'first' or 'last', got {keep!r}")
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Hook:
        def hook(output: torch.Tensor) -> None:
            if keep == "first" and name in seen:
                return
            seen[name] = output.detach().clone() if detach else output
        return hook

    with forward_hooks(model, {name: hook_for(name) for name in dict.fromkeys(layers)}):
        yield seen


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` (every submodule) in eval mode while the block runs; each module's own mode after,
    also when the block raises.

    >>> m = nn.Sequential(nn.Dropout(), nn.Linear(2, 2)).train()
    >>> with eval_mode(m):
    ...     m[0].training
    False
    >>> m[0].training
    True
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


@contextmanager
def record_calls(model: nn.Module, layer: str) -> Iterator[list[torch.Tensor]]:
    """Every output of ``layer`` while the block runs, still in the autograd graph.

    The forward continues on a clone of each, so that a later in-place op (``ReLU(inplace=True)``)
    changes the clone, not the recorded tensor, which ``autograd.grad`` also needs unmodified.
    """
    seen: list[torch.Tensor] = []

    def hook(output: torch.Tensor) -> torch.Tensor:
        seen.append(output)
        return output.clone()

    with forward_hooks(model, {layer: hook}):
        yield seen


def layer_outputs(model: nn.Module, x: torch.Tensor, layers: list[str]
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's output and every layer of ``layers``' output (float32) for inputs ``x``.

    One forward, no gradients; a layer that runs more than once keeps its first output.
    """
    with torch.no_grad(), capture(model, layers, keep="first") as found:
        out = model(x)
    return out.detach().float(), {name: t.float() for name, t in found.items()}


class _Reached(Exception):
    """Raised by :func:`forward_to`'s hook to stop the forward once its layer has run."""


def forward_to(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s output for ``x`` (``""``: the model's output), without running the layers after it.

    The forward stops (by an exception its hook raises) once ``layer`` has run, so the layers
    after it cost nothing; the result is part of the autograd graph when ``x`` needs grad.
    """
    found: list[torch.Tensor] = []

    def hook(output: torch.Tensor) -> None:
        found.append(output)
        raise _Reached

    try:
        with forward_hooks(model, {layer: hook}, allow_root=True):
            model(x)
    except _Reached:
        pass
    if not found:
        raise ValueError(f"layer {layer!r} did not run in the model's forward")
    return found[0]
