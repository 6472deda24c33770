"""The baselines of ``scripts/bench.py``: plain PyTorch loops and the peer libraries.

Every baseline here is what a user would write in a notebook instead of a manifest: a
``DataLoader`` with worker processes decoding the image files, the model, and the method
(hand-written torch, captum, pytorch-grad-cam, faiss or scikit-learn), keeping the results
in memory. Each returns ``(seconds, results)``; the harness checks the results against
convscope's and prints the agreement beside the ratio.

The peers are benchmark extras (``pip install -e .[bench]``); a missing one is skipped.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from jobs.core.hooks import layer_module
from jobs.core.pixels import pixels_to_inputs
from pipeline.decode import decode_image
from pipeline.models import capture
from pipeline.worker import autocast, resolve_device


@dataclass
class Loop:
    """What every plain loop shares: the images, the model and how batches are fed."""

    paths: list[str]
    model_spec: object        # pipeline.manifest model spec (source, weights, preprocess)
    batch_size: int
    loader_workers: int
    device: torch.device
    precision: str = "float32"
    channels_last: bool = False

    def load_model(self) -> torch.nn.Module:
        from pipeline.models import load_model

        model = load_model(self.model_spec).to(self.device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def batches(self, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        """Normalised (N, 3, H, W) float32 inputs on the device, decoded by loader workers."""
        pre = self.model_spec.preprocess
        loader = torch.utils.data.DataLoader(
            _Files(self.paths, pre.resize, pre.crop), batch_size=batch_size or self.batch_size,
            num_workers=self.loader_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False)
        for pixels in loader:
            x = pixels_to_inputs(pixels.to(self.device, non_blocking=True), pre.mean, pre.std)
            yield x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self):
        return autocast(self.device, self.precision)


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], resize, crop):
        self.paths, self.resize, self.crop = paths, resize, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with open(self.paths[i], "rb") as f:
            return torch.from_numpy(decode_image(f.read(), self.resize, self.crop).copy())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- dataset passes


def features_loop(loop: Loop, layers: list[str]) -> tuple[float, dict[str, np.ndarray]]:
    """DataLoader -> model with forward hooks -> global-average-pooled features per layer."""
    start = time.perf_counter()
    model = loop.load_model()
    out: dict[str, list] = {layer: [] for layer in layers}
    # The outputs as they are, not cloned: what a hand-written hook keeps.
    with torch.inference_mode(), loop.autocast(), capture(model, layers, detach=False) as acts:
        for x in loop.batches():
            model(x)
            for layer in layers:
                out[layer].append(acts[layer].float().mean(dim=(2, 3)).cpu())
    _sync(loop.device)
    seconds = time.perf_counter() - start
    return seconds, {layer: torch.cat(v).numpy() for layer, v in out.items()}


def stats_loop(loop: Loop, layers: list[str], k: int) -> tuple[float, dict[str, dict[str, np.ndarray]]]:
    """DataLoader -> model -> per channel: mean over all positions of all images, and the k
    largest per-image maxima over the dataset (a running top-k)."""
    start = time.perf_counter()
    model = loop.load_model()
    total: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    top: dict[str, torch.Tensor] = {}
    with torch.inference_mode(), loop.autocast(), capture(model, layers, detach=False) as acts:
        for x in loop.batches():
            model(x)
            for layer in layers:
                a = acts[layer].double()
                total[layer] = total.get(layer, 0) + a.sum(dim=(0, 2, 3))
                count[layer] = count.get(layer, 0) + a.shape[0] * a.shape[2] * a.shape[3]
                peaks = acts[layer].float().amax(dim=(2, 3)).T  # (C, N)
                both = peaks if layer not in top else torch.cat([top[layer], peaks], 1)
                top[layer] = both.topk(min(k, both.shape[1]), dim=1).values
    seconds = time.perf_counter() - start
    return seconds, {layer: {"mean": (total[layer] / count[layer]).numpy(), "top": top[layer].numpy()}
                     for layer in layers}


# ----------------------------------------------------------------------------- attribution


Method = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def attribution_loop(loop: Loop, method: Method, batch_size: int | None = None,
                     relu_modules: bool = False, seed: int = 0) -> tuple[float, np.ndarray]:
    """DataLoader -> model (the predicted class of each image) -> ``method(model, x, targets)``.

    ``relu_modules``: hand the method :func:`module_relus` of the model (captum's ReLU rules
    only see ``nn.ReLU`` modules). ``seed`` seeds torch's generator after the model is loaded
    (loading may seed it), for methods that draw noise. Returns the maps of all images, in the order of
    ``loop.paths``, as float32 numpy.
    """
    start = time.perf_counter()
    model = loop.load_model()
    if relu_modules:
        model = module_relus(model)
    torch.manual_seed(seed)
    maps = []
    for x in loop.batches(batch_size):
        with torch.no_grad():
            targets = model(x).argmax(dim=1)
        with warnings.catch_warnings():
            # captum says on every call that it set requires_grad and hooked the ReLUs.
            warnings.simplefilter("ignore", UserWarning)
            maps.append(method(model, x, targets).detach().float().cpu())
    _sync(loop.device)
    seconds = time.perf_counter() - start
    return seconds, torch.cat(maps).numpy()


class _Shallow(torch.fx.Tracer):
    """Traces one module's own ``forward``: every child stays a ``call_module``."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return True


