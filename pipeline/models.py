"""Models: build from a manifest spec, load checkpoints safely, list layers.

Sources: ``torchvision`` (architecture by name, weights from a local file), ``builtin``
(CIFAR ResNets, the demo CNN), ``python`` (``module:callable``; runs your code by design)
and ``torchscript``. Checkpoints are read with ``torch.load(..., weights_only=True)``
only, so a checkpoint file can never run code; plain state dicts, ``{"state_dict": ...}``
wrappers and ``module.`` prefixes all load.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jobs import REGISTRY
from jobs.core import hooks
from pipeline.errors import ManifestError, UserError, suggest
from pipeline.manifest import (
    MODEL_SOURCES,
    BuiltinModel,
    Manifest,
    ModelSpec,
    Preprocess,
    PythonModel,
    TorchScriptModel,
    TorchvisionModel,
    format_loc,
)

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, unwrapped from common containers; never unpickles code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any failure here is a bad file, reported as such
        raise UserError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}".split("\n")[0]) from None
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise UserError(f"checkpoint {path} holds no state dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (DataParallel's ``module.``, torch.compile's ``_orig_mod.``)."""
    for _ in range(3):
        if set(state) & expected:
            return state
        for p in _PREFIXES:
            if all(k.startswith(p) for k in state):
                state = {k[len(p):]: v for k, v in state.items()}
                break
        else:
            return state
    return state


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a checkpoint file into ``model`` strictly, with a readable error on mismatch."""
    expected = set(model.state_dict())
    state = _strip_prefixes(read_state_dict(path), expected)
    missing = sorted(expected - set(state) - {k for k in expected if k.endswith("num_batches_tracked")})
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

        parts = [f"missing keys: {head(missing)}"] if missing else []
        parts += [f"unexpected keys: {head(unexpected)}"] if unexpected else []
        raise UserError(f"checkpoint {path} does not fit the model: " + "; ".join(parts))
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit the model: {str(e).splitlines()[-1].strip()}") from None


def _python_model(spec: PythonModel) -> nn.Module:
    module_name, fn_name = spec.entrypoint.split(":")
    for p in reversed(spec.python_path):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"model.entrypoint: cannot import {module_name!r}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"model.entrypoint: {module_name!r} has no callable {fn_name!r}")
    model = fn(**spec.kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"model.entrypoint: {spec.entrypoint} returned {type(model).__name__}, not an nn.Module")
    return model


def spec_from_json(data: dict[str, Any]) -> ModelSpec:
    """A model spec validated back from its ``model_dump(mode="json")`` (what workers are sent)."""
    spec = MODEL_SOURCES[data["source"]].model_validate(data)
    if not isinstance(spec, (TorchvisionModel, BuiltinModel, PythonModel, TorchScriptModel)):
        raise TypeError(f"model source {data['source']!r} built a {type(spec).__name__}, not a model spec")
    return spec


def load_model(spec: ModelSpec, allow_untrained_demo: bool = False, seed: int = 0) -> nn.Module:
    """Build the model a spec names, load its weights, and put it in eval mode (on the CPU).

    Randomly initialised parts are seeded (``torch.manual_seed(seed)`` before the constructor),
    so every worker builds the same model.
    The demo CNN trains itself when its weights file is missing, unless
    ``allow_untrained_demo`` (used by validation, which only needs the architecture).
    """
    torch.manual_seed(seed)
    if isinstance(spec, TorchvisionModel):
        import torchvision

        kwargs = {"num_classes": spec.num_classes} if spec.num_classes else {}
        model = torchvision.models.get_model(spec.name, weights=None, **kwargs)
        if spec.weights is not None:
            load_weights(model, spec.weights)
    elif isinstance(spec, BuiltinModel):
        from pipeline.zoo import BUILTINS

        kwargs = {"num_classes": spec.num_classes} if spec.num_classes else {}
        model = BUILTINS[spec.name](**kwargs)
        if spec.weights is not None:
            if spec.name == "demo_cnn" and not spec.weights.is_file():
                if allow_untrained_demo:
                    return model.eval()
                from pipeline.demo import DEMO_EPOCHS, checkpoint_path, train_demo_model

                # The same training keeps the states of manifests/demo-checkpoints.yaml's series.
                train_demo_model(spec.weights, checkpoints={e: checkpoint_path(spec.weights, e) for e in DEMO_EPOCHS})
            load_weights(model, spec.weights)
    elif isinstance(spec, PythonModel):
        model = _python_model(spec)
        if spec.weights is not None:
            load_weights(model, spec.weights)
    elif isinstance(spec, TorchScriptModel):
        try:
            model = torch.jit.load(str(spec.path), map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise UserError(f"model.path: cannot load TorchScript file {spec.path}: {str(e).splitlines()[0]}") from None
    else:  # pragma: no cover -- the manifest's discriminated union rules this out
        raise TypeError(f"unknown model spec {spec!r}")
    return model.eval()


def random_init_model(spec: ModelSpec, seed: int) -> nn.Module:
    """The spec's architecture with no weights loaded: initialised by its constructor after
    ``torch.manual_seed(seed)``, in eval mode (the baseline of an untrained network). The same on
    every worker; for a checkpoint series, the architecture of the series."""
    if isinstance(spec, TorchScriptModel):
        raise UserError("model: a TorchScript file holds its weights inside; a random_init baseline needs a "
                        "model convscope builds itself (source builtin, torchvision or python)")
    bare = spec.model_copy(update={"weights": None, "checkpoints": None, "weights_glob": None})
    return load_model(bare, allow_untrained_demo=True, seed=seed)


def model_hash(spec: ModelSpec, model: nn.Module) -> str:
    """sha256 of the weights file, or of the parameters when there is no file."""
    path = getattr(spec, "weights", None) or getattr(spec, "path", None)
    h = hashlib.sha256()
    if path is not None and Path(path).is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "sha256:" + h.hexdigest()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def layer_names(model: nn.Module) -> list[str]:
    """Hookable layer names as ``named_modules()`` spells them (the root excluded)."""
    return [n for n, _ in model.named_modules() if n]


def preprocess_of(spec: ModelSpec) -> Preprocess:
    """The spec's preprocessing: validating a spec fills in its source's defaults, so only a
    spec built without validation can lack it."""
    if spec.preprocess is None:
        raise ValueError(f"model spec (source {spec.source!r}) has no preprocess: it was not validated "
                         "(validation fills in the source's defaults)")
    return spec.preprocess


def input_size_of(spec: ModelSpec) -> tuple[int, int]:
    """(H, W) of every model input: validation always fixes it (the source's default crop)."""
    size = preprocess_of(spec).output_size()
    if size is None:
        raise ValueError(f"model spec (source {spec.source!r}): preprocess gives no fixed input size "
                         "(set crop, or resize as [height, width])")
    return size


def input_shape(preprocess: Preprocess) -> tuple[int, int, int]:
    h, w = preprocess.output_size() or (224, 224)
    return (3, h, w)


@contextmanager
def capture(model: nn.Module, layers: Sequence[str], detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`jobs.core.hooks.capture`, with an unknown layer a user error that suggests names.

    Outputs are cloned: a later in-place op (``ReLU(inplace=True)`` after a BatchNorm, as in
    torchvision's ResNets) would otherwise change what was recorded.
    """
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules:
            raise UserError(suggest(name, layer_names(model), "layer"))
    with hooks.capture(model, layers, detach=detach) as store:
        yield store


def layer_shapes(model: nn.Module, shape: tuple[int, int, int]) -> list[tuple[str, str, tuple[int, ...] | None]]:
    """(name, module type, output shape without batch) for every module, from one dry forward."""
    names = layer_names(model)
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())

    def hook_for(name: str) -> hooks.Hook:
        def hook(out: torch.Tensor) -> None:
            shapes[name] = tuple(out.shape[1:])
        return hook

    # TorchScript submodules take no Python hooks; they are listed without a shape.
    with hooks.forward_hooks(model, {n: hook_for(n) for n in names}, skip_unhookable=True), torch.no_grad():
        model(torch.zeros((1, *shape)))
    return [(n, type(modules[n]).__name__ if not isinstance(modules[n], torch.jit.ScriptModule)
             else modules[n].original_name, shapes.get(n)) for n in names]


def load_each_model(spec: ModelSpec, allow_untrained_demo: bool = False) -> Iterator[tuple[str | None, nn.Module]]:
    """Each model a spec names, one at a time: ``(None, model)`` for one weights file, or
    ``(name, model)`` for each checkpoint of a series. A checkpoint that does not load names its
    field, ``model.checkpoints[i].weights``."""
    from pipeline.checkpoints import model_specs

    specs = model_specs(spec)
    for i, (name, one) in enumerate(specs.items()):
        try:
            model = load_model(one, allow_untrained_demo)
        except UserError as e:
            if name is None:
                raise
            raise UserError(f"model.checkpoints[{i}].weights ({name}): {e}") from None
        yield name, model


def check_manifest(manifest: Manifest) -> None:
    """Build the model (every checkpoint of a series) and check every analysis' layers exist in it
    (no Ray needed)."""
    for i, (_, model) in enumerate(load_each_model(manifest.model, allow_untrained_demo=True)):
        if i == 0:
            check_layers(manifest, model)


def check_labels(manifest: Manifest, model: nn.Module, labels: np.ndarray, where: str) -> None:
    """Every entry's check of the dataset's labels against the model (e.g. a fine-tune's head):
    a UserError naming the entries and the dataset (``where``) when one fails."""
    problems = []
    for i, params in enumerate(manifest.analyses):
        message = REGISTRY[params.type](params).check_labels(model, labels)
        if message:
            problems.append(f"{format_loc(('analyses', i))}: {message} (dataset {where})")
    if problems:
        raise UserError("; ".join(problems))


def check_layers(manifest: Manifest, model) -> None:
    """Every layer an analysis names must be a module path of ``model``."""
    names = layer_names(model)
    scripted = isinstance(model, torch.jit.ScriptModule)
    problems = []
    size = input_size_of(manifest.model)
    for i, params in enumerate(manifest.analyses):
        analysis = REGISTRY[params.type](params)
        found = []
        for sub, layer in analysis.layers():
            if scripted:
                found.append(f"{format_loc(('analyses', i) + sub)}: a TorchScript model runs as one compiled "
                             "graph and cannot be hooked at its layers; load it with source 'python' or "
                             f"'torchvision' to read layer {layer!r} (analyses of the output work)")
                break
            if layer not in names:
                found.append(f"{format_loc(('analyses', i) + sub)}: {suggest(layer, names, 'layer')}")
        if not found:  # the entry's own checks may look its layers up
            found = [f"{format_loc(('analyses', i) + sub)}: {message}"
                     for sub, message in analysis.check_model(model, size)]
        problems += found
    if problems:
        raise ManifestError(str(manifest.source or manifest.name), problems)
