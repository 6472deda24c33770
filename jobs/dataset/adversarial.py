"""``adversarial``: the smallest L-infinity step that changes each image's prediction.

Szegedy et al., "Intriguing properties of neural networks" (ICLR 2014) found that
imperceptible perturbations flip a CNN's prediction; Goodfellow, Shlens & Szegedy,
"Explaining and Harnessing Adversarial Examples" (ICLR 2015) give the one-step attack FGSM,
``x' = clip(x + eps * sign(grad_x L(x, c)), 0, 1)``, and Madry et al., "Towards Deep Learning
Models Resistant to Adversarial Attacks" (ICLR 2018) its iterated, projected form PGD:
``x_{t+1} = clip(Proj_eps(x_t + alpha * sign(grad L)), 0, 1)``, ``alpha = 2.5 eps / steps``.
Here ``L`` is the cross-entropy of the class the model predicts on the clean image (an
untargeted attack), and ``eps`` is in pixel units (``[0, 1]``, so ``8/255`` is eight grey
levels), whatever the model's normalisation.

For each sampled image: FGSM at every ``epsilons`` value (one gradient, a forward per value),
its smallest flipping value ``epsilon_fgsm``; then PGD (from the clean image, no random start:
deterministic) by bisection over the values below that one (PGD is the stronger attack, so it
may flip at a smaller step; bisection assumes, as is usual, that a larger step flips whatever a
smaller one does), its smallest flipping value ``epsilon_pgd`` (NaN when it flips at none below
``epsilon_fgsm``: PGD is not run at or above it). ``epsilon`` is the smaller of
the two and ``found_by`` the attack that reached it; NaN / null when no value up to the
largest flips the image. A row's result does not depend on the batch (eval mode: images are
independent).

Rows (one per image): ``image_id``, ``label``, ``predicted``, ``prob`` (clean),
``epsilon``, ``found_by``, ``epsilon_fgsm``, ``epsilon_pgd``, ``adversarial_class``,
``adversarial_prob``, ``linf`` (the adversarial image's actual largest change, <= epsilon,
in pixel units), with ``render`` the picture ``key`` (clean | adversarial | the perturbation,
amplified to the full range).

Example manifest entry::

    - type: adversarial
      sample: {n: 200, seed: 0}
      epsilons: [0.001, 0.002, 0.004, 0.008, 0.016, 0.031, 0.063, 0.125, 0.251]   # the default
      steps: 10           # PGD iterations per tried epsilon
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from jobs.core.base import (
    IMAGE_ID,
    LABEL,
    AnalysisParams,
    MapAnalysis,
    MapBatch,
    MapOutput,
    SampleSpec,
    image_key,
    register,
    sample_ids,
)
from jobs.core.views import Bars, Gallery, Summary, Table

DEFAULT_EPSILONS = [round(2 ** k / 255, 5) for k in range(-2, 7)]  # 1/4 .. 64 grey levels


class AdversarialParams(AnalysisParams):
    sample: SampleSpec | None = Field(default_factory=lambda: SampleSpec(n=200, seed=0))
    epsilons: list[float] = Field(default_factory=lambda: list(DEFAULT_EPSILONS),
                                  description="L-inf steps to try, pixel units in (0, 1]")
    steps: int = Field(default=10, ge=1, description="PGD iterations per tried epsilon")
    render: bool = True
    cell: int = Field(default=96, ge=8, description="min side in px of each rendered panel")
    chunk: int = Field(default=256, ge=1, description="most model inputs per forward or backward")

    @field_validator("epsilons")
    @classmethod
    def _ascending(cls, values: list[float]) -> list[float]:
        if not values:
            raise ValueError("needs at least one epsilon")
        if any(not 0 < v <= 1 for v in values):
            raise ValueError(f"every epsilon must lie in (0, 1] (pixel units), got {values}")
        return sorted(set(values))


def attack_loss_gradient(model: nn.Module, normalise: Callable[[torch.Tensor], torch.Tensor], p: torch.Tensor,
                         classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of ``CE(model(normalise(p)), classes)`` (summed over images) w.r.t. the pixel
    images ``p`` (N, 3, H, W) in [0, 1], and the logits; both detached."""
    with torch.inference_mode(False), torch.enable_grad():
        leaf = p.detach().clone().requires_grad_(True)
        logits = model(normalise(leaf)).float()
        loss = F.cross_entropy(logits, classes, reduction="sum")
        (grad,) = torch.autograd.grad(loss, leaf)
    return grad.detach(), logits.detach()


