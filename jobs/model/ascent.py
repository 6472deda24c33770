"""Gradient ascent on the input ("activation maximisation"): images that a unit likes most.

- Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks: Visualising Image
  Classification Models and Saliency Maps" (ICLR-W 2014): class models,
  ``argmax_I S_c(I) - lambda ||I||^2``.
- Yosinski, Clune, Nguyen, Fuchs & Lipson, "Understanding Neural Networks Through Deep
  Visualization" (ICML-W 2015): the pixel-space regularisers L2 decay, Gaussian blur every
  few steps, and clipping of pixels with a small norm or a small contribution.
- Olah, Mordvintsev & Schubert, "Feature Visualization" (Distill 2017) and the lucid library:
  images parameterised by a scaled, decorrelated Fourier spectrum and optimised through random
  jitter, scaling and rotation ("transformation robustness").

Many units (classes, channels) are optimised together, one per batch row, and a row's result
does not depend on which rows share its batch: every regulariser is per image, Adam is
elementwise, and all random transforms come from one generator seeded by ``seed`` and are
applied identically to every row. Starting images are the caller's (see :func:`init_images`
and :class:`FourierImage`, both seeded per row).

:class:`AscentAnalysis` is what ``class_model`` and ``neuron_ascent`` share: the manifest
fields (:class:`AscentParams`), seeding per unit, the optimisation of a group of units as one
batch, and the rows and pictures of the results.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Literal, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from jobs.core.base import (
    AnalysisParams,
    ModelAnalysis,
    ModelContext,
    ReduceOutput,
    SampleSpec,
    safe_key,
    sample_ids,
    unit_seed,
)
from jobs.core.kernels import gaussian_blur

# lucid's square root of the ImageNet colour correlation matrix (``color_correlation_svd_sqrt``);
# normalised by its largest column norm as lucid does (``max_norm_svd_sqrt``).
_COLOR_SQRT = np.array([[0.26, 0.09, 0.02],
                        [0.27, 0.00, -0.05],
                        [0.27, -0.09, 0.03]], dtype=np.float32)
COLOR_CORRELATION = torch.from_numpy(_COLOR_SQRT / np.linalg.norm(_COLOR_SQRT, axis=0).max())


@dataclass(frozen=True)
class AscentSettings:
    """How :func:`ascend` optimises; the regularisers marked [Yosinski] apply to pixel images only."""

    steps: int = 200
    lr: float = 0.05
    parameterization: Literal["pixel", "fourier"] = "pixel"
    l2: float = 1e-4            # L2 decay rate per step (pixel: centred image *= 1 - l2)  [Yosinski]
    blur_every: int = 4         # Gaussian blur of the image every k steps (0 = never)      [Yosinski]
    blur_sigma: float = 0.5
    clip_norm: float = 0.0      # percentile: pixels with a small norm over channels -> mean colour (0 = off)
    clip_contribution: float = 0.0  # percentile: pixels with small |sum_c x_c * grad_c| -> mean colour (0 = off)
    jitter: int = 2             # random roll by up to +-jitter px before each forward (both axes)
    transforms: bool = True     # fourier only: random jitter + scale + small rotation (Olah et al.)
    decorrelate: bool = True    # fourier only: colour decorrelation


@dataclass
class AscentResult:
    """Final images and objective values of one :func:`ascend`."""

    images: Tensor   # (n, 3, H, W) final images in [0, 1], cpu float32
    start: Tensor    # (n,) objective at the initial images (no jitter / transforms)
    final: Tensor    # (n,) objective at the final images (no jitter / transforms)
    history: Tensor  # (n, k) objective every max(1, steps // 50) steps (jittered forwards)


# ---------------------------------------------------------------- starting points


def _row_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def init_images(n: int, size: tuple[int, int], seeds: Sequence[int], scale: float = 0.1) -> Tensor:
    """(n, 3, H, W) starting images in [0, 1]: grey 0.5 plus N(0, scale^2) noise, row i seeded by ``seeds[i]``."""
    if len(seeds) != n:
        raise ValueError(f"init_images: {n} images but {len(seeds)} seeds")
    h, w = size
    rows = [0.5 + scale * torch.randn(3, h, w, generator=_row_generator(s)) for s in seeds]
    if not rows:
        return torch.zeros(0, 3, h, w)
    return torch.stack(rows).clamp_(0, 1)


def _rfft2_freqs(h: int, w: int) -> Tensor:
    """|f| of each rfft2 coefficient, (h, w // 2 + 1), in cycles per pixel."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


class FourierImage(nn.Module):
    """Images parameterised by their scaled 2D Fourier spectrum, in a decorrelated colour space (Olah et al. 2017).

    ``image() = sigmoid(C @ irfft2(spectrum * scale) / 4)`` per pixel, with
    ``scale = 1 / max(|f|, 1 / max(H, W))`` (decay power 1): equal-sized parameters give a
    1/f ("natural") spectrum, so steps move low frequencies more. ``norm="ortho"`` equals lucid's
    ``irfft2d`` times ``sqrt(H W)``, and /4 is lucid's constant. ``C`` is lucid's ImageNet
    colour-correlation square root (identity when ``decorrelate`` is False).
    """

    scale: Tensor  # buffers, registered in __init__
    color: Tensor

    def __init__(self, n: int, size: tuple[int, int], seeds: Sequence[int], sd: float = 0.01,
                 decorrelate: bool = True):
        super().__init__()
        if len(seeds) != n:
            raise ValueError(f"FourierImage: {n} images but {len(seeds)} seeds")
        h, w = size
        self.size = (int(h), int(w))
        self.decorrelate = decorrelate
        freqs = _rfft2_freqs(h, w)
        # Real and imaginary parts (last axis), each row drawn from its own generator.
        shape = (3, *freqs.shape, 2)
        rows = [sd * torch.randn(shape, generator=_row_generator(s)) for s in seeds]
        self.spectrum = nn.Parameter(torch.stack(rows) if rows else torch.zeros(0, *shape))
        self.register_buffer("scale", 1.0 / torch.clamp(freqs, min=1.0 / max(h, w)))
        self.register_buffer("color", COLOR_CORRELATION.clone() if decorrelate else torch.eye(3))

    def image(self) -> Tensor:
        """(n, 3, H, W) images in [0, 1] (differentiable in ``spectrum``)."""
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        t = torch.fft.irfft2(spectrum, s=self.size, norm="ortho") / 4.0
        # out_i = sum_j C_ij t_j at every pixel (lucid: t_flat @ C.T).
        t = torch.einsum("ij,njhw->nihw", self.color, t)
        return torch.sigmoid(t)


# ---------------------------------------------------------------- regularisers (Yosinski et al.)


def l2_decay(centred: Tensor, rate: float) -> Tensor:
    """Shrink the centred image towards the mean colour: ``x * (1 - rate)``."""
    return centred * (1.0 - rate)


def row_quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q, dim=1, keepdim=True)`` (linear interpolation), without its size limit."""
    n = values.shape[1]
    s = values.sort(dim=1).values
    pos = q * (n - 1)
    lo = min(int(math.floor(pos)), n - 1)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return s[:, lo:lo + 1] + (s[:, hi:hi + 1] - s[:, lo:lo + 1]) * frac


def _clip_below(centred: Tensor, score: Tensor, percentile: float) -> Tensor:
    """Zero the pixels whose score (N, H, W) is below their own image's percentile."""
    if percentile <= 0 or centred.numel() == 0:
        return centred
    flat = score.flatten(1)
    keep = (flat >= row_quantile(flat, min(percentile, 100.0) / 100.0)).view_as(score)
    return centred * keep[:, None].to(centred.dtype)


