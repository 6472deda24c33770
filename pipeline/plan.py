"""Planning: the manifest's analyses as stages, with shared work fused.

Every ``map`` analysis of a manifest, and the per-batch part of every ``reduce`` analysis,
runs in one pass over the dataset: one decode and (when an analysis reads it) one forward
per batch, hooks on the union of their layers. The ``reduce`` stage then reads what that pass committed; ``model``
analyses need no dataset pass; ``train`` analyses decode their own images and train, last.
Entries already committed with the same key (resume) are left out of the plan, and so is the
dataset pass of a reduce entry whose partials are.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TypeVar

from jobs import REGISTRY, Analysis, AnalysisParams
from pipeline.manifest import Manifest

ORDER = {"map": 0, "reduce": 1, "model": 2, "train": 3}

A = TypeVar("A", bound=Analysis)


@dataclass
class Stage:
    kind: str
    analyses: list[Analysis] = field(default_factory=list)

    @property
    def entries(self) -> list[str]:
        return [a.params.entry_name for a in self.analyses]

    def analyses_of(self, cls: type[A]) -> list[A]:
        """The analyses, each checked to be a ``cls`` (a reduce stage holds only
        :class:`jobs.ReduceAnalysis`, a model stage only :class:`jobs.ModelAnalysis`)."""
        wrong = [a.params.entry_name for a in self.analyses if not isinstance(a, cls)]
        if wrong:
            raise TypeError(f"{self.kind} stage: {', '.join(wrong)} not {cls.__name__}")
        return [a for a in self.analyses if isinstance(a, cls)]

    def layers(self) -> list[str]:
        """Union of the layers every analysis of the stage reads, in first-seen order."""
        return list(dict.fromkeys(layer for a in self.analyses for _, layer in a.layers()))


def entry_key(params: AnalysisParams, manifest: Manifest, dataset_fingerprint: str, model_hash: str,
              sources: dict[str, dict] | None = None) -> dict:
    """What an entry's output depends on; a committed entry with an equal key is reused.

    An entry that reduces other entries' tables also depends on their keys (``sources``).
    """
    inputs = {
        "params": params.model_dump(mode="json"),
        "dataset": dataset_fingerprint,
        "model": model_hash,
        "preprocess": manifest.model.preprocess.model_dump(mode="json") if manifest.model.preprocess else None,
        "precision": manifest.execution.precision,
    }
    if manifest.execution.decode == "gpu":
        # GPU resizing rounds differently from PIL's: pixels, and so results, may change.
        inputs["decode"] = "gpu"
    if sources:
        inputs["sources"] = {name: key["key"] for name, key in sorted(sources.items())}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return {"key": "sha256:" + digest, "type": params.type, "dataset": dataset_fingerprint, "model": model_hash}


def plan(manifest: Manifest, skip: AbstractSet[str] = frozenset(),
         partials_done: AbstractSet[str] = frozenset()) -> list[Stage]:
    """Stages to run, in order; entries named in ``skip`` are already done, and reduce
    entries named in ``partials_done`` need no dataset pass."""
    stages: dict[str, Stage] = {}
    for params in manifest.analyses:
        if params.entry_name in skip:
            continue
        analysis = REGISTRY[params.type](params)
        needs_pass = not analysis.sources(manifest.analyses)
        if analysis.stage == "reduce" and needs_pass and params.entry_name not in partials_done:
            stages.setdefault("map", Stage("map")).analyses.append(analysis)
        stages.setdefault(analysis.stage, Stage(analysis.stage)).analyses.append(analysis)
    for stage in stages.values():
        # Within a stage, an entry runs after the entries whose tables it reads.
        stage.analyses.sort(key=lambda a: bool(a.sources(manifest.analyses)))
    return sorted(stages.values(), key=lambda s: ORDER[s.kind])
