"""``class_model``: an image the model scores as a class, found by gradient ascent.

Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks: Visualising Image
Classification Models and Saliency Maps", ICLR-W 2014: maximise the class's *pre-softmax*
score, ``argmax_I S_c(I) - lambda ||I||^2``, here with the regularisers of Yosinski et al.
(2015) or the decorrelated Fourier parameterisation of Olah et al. (2017); see
:mod:`jobs.model.ascent`. A class model is only worth looking at if it works, so every row also
records the softmax ``probability`` the model gives the final image for the class, the
``predicted`` class and the class's ``rank`` (1 = predicted).

Rows (one per class and restart): ``class``, ``class_name``, then the columns every ascent
analysis writes (:class:`jobs.model.ascent.AscentAnalysis`), ``probability``, ``predicted``, ``rank``.

Example::

    - type: class_model
      classes: all            # or [0, 3, 5]
      restarts: 2
      parameterization: pixel # or fourier

Fooling images (Nguyen, Yosinski & Clune, "Deep Neural Networks are Easily Fooled", CVPR
2015): the same ascent from seeded noise with every regulariser off -- ``parameterization:
pixel``, ``l2: 0``, ``blur_every: 0``, ``jitter: 0`` (clipping is off by default) -- reaches
images the model gives its class with high ``probability`` although no person would see the
class in them; the page's summary reports the mean probability reached::

    - type: class_model
      name: fooling_images
      l2: 0
      blur_every: 0
      jitter: 0
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
import torch
from pydantic import Field

from jobs.core.base import ModelContext, register
from jobs.core.views import Gallery, Summary, Table
from jobs.model.ascent import AscentAnalysis, AscentParams


class ClassModelParams(AscentParams):
    classes: Literal["all"] | list[int] = Field(default="all", description="class indices, or all of them")


@register
class ClassModel(AscentAnalysis):
    """Class models by gradient ascent on the class logit: one unit per (class, restart)."""

    Params = ClassModelParams
    params: ClassModelParams
    view = (
        Summary("Mean probability the model gives each class model for its class: "
                "<b>{{ rows.probability.mean()|num }}</b>."),
        Gallery("{{ r.class_name or r['class'] }} · restart {{ r.restart }}<br>p {{ r.probability|num }}"),
        Table(drop=("image", "history", "map", "weight", "key", "shard")),
    )
    objective_name = "logit"

    def check_model(self, model, input_size):
        if self.params.classes == "all":
            return []
        classes = ModelContext(model, input_size, (0, 0, 0), (1, 1, 1)).num_classes()
        bad = [c for c in self.params.classes if not 0 <= c < classes]
        if bad:
            return [(("classes",), f"class(es) {', '.join(map(str, bad))} not in a model with {classes} "
                                   f"outputs (0..{classes - 1})")]
        return []

    def units(self, ctx: ModelContext) -> list[Any]:
        classes = range(ctx.num_classes()) if self.params.classes == "all" else self.params.classes
        return [(int(c), r) for c in classes for r in range(self.params.starts())]

    def objective(self, units, ctx):
        targets = torch.tensor([c for c, _ in units], device=ctx.device)

        def logit(x: torch.Tensor) -> torch.Tensor:
            return ctx.model(x).gather(1, targets[:, None])[:, 0]
        return logit

    def describe(self, units, images, ctx):
        targets = torch.tensor([c for c, _ in units])
        with torch.no_grad():
            probs = torch.softmax(ctx.model(ctx.normalize(images)).float(), dim=1).cpu()
        chosen = probs.gather(1, targets[:, None])[:, 0]
        rank = (probs > chosen[:, None]).sum(dim=1) + 1
        names = ctx.label_names
        return {
            "class": pa.array(targets.numpy(), pa.int64()),
            "class_name": pa.array([names[c] if names and c < len(names) else None for c in targets.tolist()],
                                   pa.string()),
            "probability": pa.array(chosen.numpy(), pa.float32()),
            "predicted": pa.array(probs.argmax(dim=1).numpy(), pa.int64()),
            "rank": pa.array(rank.numpy(), pa.int64()),
        }

    def summary(self, tables):
        table = tables.get("")
        if table is None or not table.num_rows:
            return {}
        df = table.select(["class", "probability", "predicted"]).to_pandas()
        best = df.groupby("class").probability.max()
        return {"mean_probability": round(float(df.probability.mean()), 4),
                "mean_best_probability": round(float(best.mean()), 4),
                "classified_as_target": round(float((df["predicted"] == df["class"]).mean()), 4)}
