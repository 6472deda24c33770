"""``execution.compile``: a model's shared inference forward under ``torch.compile``.

Only the forward every fused analysis shares (logits and the outputs of the stage's layers,
under inference mode) is compiled. Attribution passes, gradients and analyses that hook the
model themselves call the eager module, which compiling leaves untouched: ``torch.compile(model)``
wraps it and shares its parameters.

Why the layer hooks are installed once, before compiling: dynamo inlines the hooks a module
has when it traces, and does not guard on hooks added or removed later (they would silently
not run, or keep running). So the tap's hooks stay on the model for the worker's lifetime and
record only while the compiled forward runs (``active``, a flag dynamo guards on); in an eager
forward they return at once. When the model carries any other hook at call time, the forward
runs eagerly with :func:`pipeline.models.capture`, as without compiling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from jobs.core.hooks import first_tensor, layer_module


def hook_count(model: nn.Module) -> int:
    """Forward and backward hooks on ``model`` and its submodules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", ())) for m in model.modules())


class CompiledForward:
    """``model(x)`` compiled, with the outputs of ``layers`` (detached clones, as ``capture`` keeps).

    Called with inputs, returns ``(logits, {layer: output})``. A compile or run failure of the
    compiled forward turns compiling off for good: ``warn`` is told once, and that call and every
    later one run eagerly. ``backend``: torch.compile's (tests use ``eager``, which traces
    without generating code).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], warn: Callable[[str], None],
                 backend: str | Callable = "inductor"):
        self.model, self.layers, self.warn = model, list(dict.fromkeys(layers)), warn
        self.active = False
        self.store: dict[str, torch.Tensor] = {}
        self.handles = [layer_module(model, name).register_forward_hook(self._hook(name)) for name in self.layers]
        self.own_hooks = len(self.handles)
        self.compiled: Callable[[torch.Tensor], Any] | None = torch.compile(model, backend=backend)

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self.active:
                self.store[name] = first_tensor(output, name).detach().clone()
        return hook

    def __call__(self, x: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
        failure: Exception | None = None
        # Another hook on the model (an analysis' own, say) would be invisible to compiled code.
        if self.compiled is not None and hook_count(self.model) == self.own_hooks:
            self.store.clear()
            self.active = True
            try:
                logits = self.compiled(x)
                return logits, dict(self.store)
            except Exception as e:  # noqa: BLE001 -- no compiler, an unsupported op: eager may still work
                failure = e
            finally:
                self.active = False
                self.store.clear()
        from pipeline.models import capture

        # An input the eager model fails on too is the input's fault, not compiling's: it raises.
        with capture(self.model, self.layers) as acts:
            logits = self.model(x)
        if failure is not None:
            self.compiled = None
            text = " ".join(str(failure).split())  # torch's messages run over many lines
            self.warn(f"execution.compile: compiling the model failed ({type(failure).__name__}: "
                      f"{text[:300]}); it runs eagerly")
        return logits, acts

    def close(self) -> None:
        """Remove the tap's hooks (the model is eager and unhooked again)."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.own_hooks, self.compiled = [], 0, None
