"""``occlusion``: how a model's output changes as a square of each image is covered.

Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks" (ECCV 2014),
Sec. 4.2 and Fig. 7. For each position of a ``window`` x ``window`` square moved by
``stride``: the target's probability (``prob_map``), the most probable class
(``label_map``) and, with ``feature``, the total activation of one unit (``feature_map``).
All positions of all images of a batch run as one stream of forwards of at most ``chunk``
inputs: never one forward per position, and memory bounded whatever the image count. Models
built from convolutions, pooling, BatchNorm, elementwise activations and residual sums run
incrementally (:mod:`jobs.attribution.incremental`, Nakandala et al., SIGMOD 2019): each copy
recomputes only what its square changes, with the same maps; ``incremental: false`` turns it off.

Example manifest entry::

    - type: occlusion
      window: 8
      stride: 4
      fill: zero          # zero (model input 0: the normalisation mean colour) | mean | blur
      feature: {layer: layer3, channel: 7}   # or channel: strongest (per image, Z&F Fig. 7 b-c)
      incremental: true   # recompute only the changed region of each layer (same maps)

With ``channel: strongest`` each image's channel is the one of ``layer`` with the largest total
activation on the clean image (``feature_channel``), and ``feature_projection`` (3, H, W,
float32, signed) is that feature map's strongest activation projected into the image by the
deconvnet rule (Fig. 7 c), drawn beside the overlay (``projection_key``).

Table columns: see :mod:`jobs.attribution.base`; the maps are (ny, nx) with
``ny = (H - window) // stride + 1`` (in ``height``/``width``). The scored and drawn map is the
per-pixel mean probability drop over the windows that cover each pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from jobs.attribution import incremental as incremental_path
from jobs.attribution.base import Attribution, AttributionAnalysis, AttributionParams
from jobs.attribution.incremental import IncrementalRunner, Plan, Unsupported, cached_plan, has_hooks
from jobs.core.base import FLOATS, MapBatch, register
from jobs.core.hooks import Hook, forward_hooks
from jobs.core.kernels import gaussian_blur

Fill = Literal["mean", "zero", "blur"]
FILLS: tuple[str, ...] = ("mean", "zero", "blur")


def occlusion_grid(height: int, width: int, window: int, stride: int) -> tuple[int, int]:
    """Number of square positions (ny, nx): ``ny = (H - window) // stride + 1``, same for x.

    Top-left corners are ``y in range(0, H - window + 1, stride)``; a square never leaves
    the image, so with a stride that does not divide ``H - window`` the last rows/columns
    are covered only partly.
    """
    if window < 1:
        raise ValueError(f"occlusion window must be at least 1 pixel, got {window}")
    if stride < 1:
        raise ValueError(f"occlusion stride must be at least 1 pixel, got {stride}")
    if window > min(height, width):
        raise ValueError(f"occlusion window {window} is larger than the {height}x{width} image")
    return (height - window) // stride + 1, (width - window) // stride + 1


def fill_source(x: torch.Tensor, fill: Fill, window: int, blur_sigma: float | None = None) -> torch.Tensor:
    """What goes under the square, broadcastable to ``x`` (N, C, H, W) (normalised inputs).

    ``zero``: 0 in model-input space -- for inputs normalised by the dataset mean, the mean
    colour (Zeiler & Fergus's grey square); ``mean``: each image's own per-channel mean;
    ``blur``: the image blurred with ``gaussian_blur(x, blur_sigma)``, ``blur_sigma``
    defaulting to ``window / 2``. ``blur_sigma`` is ignored by the other fills.
    """
    if fill == "zero":
        return x.new_zeros((1, 1, 1, 1)).expand(x.shape[0], 1, 1, 1)
    if fill == "mean":
        return x.mean(dim=(2, 3), keepdim=True)
    if fill == "blur":
        sigma = window / 2 if blur_sigma is None else float(blur_sigma)
        if not sigma > 0:
            raise ValueError(f"blur_sigma must be > 0, got {blur_sigma}")
        return gaussian_blur(x, sigma)
    raise ValueError(f"unknown occlusion fill {fill!r}; expected one of {', '.join(FILLS)}")


def occluded_batch(x: torch.Tensor, source: torch.Tensor, flat: torch.Tensor, nx: int, window: int,
                   stride: int) -> torch.Tensor:
    """Occluded copies for a stream of flat (image, position) indices, one copy per index.

    Index ``k`` is image ``k // (ny * nx)`` with the square's top-left corner at
    ``(p // nx * stride, p % nx * stride)``, ``p = k % (ny * nx)``; inside the square the
    pixels come from ``source`` (see :func:`fill_source`), elsewhere from ``x``.
    """
    h, w = x.shape[-2:]
    per_image = ((h - window) // stride + 1) * nx
    img, pos = flat // per_image, flat % per_image
    y0 = (pos // nx * stride)[:, None]
    x0 = (pos % nx * stride)[:, None]
    rows = torch.arange(h, device=x.device)[None]
    cols = torch.arange(w, device=x.device)[None]
    inside = (((rows >= y0) & (rows < y0 + window))[:, :, None]
              & ((cols >= x0) & (cols < x0 + window))[:, None, :])
    return torch.where(inside[:, None], source[img], x[img])


def _feature_hook(model: nn.Module, feature: tuple[str, int | None], sink: list[torch.Tensor]) -> dict[str, Hook]:
    """A hook on ``feature``'s layer that appends each forward's per-image channel total to ``sink``
    (every channel's, (B, K), when the channel is None)."""
    layer, channel = feature
    modules = dict(model.named_modules())
    if layer not in modules:
        names = ", ".join(repr(n) for n in modules if n)
        raise ValueError(f"no layer {layer!r} in the model; valid layers: {names}")
    if channel is not None and channel < 0:
        raise ValueError(f"feature channel must be >= 0, got {channel}")

    def hook(out: torch.Tensor) -> None:
        if out.dim() < 2:
            raise ValueError(f"layer {layer!r} output has shape {tuple(out.shape)}; no channel axis")
        if channel is None:
            sink.append(out.reshape(out.shape[0], out.shape[1], -1).float().sum(dim=2))
            return
        if channel >= out.shape[1]:
            raise ValueError(f"feature channel {channel} is out of range: layer {layer!r} has "
                             f"{out.shape[1]} channels")
        # A copy now: a later in-place op (ReLU(inplace=True)) would overwrite this output.
        sink.append(out[:, channel].clone().reshape(out.shape[0], -1).float().sum(dim=1))

    return {layer: hook}


def occlusion_sweep(model: nn.Module, x: torch.Tensor, targets: torch.Tensor | Sequence[int], window: int,
                    stride: int, fill: Fill = "zero", blur_sigma: float | None = None,
                    feature: tuple[str, int | None] | None = None, chunk: int = 256,
                    incremental: bool = True) -> dict[str, torch.Tensor]:
    """Occlusion maps of a batch: target probability, predicted class and optionally a unit's total.

    Zeiler & Fergus (ECCV 2014), Fig. 7: a ``window`` x ``window`` square slides with
    ``stride`` over each image of ``x`` (normalised model inputs, (N, C, H, W)); for each
    top-left corner ``(y, x)`` on the grid of :func:`occlusion_grid`, with the square
    filled as :func:`fill_source` says, the model gives

    - ``prob_map`` (N, ny, nx) float32: ``softmax(logits)[targets[i]]``;
    - ``label_map`` (N, ny, nx) int64: ``argmax(logits)``; ties go to the lowest class
      index (``torch.argmax`` returns the first maximum);
    - ``feature_map`` (N, ny, nx) float32, with ``feature=(layer, channel)``: the sum over
      positions of that channel of that layer's output (a forward hook; ``output[0]`` for
      tuple outputs). A channel of None takes, per image, the *strongest* channel: the one
      with the largest total on the clean image (ties to the lowest index; Zeiler & Fergus
      Fig. 7 b), returned as ``feature_channel`` (N,).

    Also ``clean_prob`` (N,): the target probability of the unoccluded images, and with
    ``feature`` ``clean_feature`` (N,). All positions of all images form one flat stream of
    (image, position) pairs run through the model ``chunk`` occluded copies per forward;
    each chunk's copies are built from their indices, so at most ``chunk`` exist at once.
    The clean images take ``ceil(N / chunk)`` forwards more. Results do not depend on
    ``chunk`` or on how images are batched (up to float rounding). The model is put in
    eval mode; outputs are on the CPU.

    With ``incremental`` (the default) and a model :mod:`jobs.attribution.incremental` can
    trace and run (Nakandala et al., SIGMOD 2019), each copy recomputes only the part of each
    layer the square changes, reading the rest from the clean image's activations; the maps
    are the same up to float rounding. Other models, and ``incremental=False``, run the copies
    through the model in full.
    """
    if x.dim() != 4:
        raise ValueError(f"occlusion_sweep expects images (N, C, H, W), got shape {tuple(x.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    n, _, h, w = x.shape
    ny, nx = occlusion_grid(h, w, window, stride)
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if targets.numel() != n:
        raise ValueError(f"{targets.numel()} targets for {n} images")
    targets = targets.to(x.device)
    model.eval()

    feats: list[torch.Tensor] = []
    hooks = _feature_hook(model, feature, feats) if feature is not None else {}
    clean, probs, labels = [], [], []
    with torch.inference_mode():
        with forward_hooks(model, hooks):
            source = fill_source(x, fill, window, blur_sigma)
            for s in range(0, n, chunk):
                logits = model(x[s:s + chunk]).float()
                if s == 0 and not 0 <= int(targets.min()) <= int(targets.max()) < logits.shape[1]:
                    raise ValueError(f"targets must lie in [0, {logits.shape[1]}), got "
                                     f"{int(targets.min())}..{int(targets.max())}")
                clean.append(logits.softmax(dim=1).gather(1, targets[s:s + chunk, None])[:, 0].cpu())
        clean_feats, feats[:] = list(feats), []
        strongest = None
        if feature is not None and feature[1] is None:
            totals = torch.cat(clean_feats)
            strongest = totals.argmax(dim=1)
            clean_feats = [totals.gather(1, strongest[:, None])[:, 0]]
        # Checked with the feature hook removed: the incremental path reports the feature itself.
        runner = _incremental_runner(model, x, source, window, stride, feature, chunk) if incremental else None
        total = n * ny * nx
        with forward_hooks(model, hooks if runner is None else {}):
            for s in range(0, total, chunk):
                flat = torch.arange(s, min(s + chunk, total), device=x.device)
                if runner is not None:
                    copies, unit = runner.logits(flat)
                    logits = copies.float()
                    if unit is not None:
                        feats.append(unit if feature is None or feature[1] is None else unit[:, feature[1]])
                else:
                    logits = model(occluded_batch(x, source, flat, nx, window, stride)).float()
                if strongest is not None:  # each copy keeps its own image's strongest channel only
                    feats[-1] = feats[-1].gather(1, strongest[flat // (ny * nx), None].to(feats[-1].device))[:, 0]
                probs.append(logits.softmax(dim=1).gather(1, targets[flat // (ny * nx), None])[:, 0].cpu())
                labels.append(logits.argmax(dim=1).cpu())

    def joined(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        # Concatenated outside inference mode, so callers get ordinary tensors.
        return torch.cat(parts).to("cpu", dtype) if parts else torch.zeros(0, dtype=dtype)

    out = {
        "prob_map": joined(probs, torch.float32).view(n, ny, nx),
        "label_map": joined(labels, torch.int64).view(n, ny, nx),
        "clean_prob": joined(clean, torch.float32),
    }
    if feature is not None:
        out["feature_map"] = joined([f.cpu() for f in feats], torch.float32).view(n, ny, nx)
        out["clean_feature"] = joined([f.cpu() for f in clean_feats], torch.float32)
    if strongest is not None:
        out["feature_channel"] = joined([strongest.cpu()], torch.int64)
    return out


def _incremental_runner(model: nn.Module, x: torch.Tensor, source: torch.Tensor, window: int, stride: int,
                        feature: tuple[str, int | None] | None, chunk: int) -> IncrementalRunner | None:
    """The incremental runner of ``model`` for these images, or None when the model must run in full.

    The plan is traced once per model and image shape (:func:`jobs.attribution.incremental.cached_plan`);
    when the regions save too little convolution work (``jobs.attribution.incremental.WORTH_IT``),
    the copies run in full.
    """
    if has_hooks(model):
        return None
    plan = cached_plan(model, tuple(x.shape[1:]))
    if not isinstance(plan, Plan):
        return None
    try:
        runner = IncrementalRunner(plan, x, source, window, stride, None if feature is None else feature[0], chunk)
    except Unsupported:
        return None
    return runner if runner.geo.work <= incremental_path.WORTH_IT else None


def forwards_needed(n: int, positions: int, chunk: int) -> int:
    """Forwards :func:`occlusion_sweep` runs: ``ceil(n / chunk) + ceil(n * positions / chunk)``."""
    return math.ceil(n / chunk) + math.ceil(n * positions / chunk)


# ----------------------------------------------------------------------------- the analysis


class OcclusionFeature(BaseModel):
    """The unit whose total activation ``feature_map`` records for each position."""

    model_config = ConfigDict(extra="forbid")
    layer: str
    channel: Annotated[int, Field(ge=0)] | Literal["strongest"] = Field(
        description="a channel index, or strongest: per image, the channel with the largest total activation")


class OcclusionParams(AttributionParams):
    window: int = Field(default=8, ge=1, description="side of the occluding square, in input pixels")
    stride: int = Field(default=4, ge=1)
    fill: Literal["mean", "zero", "blur"] = "zero"
    blur_sigma: float | None = Field(default=None, gt=0, description="with fill 'blur'; default window / 2")
    feature: OcclusionFeature | None = None
    incremental: bool = Field(
        default=True,
        description="recompute only the part of each layer the square changes, reading the rest from the clean "
                    "image's activations (Nakandala et al., SIGMOD 2019; same maps up to float rounding); models "
                    "with layers it cannot run this way, and false, run every occluded copy in full")
    map_only: ClassVar[dict[str, Any]] = {"feature": None}  # the unit's maps are extra columns


def pixel_drop(drop: torch.Tensor, size: tuple[int, int], window: int, stride: int) -> torch.Tensor:
    """Per-pixel attribution from a sweep: the mean probability drop over the windows covering
    each pixel (0 where none does), (M, ny, nx) -> (M, H, W)."""
    m = drop.shape[0]
    cols = drop.reshape(m, 1, -1).expand(m, window * window, drop[0].numel())
    total = F.fold(cols, output_size=size, kernel_size=window, stride=stride)
    count = F.fold(torch.ones_like(cols), output_size=size, kernel_size=window, stride=stride)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)).squeeze(1)


@register
class Occlusion(AttributionAnalysis):
    """Occlusion sweeps: target probability, top class and optionally a unit's activation per
    position of a sliding grey square, one sweep per image and target."""

    Params = OcclusionParams
    params: OcclusionParams

    def layers(self) -> list[tuple[tuple[str | int, ...], str]]:
        f = self.params.feature
        return [(("feature", "layer"), f.layer)] if f is not None else []

    def strongest(self) -> bool:
        return self.params.feature is not None and self.params.feature.channel == "strongest"

    def map_columns(self) -> list[tuple[str, pa.DataType]]:
        columns = [("prob_map", FLOATS), ("label_map", pa.list_(pa.int64()))]
        if self.strongest():
            return columns + [("feature_map", FLOATS), ("feature_channel", pa.int64()),
                              ("feature_projection", FLOATS)]
        return columns + ([("feature_map", FLOATS)] if self.params.feature is not None else [])

    def panels(self) -> list[str]:
        return ["projection"] if self.strongest() and self.params.render else []

    def attribute(self, batch: MapBatch, x: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> Attribution:
        p = self.params
        f = p.feature
        feature = None if f is None else (f.layer, None if f.channel == "strongest" else int(f.channel))
        sweep = occlusion_sweep(batch.model, x, targets, window=p.window, stride=p.stride, fill=p.fill,
                                blur_sigma=p.blur_sigma, feature=feature, chunk=self.chunk(x),
                                incremental=p.incremental)
        columns = {"prob_map": sweep["prob_map"], "label_map": sweep["label_map"]}
        if feature is not None:
            columns["feature_map"] = sweep["feature_map"]
        drop = sweep["clean_prob"].view(-1, 1, 1) - sweep["prob_map"]
        heat = pixel_drop(drop, (x.shape[-2], x.shape[-1]), p.window, p.stride)
        result = Attribution(columns=columns, heat=heat, signed=True, shape_of="prob_map")
        if feature is not None and feature[1] is None:
            result.columns["feature_channel"] = sweep["feature_channel"]
            result.columns["feature_projection"] = strongest_projection(batch.model, x, feature[0],
                                                                        sweep["feature_channel"], self.chunk(x))
            if p.render:
                result.extra["panels"] = {"projection": [projection_picture(g, p.cell) for g in
                                                         result.columns["feature_projection"]]}
        return result


def strongest_projection(model: nn.Module, x: torch.Tensor, layer: str, channels: torch.Tensor,
                         chunk: int) -> torch.Tensor:
    """Zeiler & Fergus Fig. 7 c: each image's ``channels[i]`` feature map, its strongest activation
    projected to the input by the deconvnet rule, (N, 3, H, W) signed."""
    from jobs.attribution.backprop import neuron_gradients

    return torch.cat([neuron_gradients(model, x[s:s + chunk], layer, channels[s:s + chunk], "max",
                                       "deconvnet")[0].cpu() for s in range(0, len(x), max(1, chunk))])


def projection_picture(grad: torch.Tensor, min_side: int = 0):
    """A projection (3, H, W) as Zeiler & Fergus draw it (:func:`jobs.core.render.signed_pixels`),
    enlarged (nearest) to at least ``min_side`` px."""
    from PIL import Image

    from jobs.core.render import enlarge, signed_pixels

    return Image.fromarray(enlarge(signed_pixels(grad.numpy()), min_side))
