"""``predictions``: the model's logits and its top-k classes with their probabilities.

Example manifest entry::

    - type: predictions
      top_k: 5

Table ``predictions/part-*.parquet``: ``image_id``, ``label``, ``pred`` (top-1 class),
``prob`` (its softmax probability), ``top5`` (classes, best first), ``top5_prob``,
``logits``. The list columns keep the name ``top5`` whatever ``top_k`` is, so readers
need not know the manifest.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from pydantic import Field

from jobs.core.base import FLOATS, IMAGE_ID, LABEL, AnalysisParams, MapAnalysis, MapBatch, Rows, register


class PredictionsParams(AnalysisParams):
    top_k: int = Field(default=5, ge=1)
    logits: bool = True


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes and softmax probabilities of the ``k`` largest logits, best first.

    Ties go to the lower class index, so the result does not depend on the batch.
    """
    k = min(k, logits.shape[1])
    probs = torch.softmax(logits.float(), dim=1)
    # Stable sort on the negated logits: equal logits keep ascending class order.
    order = torch.sort(-logits.float(), dim=1, stable=True).indices[:, :k]
    return order, probs.gather(1, order)


@register
class Predictions(MapAnalysis):
    """Top-k predicted classes, their probabilities, and the raw logits."""

    Params = PredictionsParams
    params: PredictionsParams

    def schema(self) -> dict[str, pa.Schema]:
        fields = [IMAGE_ID, LABEL, ("pred", pa.int64()), ("prob", pa.float32()), ("top5", pa.list_(pa.int64())),
                  ("top5_prob", FLOATS)]
        return {"": pa.schema(fields + ([("logits", FLOATS)] if self.params.logits else []))}

    def map_batch(self, batch: MapBatch) -> Rows:
        logits = batch.logits.float()
        if logits.dim() != 2:
            raise ValueError(
                f"predictions needs the model to return (N, classes) logits, got shape {tuple(logits.shape)}"
            )
        classes, probs = top_k(logits, self.params.top_k)
        rows = {
            "pred": classes[:, 0].cpu().numpy(),
            "prob": probs[:, 0].cpu().numpy(),
            "top5": classes.cpu().numpy(),
            "top5_prob": probs.cpu().numpy(),
        }
        if self.params.logits:
            rows["logits"] = logits.cpu().numpy()
        return {"": rows}