def clip_small_norm(centred: Tensor, percentile: float) -> Tensor:
    """Per image, set pixels with ``||x_ij||_2`` (over channels) below its percentile to the mean colour (zero)."""
    return _clip_below(centred, centred.norm(dim=1), percentile)


def clip_small_contribution(centred: Tensor, grad: Tensor, percentile: float) -> Tensor:
    """Per image, zero pixels whose contribution ``|sum_c x_cij * g_cij|`` is below its percentile."""
    return _clip_below(centred, (centred * grad).sum(dim=1).abs(), percentile)


# ---------------------------------------------------------------- random transforms


def jitter(x: Tensor, dx: int, dy: int) -> Tensor:
    """Roll the images by ``dy`` pixels along H and ``dx`` along W (wrapping around)."""
    return torch.roll(x, shifts=(int(dy), int(dx)), dims=(-2, -1))


def _draw_shift(gen: torch.Generator, jitter: int) -> tuple[int, int]:
    dx, dy = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
    return dx, dy


def random_transform(x: Tensor, gen: torch.Generator, jitter: int,
                     scales: Sequence[float] = (1, 0.975, 1.025, 0.95, 1.05), degrees: float = 5.0) -> Tensor:
    """One random shift (+-``jitter`` px), scale (from ``scales``) and rotation (+-``degrees``) for the whole batch.

    Differentiable (``affine_grid`` + ``grid_sample``, bilinear, borders reflect); output size
    equals the input's. The same four numbers are drawn from ``gen`` whatever the arguments,
    so a generator's sequence does not depend on the batch.
    """
    h, w = x.shape[-2:]
    dx, dy = _draw_shift(gen, jitter)
    s = float(scales[int(torch.randint(len(scales), (1,), generator=gen))])
    angle = math.radians(degrees * (2 * float(torch.rand((), generator=gen)) - 1))
    cos, sin = math.cos(angle) / s, math.sin(angle) / s
    # theta maps output to input coordinates in [-1, 1] units; rotating in pixel units
    # (not normalised ones) keeps angles right on non-square images.
    theta = torch.tensor([[cos, -sin * h / w, -2.0 * dx / w],
                          [sin * w / h, cos, -2.0 * dy / h]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ---------------------------------------------------------------- the ascent


def _values(objective: Callable[[Tensor], Tensor], normalize: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    values = objective(normalize(x))
    if values.shape != (x.shape[0],):
        raise ValueError(f"the objective must return one value per image, shape ({x.shape[0]},); "
                         f"got {tuple(values.shape)}")
    return values


def _regularise(x: Tensor, grad: Tensor, mean: Tensor, settings: AscentSettings, step: int) -> Tensor:
    """Yosinski et al.'s regularisers on the centred image, in their order; back to [0, 1]."""
    centred = x.clamp(0, 1) - mean
    if settings.l2 > 0:
        centred = l2_decay(centred, settings.l2)
    if settings.blur_every > 0 and (step + 1) % settings.blur_every == 0:
        centred = gaussian_blur(centred, settings.blur_sigma)
    centred = clip_small_norm(centred, settings.clip_norm)
    centred = clip_small_contribution(centred, grad, settings.clip_contribution)
    return (centred + mean).clamp(0, 1)


def _trainable_copy(module: FourierImage) -> FourierImage:
    """A deep copy whose tensors are ordinary ones (a caller may have built it in inference mode)."""
    copied = copy.deepcopy(module)
    for p in copied.parameters():
        p.data = p.data.clone()
    for name, b in list(copied.named_buffers()):
        setattr(copied, name, b.clone())
    return copied


def ascend(objective: Callable[[Tensor], Tensor], init: Tensor | FourierImage, normalize: Callable[[Tensor], Tensor],
           settings: AscentSettings, seed: int = 0, mean: Sequence[float] = (0.5, 0.5, 0.5)) -> AscentResult:
    """Maximise ``objective(normalize(image))`` (a (n,) tensor, one value per row) by gradient ascent on the image.

    Step rule: Adam (lr ``settings.lr``) on the pixels, or on the spectrum of a
    :class:`FourierImage`. Adam divides each coordinate's step by its running gradient RMS, so
    the step size does not depend on the objective's scale (a logit, a channel mean or a
    probability all work with lr ~0.05 in [0, 1] pixel units; the tests scale an objective by
    1e-4 and 1e4), and being elementwise it keeps the rows independent. Plain gradient steps
    would need an lr per objective; steps normalised by the image's mean |gradient| did about
    as well on the demo CNN but have no momentum, and Adam is also what lucid uses for the
    Fourier parameterisation, so one rule serves both.

    Pixel images (``init`` (n, 3, H, W) in [0, 1], not modified): before each forward a random
    roll by up to ``settings.jitter`` px; after each step clamp to [0, 1] and apply, to
    ``x - mean`` (``mean`` the per-channel dataset mean in [0, 1]), L2 decay, a blur every
    ``blur_every`` steps, and the norm / contribution clips (the contribution with the step's
    gradient). Fourier images (``init`` a :class:`FourierImage`, copied, not modified): random
    shift/scale/rotation (or only the roll when ``settings.transforms`` is False); no decay,
    blur or clipping, as the 1/f, decorrelated parameterisation is itself the regulariser
    (Olah et al. 2017). All random draws come from one generator seeded by ``seed``.

    Rows are exactly independent: with a batch-invariant objective a row's result is bitwise
    the same in any batch. Batched convolutions (oneDNN on CPU, cuDNN) round differently for
    different batch sizes (~1e-7), though, and over many steps a ReLU / max-pool network can
    amplify that (one flipped unit changes the gradient discretely) into visibly different images.

    Gradients are taken with ``torch.autograd.grad`` with respect to the image (or spectrum)
    only, so the model's parameters and their ``.grad`` are left alone; grad mode is switched
    on here, so callers may sit in ``no_grad`` or ``inference_mode``.
    """
    fourier = settings.parameterization == "fourier"
    if fourier != isinstance(init, FourierImage):
        raise ValueError(f"parameterization {settings.parameterization!r} needs "
                         f"{'a FourierImage' if fourier else 'an (n, 3, H, W) image tensor'} as init")
    every = max(1, settings.steps // 50)
    gen = _row_generator(seed)
    with torch.inference_mode(False), torch.enable_grad():
        if fourier:
            assert isinstance(init, FourierImage)
            if init.decorrelate != settings.decorrelate:
                raise ValueError(f"settings.decorrelate is {settings.decorrelate} but the FourierImage "
                                 f"was built with decorrelate={init.decorrelate}")
            param = _trainable_copy(init)
            leaf: Tensor = param.spectrum
            image_of = param.image
        else:
            assert isinstance(init, Tensor)
            if init.dim() != 4 or init.shape[1] != 3:
                raise ValueError(f"init must be (n, 3, H, W) images, got shape {tuple(init.shape)}")
            leaf = init.detach().clone().float().clamp_(0, 1).requires_grad_(True)

            def image_of() -> Tensor:
                return leaf
        mean_t = torch.tensor(list(mean), dtype=torch.float32, device=leaf.device).view(1, 3, 1, 1)
        optimizer = torch.optim.Adam([leaf], lr=settings.lr)

        with torch.no_grad():
            start = _values(objective, normalize, image_of()).detach().float().cpu()
        history = []
        for step in range(settings.steps):
            x = image_of()
            if fourier and settings.transforms:
                seen = random_transform(x, gen, settings.jitter)
            else:
                seen = jitter(x, *_draw_shift(gen, settings.jitter))
            values = _values(objective, normalize, seen)
            if step % every == 0:
                history.append(values.detach().float().cpu())
            # Minus: the optimiser descends, we ascend. Only w.r.t. the leaf: the model is untouched.
            (grad,) = torch.autograd.grad(-values.sum(), leaf)
            leaf.grad = grad
            optimizer.step()
            leaf.grad = None
            if not fourier:
                with torch.no_grad():
                    leaf.copy_(_regularise(leaf, -grad, mean_t, settings, step))
        with torch.no_grad():
            images = image_of().detach()
            final = _values(objective, normalize, images).detach().float().cpu()
    n = images.shape[0]
    return AscentResult(
        images=images.float().cpu(),
        start=start,
        final=final,
        history=torch.stack(history, dim=1) if history else torch.zeros(n, 0),
    )


# ---------------------------------------------------------------- the analyses' shared part


class Facets(BaseModel):
    """Multifaceted visualisation (Nguyen, Yosinski & Clune, "Multifaceted Feature Visualization",
    ICML-W 2016): the unit's ``top`` most activating images of a seeded ``sample`` of the dataset,
    clustered by their features (k-means, ``k`` clusters); each facet's ascent starts from its
    cluster's mean image."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(default=3, ge=1, description="facets per unit")
    top: int = Field(default=50, ge=1, description="most activating images clustered per unit")
    sample: SampleSpec = Field(default_factory=lambda: SampleSpec(n=500, seed=0))
    layer: str | None = Field(default=None, description="features clustered (spatial mean); default: the "
                              "unit's layer (neuron_ascent) or the input of the last linear layer")


class AscentParams(AnalysisParams):
    """Fields of ``class_model`` and ``neuron_ascent``: the settings of :func:`ascend`, restarts, size."""

    steps: int = Field(default=200, ge=1)
    lr: float = Field(default=0.05, gt=0)
    parameterization: Literal["pixel", "fourier"] = "pixel"
    l2: float = Field(default=1e-4, ge=0, lt=1)
    blur_every: int = Field(default=4, ge=0)
    blur_sigma: float = Field(default=0.5, ge=0)
    clip_norm: float = Field(default=0.0, ge=0, le=100, description="percentile")
    clip_contribution: float = Field(default=0.0, ge=0, le=100, description="percentile")
    jitter: int = Field(default=2, ge=0)
    transforms: bool = True
    decorrelate: bool = True
    restarts: int = Field(default=1, ge=1, description="optimisations per unit, from different seeded starts")
    seed: int = 0
    size: int | None = Field(default=None, ge=8, description="side of the optimised image; default: the input size")
    cell: int = Field(default=96, ge=8, description="min side in px of each rendered image")
    units_per_task: int = Field(default=16, ge=1, description="units optimised together in one batch")
    facets: Facets | None = None

    @model_validator(mode="after")
    def _facets_start_from_pixels(self) -> AscentParams:
        if self.facets is not None and self.parameterization != "pixel":
            raise ValueError("facets start each ascent from an image: they need parameterization: pixel")
        return self

    def starts(self) -> int:
        """Optimisations per unit: its facets, else its restarts."""
        return self.facets.k if self.facets is not None else self.restarts

    def settings(self) -> AscentSettings:
        return AscentSettings(**{f.name: getattr(self, f.name) for f in fields(AscentSettings)})


class AscentAnalysis(ModelAnalysis):
    """Gradient ascent per unit; subclasses say what a unit is and what it maximises.

    Units are ``(*target, restart)`` tuples. Rows: the subclass' target columns, then
    ``objective``, ``restart``, ``start_value``, ``final_value``, ``steps``, the final image
    raw (``image``: float32 in [0, 1], flattened, ``height`` x ``width`` x 3 channels first),
    the objective's ``history`` and the picture's ``key`` (+ ``shard``).
    """

    Params: ClassVar[type[AscentParams]]
    params: AscentParams

    @property
    def objective_name(self) -> str:
        """The ``objective`` column: what is maximised (e.g. ``logit``)."""
        raise NotImplementedError

    def objective(self, units: list[Any], ctx: ModelContext) -> Callable[[torch.Tensor], torch.Tensor]:
        """For model inputs (len(units), 3, H, W), each row's value to maximise, (len(units),)."""
        raise NotImplementedError

    def describe(self, units: list[Any], images: torch.Tensor, ctx: ModelContext) -> dict[str, pa.Array]:
        """The target columns of the rows (and anything measured on the final ``images``)."""
        raise NotImplementedError

    def facet_layer(self, ctx: ModelContext) -> str:
        """The layer whose features cluster a unit's top images (see :class:`Facets`)."""
        facets = self.params.facets
        if facets is not None and facets.layer is not None:
            return facets.layer
        linears = [name for name, m in ctx.model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("facets: the model has no linear layer; name the clustered layer in facets.layer")
        return linears[-1]

    def select(self, image_ids: Sequence[str]) -> list[str] | None:
        f = self.params.facets
        return None if f is None else sample_ids(list(image_ids), f.sample.n, f.sample.seed)

    def facet_starts(self, units: list[Any], ctx: ModelContext, size: tuple[int, int]
                     ) -> tuple[torch.Tensor, list[list[str]]]:
        """Each unit's facet: the mean image (in [0, 1], ``size``) of the ``facet``-th cluster of its
        target's top images, and the cluster's image ids. Clusters are ordered by size (largest
        first, ties by their first image id), so a facet index means the same in every task."""
        from sklearn.cluster import KMeans

        f = self.params.facets
        if f is None:
            raise ValueError("facet_starts needs facets")
        ids = sorted(ctx.pixels)
        if not ids:
            raise ValueError("facets: none of the sampled images decoded")
        pool = ctx.images(ids).to(ctx.device)
        x = ctx.normalize(pool)
        layer = self.facet_layer(ctx)
        features = facet_features(ctx.model, x, layer, self.params.units_per_task)
        starts, members = [], []
        found: dict[tuple[Any, ...], list[tuple[torch.Tensor, list[str]]]] = {}
        for u in units:
            target = tuple(u[:-1])
            if target not in found:
                with torch.no_grad():
                    values = torch.cat([self.objective([u] * len(x[s:s + 64]), ctx)(x[s:s + 64]).float().cpu()
                                        for s in range(0, len(x), 64)])
                order = sorted(range(len(ids)), key=lambda i: (-float(values[i]), ids[i]))[:f.top]
                k = min(f.k, len(order))
                labels = KMeans(n_clusters=k, n_init=10, random_state=self.params.seed).fit_predict(
                    features[order].numpy().astype(np.float64))
                clusters = [[order[j] for j in range(len(order)) if labels[j] == c] for c in range(k)]
                clusters = [c for c in clusters if c]  # identical images can leave a cluster empty
                clusters.sort(key=lambda c: (-len(c), ids[c[0]]))
                found[target] = [(pool[c].float().mean(dim=0), [ids[i] for i in c]) for c in clusters]
            facets = found[target]
            image, chosen = facets[u[-1] % len(facets)]
            starts.append(F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
                          if tuple(image.shape[-2:]) != size else image)
            members.append(chosen)
        return torch.stack(starts).clamp(0, 1), members

    def run(self, units: list[Any], ctx: ModelContext) -> ReduceOutput:
        from jobs.core.render import enlarge

        p = self.params
        settings = p.settings()
        size = (p.size, p.size) if p.size else (ctx.input_size[0], ctx.input_size[1])
        seeds = [unit_seed(p.seed, list(u)) for u in units]
        members: list[list[str]] | None = None
        if p.facets is not None:
            init: torch.Tensor | FourierImage
            init, members = self.facet_starts(units, ctx, size)
        elif settings.parameterization == "fourier":
            init = FourierImage(len(units), size, seeds, decorrelate=settings.decorrelate).to(ctx.device)
        else:
            init = init_images(len(units), size, seeds).to(ctx.device)
        result = ascend(self.objective(units, ctx), init, ctx.normalize, settings, seed=p.seed, mean=ctx.mean)
        n = len(units)
        columns = dict(self.describe(units, result.images.to(ctx.device), ctx))
        keys = [safe_key("-".join(map(str, (p.entry_name, *u)))) for u in units]
        pictures = (result.images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        images = [(k, Image.fromarray(enlarge(pic, p.cell))) for k, pic in zip(keys, pictures)]
        columns.update({
            "objective": pa.array([self.objective_name] * n, pa.string()),
            "restart": pa.array([u[-1] for u in units], pa.int32()),
            "start_value": pa.array(result.start.numpy(), pa.float32()),
            "final_value": pa.array(result.final.numpy(), pa.float32()),
            "steps": pa.array([p.steps] * n, pa.int32()),
            "image": pa.array(list(result.images.reshape(n, -1).numpy()), pa.list_(pa.float32())),
            "height": pa.array([size[0]] * n, pa.int32()),
            "width": pa.array([size[1]] * n, pa.int32()),
            "history": pa.array(list(result.history.numpy()), pa.list_(pa.float32())),
            "key": pa.array(keys, pa.string()),
        })
        if members is not None:
            columns["facet"] = pa.array([u[-1] for u in units], pa.int32())
            columns["facet_images"] = pa.array(members, pa.list_(pa.string()))
        return ReduceOutput(tables={"": pa.table(columns)}, images=images)


def facet_features(model: nn.Module, x: torch.Tensor, layer: str, chunk: int = 64) -> torch.Tensor:
    """``layer``'s input features for clustering: the input of a linear layer, else its output,
    averaged over space, (N, D) float32 on the CPU."""
    from jobs.core.hooks import layer_module

    module = layer_module(model, layer)
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        value = inputs[0] if isinstance(module, nn.Linear) else (output[0] if isinstance(output, tuple) else output)
        seen.append(value.detach().float().reshape(value.shape[0], value.shape[1], -1).mean(dim=2).cpu())

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for s in range(0, len(x), max(1, chunk)):
                model(x[s:s + chunk])
    finally:
        handle.remove()
    return torch.cat(seen)