def module_relus(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose functional ReLUs (``F.relu``, ``torch.relu``, ``x.relu()``)
    are ``nn.ReLU`` modules, module names kept (``layer3`` is still ``layer3``).

    The computation is unchanged; captum's ``GuidedBackprop``, ``Deconvolution`` and
    ``GuidedGradCam`` hook ``nn.ReLU`` modules only, and the reference CIFAR ResNets (as
    many models) call ``F.relu``. A module whose ``forward`` cannot be traced is kept as is.
    """
    import copy

    module = copy.deepcopy(module)

    def rewrite(m: torch.nn.Module) -> torch.nn.Module:
        for name, child in list(m.named_children()):
            if any(True for _ in child.children()):
                setattr(m, name, rewrite(child))
        try:
            graph = _Shallow().trace(m)
        except Exception:  # noqa: BLE001 -- data-dependent control flow: leave this module alone
            return m
        gm = torch.fx.GraphModule(m, graph, class_name=type(m).__name__)
        count = 0
        for node in list(gm.graph.nodes):
            functional = node.op == "call_function" and node.target in (F.relu, torch.relu)
            method = node.op == "call_method" and node.target == "relu"
            if not (functional or method):
                continue
            name = f"_relu{count}"
            count += 1
            gm.add_submodule(name, torch.nn.ReLU())
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(name, (node.args[0],))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        gm.recompile()
        return gm.train(m.training)

    return rewrite(module)


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def captum_saliency(model, x, targets):
    from captum.attr import Saliency

    return Saliency(model).attribute(x, target=targets, abs=True).amax(dim=1)


def captum_smoothgrad(samples: int, sigma: float) -> Method:
    """captum ``NoiseTunnel(Saliency)``: ``stdevs`` is one number per input tensor, so the
    batch's mean range stands in for convscope's per-image ``sigma * (max - min)``; one noisy
    copy of the whole batch per forward (``nt_samples_batch_size=1``) bounds memory as
    convscope's ``chunk`` does."""
    def method(model, x, targets):
        from captum.attr import NoiseTunnel, Saliency

        span = float((x.flatten(1).amax(1) - x.flatten(1).amin(1)).mean())
        grads = NoiseTunnel(Saliency(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=1, stdevs=sigma * span,
            target=targets, abs=True)
        return grads.amax(dim=1)
    return method


def captum_guided_backprop(model, x, targets):
    from captum.attr import GuidedBackprop

    return GuidedBackprop(model).attribute(x, target=targets).abs().amax(dim=1)


def captum_deconvolution(model, x, targets):
    from captum.attr import Deconvolution

    return Deconvolution(model).attribute(x, target=targets).abs().amax(dim=1)


def captum_grad_cam(layer: str) -> Method:
    def method(model, x, targets):
        from captum.attr import LayerGradCam

        return LayerGradCam(model, layer_module(model, layer)).attribute(
            x, target=targets, relu_attributions=True)[:, 0]
    return method


def captum_guided_grad_cam(layer: str) -> Method:
    def method(model, x, targets):
        from captum.attr import GuidedGradCam

        return GuidedGradCam(model, layer_module(model, layer)).attribute(
            x, target=targets, interpolate_mode="bilinear").abs().amax(dim=1)
    return method


def pytorch_grad_cam(layer: str) -> Method:
    """pytorch-grad-cam ``GradCAM``: maps upsampled to the input and min-max scaled per image."""
    def method(model, x, targets):
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        with GradCAM(model=model, target_layers=[layer_module(model, layer)]) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        return torch.from_numpy(maps)
    return method


def captum_occlusion(window: int, stride: int, per_eval: int) -> Method:
    """captum ``Occlusion`` on the softmax of the model with a zero baseline (convscope's
    ``fill: zero``): per pixel, the mean drop of the target's probability over the windows
    that cover it -- convscope's drawn occlusion map."""
    def method(model, x, targets):
        from captum.attr import Occlusion

        def probs(inputs):
            return torch.softmax(model(inputs), dim=1)

        with torch.no_grad():
            return Occlusion(probs).attribute(
                x, sliding_window_shapes=(x.shape[1], window, window), strides=(x.shape[1], stride, stride),
                baselines=0, target=targets, perturbations_per_eval=per_eval)[:, 0]
    return method


# ----------------------------------------------------------------------------- on vectors


def faiss_knn(vectors: np.ndarray, k: int, metric: str) -> tuple[float, np.ndarray]:
    """faiss ``IndexFlat`` (exact): every vector against all, itself dropped."""
    import faiss

    start = time.perf_counter()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        index = faiss.IndexFlatIP(x.shape[1])
    else:
        index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, found = index.search(x, k + 1)
    seconds = time.perf_counter() - start
    rows = np.arange(len(x))[:, None]
    keep = found != rows
    out = np.stack([r[m][:k] for r, m in zip(found, keep)])
    return seconds, out


def sklearn_tsne(reduced: np.ndarray, perplexity: float, seed: int = 0) -> tuple[float, np.ndarray]:
    """scikit-learn ``TSNE`` (Barnes-Hut) with PCA initialisation, on the same reduced inputs."""
    from sklearn.manifold import TSNE

    start = time.perf_counter()
    out = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=1).fit_transform(
        np.asarray(reduced, np.float64))
    return time.perf_counter() - start, out


# ----------------------------------------------------------------------------- agreement


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row Pearson correlation of two (N, ...) arrays (1.0 where both rows are constant and equal)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    num = (a * b).sum(1)
    both_flat = den == 0
    return np.where(both_flat, np.where(np.abs(a).sum(1) + np.abs(b).sum(1) == 0, 1.0, 0.0),
                    num / np.where(both_flat, 1.0, den))


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) -> (N, H, W), bilinear as convscope draws its maps."""
    t = torch.from_numpy(np.asarray(maps, np.float32))
    if tuple(t.shape[1:]) == tuple(size):
        return t.numpy()
    return F.interpolate(t[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def neighbour_preservation(features: np.ndarray, coords: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each point's k nearest neighbours in ``features`` that are also among
    its k nearest in the 2-D ``coords`` (1 = the map keeps every neighbourhood)."""
    from sklearn.neighbors import NearestNeighbors

    def nn(x):
        return NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)[:, 1:]

    a, b = nn(features), nn(coords)
    return float(np.mean([len(set(r) & set(s)) / k for r, s in zip(a, b)]))


def main(argv: list[str] | None = None) -> None:
    """``python -m scripts.bench_peers features MANIFEST OUT.npz --layers a b``: the plain loop as
    a process of its own over a manifest's images and model (scripts/bench.py times it whole)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("what", choices=["features"])
    p.add_argument("manifest")
    p.add_argument("out")
    p.add_argument("--layers", nargs="+", required=True)
    p.add_argument("--loader-workers", type=int, default=2)
    args = p.parse_args(argv)
    from pipeline.datasets import list_dataset
    from pipeline.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    ex = manifest.execution
    device = resolve_device(ex.device)
    paths = list_dataset(manifest.dataset).table.column("source").to_pylist()
    loop = Loop(paths, manifest.model, ex.batch_size, args.loader_workers, device, ex.precision, ex.channels_last)
    _, features = features_loop(loop, args.layers)
    np.savez(args.out, **features)


if __name__ == "__main__":  # python -m scripts.bench_peers ..., from the repository root
    main()