def fgsm(p: torch.Tensor, grad: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``clip(p + eps * sign(grad), 0, 1)`` with one ``eps`` per image (N,)."""
    return (p + eps.view(-1, 1, 1, 1) * grad.sign()).clamp(0, 1)


def pgd(model: nn.Module, normalise: Callable[[torch.Tensor], torch.Tensor], p: torch.Tensor, classes: torch.Tensor,
        eps: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Untargeted L-inf PGD from the clean image, one ``eps`` per image; stops improving an image
    once it flips. Returns (the first flipping iterate, else the last; flipped (N,) bool)."""
    alpha = (2.5 * eps / steps).view(-1, 1, 1, 1)
    e = eps.view(-1, 1, 1, 1)
    x = p.clone()
    best = p.clone()
    flipped = torch.zeros(len(p), dtype=torch.bool, device=p.device)
    for _ in range(steps):
        grad, _ = attack_loss_gradient(model, normalise, x, classes)
        x = torch.minimum(torch.maximum(x + alpha * grad.sign(), p - e), p + e).clamp(0, 1)
        with torch.inference_mode():
            now = model(normalise(x)).float().argmax(dim=1) != classes
        new = now & ~flipped
        best[new] = x[new]
        flipped |= now
        if bool(flipped.all()):
            break
    best[~flipped] = x[~flipped]
    return best, flipped


def smallest_flips(model: nn.Module, normalise: Callable[[torch.Tensor], torch.Tensor], p: torch.Tensor,
                   epsilons: Sequence[float], steps: int) -> dict[str, torch.Tensor]:
    """The smallest of ``epsilons`` (ascending) at which FGSM, then PGD, flip each image's prediction.

    Returns CPU tensors: ``predicted`` and ``prob`` (clean), ``epsilon_fgsm``, ``epsilon_pgd``
    (NaN: none flips), ``epsilon`` (their minimum), ``by_pgd`` (bool: PGD found a smaller one),
    ``adversarial`` (N, 3, H, W) in [0, 1] (the image at ``epsilon``; the clean one when none
    flips), ``adversarial_class`` and ``adversarial_prob``.
    """
    n, device = len(p), p.device
    eps = torch.tensor(list(epsilons), dtype=torch.float32, device=device)
    with torch.inference_mode():
        clean = model(normalise(p)).float().softmax(dim=1)
    classes = clean.argmax(dim=1)
    grad, _ = attack_loss_gradient(model, normalise, p, classes)
    # FGSM: every epsilon in one stream of forwards; the first that flips, per image.
    first_fgsm = torch.full((n,), len(eps), dtype=torch.long, device=device)
    adversarial = p.clone()
    for k in reversed(range(len(eps))):  # descending, so the smallest flip is written last
        x = fgsm(p, grad, eps[k].expand(n))
        with torch.inference_mode():
            flip = model(normalise(x)).float().argmax(dim=1) != classes
        first_fgsm[flip] = k
        adversarial[flip] = x[flip]
    # PGD: bisection over the indices below FGSM's, [lo, hi): hi = the smallest known flip.
    lo = torch.zeros(n, dtype=torch.long, device=device)
    hi = first_fgsm.clone()
    while bool((lo < hi).any()):
        active = (lo < hi).nonzero()[:, 0]
        mid = (lo[active] + hi[active]) // 2
        x, flip = pgd(model, normalise, p[active], classes[active], eps[mid], steps)
        hi[active[flip]] = mid[flip]
        adversarial[active[flip]] = x[flip]
        lo[active[~flip]] = mid[~flip] + 1
    first_pgd = torch.where(hi < first_fgsm, hi, torch.full_like(hi, len(eps)))
    nan = torch.tensor(float("nan"), device=device)
    padded = torch.cat([eps, nan.view(1)])
    with torch.inference_mode():
        final = model(normalise(adversarial)).float().softmax(dim=1)
    best = torch.minimum(first_fgsm, hi)
    adv_class = final.argmax(dim=1)
    return {
        "predicted": classes.cpu(), "prob": clean.gather(1, classes[:, None])[:, 0].cpu(),
        "epsilon_fgsm": padded[first_fgsm].cpu(), "epsilon_pgd": padded[first_pgd].cpu(),
        "epsilon": padded[best].cpu(), "by_pgd": (first_pgd < first_fgsm).cpu(),
        "adversarial": adversarial.cpu(), "adversarial_class": adv_class.cpu(),
        "adversarial_prob": final.gather(1, adv_class[:, None])[:, 0].cpu(),
    }


@register
class Adversarial(MapAnalysis):
    """Smallest FGSM / PGD L-inf step that flips each sampled image's prediction."""

    Params = AdversarialParams
    params: AdversarialParams
    view = (
        Summary("Predictions flipped within the largest step: <b>{{ (rows.epsilon.notna().mean() * 100)|num }}%"
                "</b> of {{ rows|length }} images; median smallest step "
                "<b>{{ (rows.epsilon.median() * 255)|num }}/255</b> (PGD found a smaller one than FGSM for "
                "{{ (rows.found_by == 'pgd').sum() }})."),
        Bars(by="label", value="epsilon", title="Mean smallest flipping step (pixel units) by true class",
             top=0.0, columns=("epsilon", "epsilon_fgsm", "epsilon_pgd")),
        Gallery("{{ label(r.predicted) }}{% if r.found_by %} → {{ label(r.adversarial_class) }} at ε "
                "{{ (r.epsilon * 255)|num }}/255 ({{ r.found_by }}){% else %} · not flipped{% endif %}"
                "<br>clean · adversarial · perturbation", pixelated=False),
        Table(drop=("key", "shard")),
    )

    def select(self, image_ids):
        s = self.params.sample
        return None if s is None else sample_ids(list(image_ids), s.n, s.seed)

    def schema(self) -> dict[str, pa.Schema]:
        f32 = pa.float32()
        fields = [IMAGE_ID, LABEL, ("predicted", pa.int64()), ("prob", f32), ("epsilon", f32),
                  ("found_by", pa.string()), ("epsilon_fgsm", f32), ("epsilon_pgd", f32),
                  ("adversarial_class", pa.int64()), ("adversarial_prob", f32), ("linf", f32)]
        return {"": pa.schema(fields + ([("key", pa.string())] if self.params.render else []))}

    def map_batch(self, batch: MapBatch) -> MapOutput:
        from jobs.core.pixels import normalize

        p = self.params
        if batch.mean is None or batch.std is None:
            raise ValueError("adversarial needs the model's normalisation (mean, std) to step in pixel units")
        mean, std = batch.mean, batch.std
        if batch.pixels is not None:  # exact: the decoded pixels the inputs were made from
            pixels = torch.from_numpy(np.ascontiguousarray(batch.pixels)).to(batch.images.device)
            pixels = pixels.permute(0, 3, 1, 2).float() / 255.0
        else:
            pixels = unnormalise(batch.images.float(), mean, std)
        parts = [smallest_flips(batch.model, lambda x: normalize(x, mean, std).to(batch.images.dtype),
                                pixels[s:s + p.chunk], p.epsilons, p.steps)
                 for s in range(0, len(pixels), p.chunk)]
        r = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        n = len(batch)
        flipped = ~torch.isnan(r["epsilon"])
        linf = (r["adversarial"] - pixels.cpu()).abs().flatten(1).amax(dim=1)
        cols = {
            "image_id": np.asarray(batch.image_ids, dtype=object),
            "label": batch.labels.cpu().numpy().astype(np.int64),
            "predicted": r["predicted"].numpy().astype(np.int64),
            "prob": r["prob"].numpy().astype(np.float32),
            "epsilon": r["epsilon"].numpy().astype(np.float32),
            "found_by": np.asarray([("pgd" if pgd_ else "fgsm") if f else None
                                    for f, pgd_ in zip(flipped.tolist(), r["by_pgd"].tolist())], dtype=object),
            "epsilon_fgsm": r["epsilon_fgsm"].numpy().astype(np.float32),
            "epsilon_pgd": r["epsilon_pgd"].numpy().astype(np.float32),
            "adversarial_class": np.asarray([int(c) if f else None for c, f in
                                             zip(r["adversarial_class"].tolist(), flipped.tolist())], dtype=object),
            "adversarial_prob": np.where(flipped.numpy(), r["adversarial_prob"].numpy(), np.nan).astype(np.float32),
            "linf": np.where(flipped.numpy(), linf.numpy(), np.nan).astype(np.float32),
        }
        images = []
        if p.render:
            keys = []
            for i in range(n):
                key = image_key(batch.image_ids[i], p.entry_name)
                images.append((key, triptych(pixels[i].cpu(), r["adversarial"][i], p.cell)))
                keys.append(key)
            cols["key"] = np.asarray(keys, dtype=object)
        return MapOutput(rows={"": cols}, images=images)


def unnormalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Model inputs back to pixel images in [0, 1]: ``x * std + mean`` per channel."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def triptych(clean: torch.Tensor, adversarial: torch.Tensor, cell: int):
    """clean | adversarial | the perturbation, grey for no change, scaled to its largest change."""
    from jobs.core.render import signed_pixels, strip

    def pixels(t: torch.Tensor) -> np.ndarray:
        return (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    return strip([pixels(clean), pixels(adversarial), signed_pixels((adversarial - clean).numpy())], min_side=cell)
