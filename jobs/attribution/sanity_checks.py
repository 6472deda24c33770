"""``sanity_checks``: do the attribution maps explain this model at all? Randomisation, class
sensitivity, robustness and ROAD for every attribution entry, over a sample of the dataset.

Each test recomputes a method's maps under a change that should (or should not) change them:

* ``mprt_cascading`` / ``mprt_independent`` -- model parameter randomisation (Adebayo et al.,
  "Sanity Checks for Saliency Maps", NeurIPS 2018). The model's layer blocks are re-initialised
  from the logits down, cumulatively (cascading) or one at a time (independent); at step ``s``
  the map of the same image and class is compared with the original by Spearman rank
  correlation (signed and of absolute values), SSIM and the correlation of HOG features
  (:mod:`jobs.attribution.similarity`). A map that explains the model loses its similarity as
  the weights go; one that stays similar shows the input, not the model. Step 0 recomputes the
  maps on an untouched copy, so its similarity is exactly 1 for a deterministic method.
* ``random_logit`` -- the map of the target class against the map of a random other class
  (Sixt, Granz & Landgraf, "When Explanations Lie", ICML 2020): SSIM and ``spearman_abs``; a
  high similarity means the method does not tell the classes apart.
* ``max_sensitivity`` / ``avg_sensitivity`` -- ``max_s`` / ``mean_s`` of
  ``||Φ(x + δ_s) − Φ(x)|| / ||Φ(x)||`` over seeded uniform noise of ``radius`` times the
  image's value range (Yeh et al., "On the (In)fidelity and Sensitivity of Explanations",
  NeurIPS 2019; :mod:`jobs.attribution.robustness`).
* ``road`` -- remove and debias (Rong et al., "A Consistent and Efficient Evaluation Strategy
  for Attribution Methods", ICML 2022): the target's probability with the most (MoRF) or least
  (LeRF) relevant ``percentages`` of pixels replaced by noisy linear imputation, beside the
  blur/zero deletion and insertion AUCs of the method's own table.

Randomised models are built on each worker from parameters drawn once per module (seeded by
``randomisation.seed`` and the module's name, on the CPU, so every device and worker draws the
same); each batch loads each step's parameters into one working copy, never per image.

Example manifest entry::

    - type: sanity_checks
      methods: [saliency, grad_cam]   # attribution entries; default: all of them
      tests: [mprt_cascading, random_logit, road]
      sample: {n: 100, seed: 0}
      randomisation: {blocks: children}   # children | modules | [linear, layer3, ...]

Table ``sanity_checks/``: per image and per aggregate, ``method``, ``test`` (the two
sensitivity tests are ``sensitivity`` rows with metric ``max_sensitivity`` / ``avg_sensitivity``),
``step`` (MPRT: blocks randomised, 0 = none; ROAD: the percentage removed, rounded to a whole
percent, for the ``morf``/``lerf`` curves; else null), ``step_name`` (MPRT: the
block randomised at that step, "" at step 0), ``image_id``, ``label``, ``target`` (null on
aggregate rows), ``metric``, ``value``, and on aggregate rows ``n`` (images) with ``lo``/``hi``,
the bootstrap interval of the mean (:func:`jobs.core.kernels.bootstrap_interval`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema
from torch import nn

from jobs.attribution.base import (
    AttributionAnalysis,
    Bootstrap,
    bound_methods,
    choose_targets,
    class_method_entries,
    in_chunks,
)
from jobs.core.base import (
    IMAGE_ID,
    LABEL,
    AnalysisParams,
    MapBatch,
    ReduceAnalysis,
    ReduceContext,
    ReduceInputs,
    ReduceOutput,
    Rows,
    SampleSpec,
    register,
    sample_ids,
    unit_seed,
)

TEST = Literal["mprt_cascading", "mprt_independent", "random_logit", "max_sensitivity", "avg_sensitivity", "road"]
TESTS: tuple[str, ...] = get_args(TEST)
SIMILARITY = Literal["spearman", "spearman_abs", "ssim", "hog"]
RANDOM_LOGIT_METRICS = ("ssim", "spearman_abs")


class Randomisation(BaseModel):
    """How the model is randomised for the MPRT tests."""

    model_config = ConfigDict(extra="forbid")
    blocks: Literal["children", "modules"] | list[str] = Field(
        default="children", description="children: the model's top-level modules that hold parameters; modules: "
                                        "every module with its own parameters; or module names; randomised in "
                                        "reverse order (from the logits down)")
    seed: int = 0
    metrics: list[SIMILARITY] = Field(default_factory=lambda: list(get_args(SIMILARITY)), min_length=1)


class Sensitivity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(default=8, ge=1, description="noisy copies per image")
    radius: float = Field(default=0.02, gt=0, description="noise bound as a fraction of the image's value range")


class Road(BaseModel):
    model_config = ConfigDict(extra="forbid")
    percentages: list[float] = Field(default_factory=lambda: [10.0, 30.0, 50.0, 70.0, 90.0], min_length=1)
    noise: float = Field(default=0.01, ge=0, description="std of the noise added to imputed pixels")


class SanityChecksParams(AnalysisParams):
    methods: list[str] | None = None
    tests: list[TEST] = Field(default_factory=lambda: list(get_args(TEST)), min_length=1)
    sample: SampleSpec = Field(default_factory=lambda: SampleSpec(n=100))
    randomisation: Randomisation = Field(default_factory=Randomisation)
    sensitivity: Sensitivity = Field(default_factory=Sensitivity)
    road: Road = Field(default_factory=Road)
    bootstrap: Bootstrap = Field(default_factory=Bootstrap)
    seed: int = Field(default=0, description="random-logit classes and the noise of sensitivity and ROAD")
    # Filled in from ``methods`` when the manifest is read (the checked entries' params), so
    # the entry's key and every worker see them; not written by hand.
    method_entries: SkipJsonSchema[list[dict[str, Any]]] = Field(default_factory=list)


def parameter_modules(model: nn.Module) -> list[str]:
    """Names of the modules that hold parameters of their own, in registration order."""
    return [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def randomisation_blocks(model: nn.Module, blocks: str | Sequence[str]) -> list[str]:
    """The blocks randomised one per step, from the output down (reverse registration order).

    ``children``: top-level modules that hold parameters; ``modules``: every module with
    parameters of its own; a list: those names, in the order given.
    """
    if not isinstance(blocks, str):
        return list(blocks)
    if blocks == "modules":
        return parameter_modules(model)[::-1]
    return [name for name, m in model.named_children() if any(True for _ in m.parameters())][::-1]


def random_module_state(model: nn.Module, name: str, seed: int) -> dict[str, torch.Tensor]:
    """One module's own parameters and buffers re-initialised, on the CPU, seeded by ``seed``
    and the module's name (the same whichever device or worker draws them).

    ``reset_parameters`` where the module has it (the layer's own initialisation, as Adebayo
    et al. and Quantus do; a BatchNorm returns to identity statistics); otherwise each own
    parameter is drawn from N(0, std of the original).
    """
    module = dict(model.named_modules())[name]
    fresh = copy.deepcopy(module).cpu()
    # Only its own tensors: a block's submodules are randomised as modules of their own.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(unit_seed(seed, name))
        reset = getattr(fresh, "reset_parameters", None)
        if callable(reset):
            reset()
        else:
            with torch.no_grad():
                for p in fresh.parameters(recurse=False):
                    p.normal_(0.0, float(p.float().std()) if p.numel() > 1 else 0.01)
    own = {n for n, _ in fresh.named_parameters(recurse=False)} | {n for n, _ in fresh.named_buffers(recurse=False)}
    return {k: v.detach().clone() for k, v in fresh.state_dict().items() if k in own}


class Randomiser:
    """Randomised copies of a model, step by step, from parameters drawn once per module.

    ``steps(order)`` yields ``(step, block, model)`` for step 0 (nothing randomised, block "")
    and one step per block: cascading keeps every block before it randomised, independent
    only that block. The yielded model is one working copy, changed in place between steps.
    """

    def __init__(self, model: nn.Module, blocks: str | Sequence[str], seed: int):
        self.model = model
        self.blocks = randomisation_blocks(model, blocks)
        if not self.blocks:
            raise ValueError("randomisation.blocks: the model has no module with parameters to randomise")
        self.work = copy.deepcopy(model).eval()
        owners = set(parameter_modules(model)) | {n for n, m in model.named_modules()
                                                  if any(True for _ in m.buffers(recurse=False))}
        self.modules = {block: [n for n in owners if n == block or n.startswith(block + ".")]
                        for block in self.blocks}
        self.random: dict[str, dict[str, torch.Tensor]] = {}
        self.seed = seed

    def _state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.random:
            self.random[name] = random_module_state(self.model, name, self.seed)
        return self.random[name]

    def _load(self, randomised: Sequence[str]) -> nn.Module:
        # The model itself is never changed: it is the untouched state each step starts from.
        self.work.load_state_dict(self.model.state_dict())
        modules = dict(self.work.named_modules())
        with torch.no_grad():
            for block in randomised:
                for name in self.modules[block]:
                    target = modules[name]
                    own = dict(target.named_parameters(recurse=False)) | dict(target.named_buffers(recurse=False))
                    for key, value in self._state(name).items():
                        own[key].copy_(value)
        return self.work

    def steps(self, order: Literal["cascading", "independent"]) -> Iterator[tuple[int, str, nn.Module]]:
        yield 0, "", self._load([])
        for i, block in enumerate(self.blocks, start=1):
            yield i, block, self._load(self.blocks[:i] if order == "cascading" else [block])


def explain(method: AttributionAnalysis, model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
            image_ids: Sequence[str], chunk: int) -> torch.Tensor:
    """The method's heat maps (M, H, W) at input size, on the CPU, for inputs ``x`` under ``model``.

    The forward the method reads (logits, activations of its layers) is run on ``model`` here,
    ``chunk`` inputs at a time, so a randomised model or noisy inputs get their own.
    """
    from jobs.core.hooks import layer_outputs
    from jobs.core.kernels import upsample

    layers = [layer for _, layer in method.layers()]
    heats = []
    for sl in in_chunks(len(x), chunk):
        xs, ts = x[sl], targets[sl]
        logits, acts = layer_outputs(model, xs, layers)
        batch = MapBatch(image_ids=list(image_ids[sl]), labels=torch.full((len(xs),), -1), images=xs,
                         logits=logits, activations=acts, model=model)
        result = method.attribute(batch, xs, ts, torch.arange(len(xs)))
        heats.append(upsample(result.heat.detach().float(), (x.shape[-2], x.shape[-1])).cpu())
    return torch.cat(heats)


def other_classes(image_ids: Sequence[str], targets: torch.Tensor, classes: int, seed: int) -> torch.Tensor:
    """A random class other than the target for each map, seeded per image and target."""
    picks = []
    for image_id, t in zip(image_ids, targets.tolist()):
        r = int(np.random.default_rng(unit_seed(seed, ["random_logit", image_id, t])).integers(classes - 1))
        picks.append(r if r < t else r + 1)
    return torch.tensor(picks, dtype=torch.long)


PARTIAL = pa.schema([("method", pa.string()), ("test", pa.string()), ("step", pa.int64()),
                     ("step_name", pa.string()), IMAGE_ID, LABEL, ("target", pa.int64()),
                     ("metric", pa.string()), ("value", pa.float64())])
SCHEMA = pa.schema([*PARTIAL, ("n", pa.int64()), ("lo", pa.float64()), ("hi", pa.float64())])


class _Rows:
    """Partial rows, gathered column by column."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {f.name: [] for f in PARTIAL}

    def add(self, method: str, test: str, step: int | None, step_name: str | None, ids: Sequence[str],
            labels: Sequence[int], targets: Sequence[int], values: dict[str, Any]) -> None:
        for metric, v in values.items():
            v = np.asarray(v, dtype=np.float64).reshape(-1)
            m = len(v)
            self.cols["method"] += [method] * m
            self.cols["test"] += [test] * m
            self.cols["step"] += [step] * m
            self.cols["step_name"] += [step_name] * m
            self.cols["image_id"] += list(ids)
            self.cols["label"] += list(labels)
            self.cols["target"] += list(targets)
            self.cols["metric"] += [metric] * m
            self.cols["value"] += v.tolist()

    def arrays(self) -> dict[str, np.ndarray]:
        # Object arrays keep None (a null step, an unlabelled image) as None on the way to Arrow.
        self.cols["label"] = [None if v is None or v < 0 else v for v in self.cols["label"]]
        return {name: np.asarray(values, dtype=object if name != "value" else np.float64)
                for name, values in self.cols.items()}


@register
class SanityChecks(ReduceAnalysis):
    """Model randomisation, random-logit, sensitivity and ROAD checks of attribution methods."""

    Params = SanityChecksParams
    params: SanityChecksParams

    def __init__(self, params: SanityChecksParams):
        super().__init__(params)
        self._randomiser: Randomiser | None = None

    def bind(self, entries: Sequence[AnalysisParams]) -> AnalysisParams:
        # The checks compare explanations of classes; an entry that explains a unit has none.
        return self.params.model_copy(update={"method_entries": class_method_entries(self.params.methods, entries)})

    def methods(self) -> list[AttributionAnalysis]:
        """The checked attribution analyses (a fresh instance each call: nothing cached across models)."""
        return bound_methods(self.params.method_entries)

    def select(self, image_ids):
        s = self.params.sample
        return sample_ids(list(image_ids), s.n, s.seed)

    def check_model(self, model: nn.Module, input_size: tuple[int, int]) -> list[tuple[tuple[str | int, ...], str]]:
        blocks = self.params.randomisation.blocks
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if isinstance(blocks, list):
            names = dict(model.named_modules())
            for i, name in enumerate(blocks):
                if name not in names:
                    problems.append((("randomisation", "blocks", i), f"unknown layer {name!r}"))
                elif not any(True for _ in names[name].parameters()):
                    problems.append((("randomisation", "blocks", i), f"{name!r} holds no parameters to randomise"))
        elif not randomisation_blocks(model, blocks):
            problems.append((("randomisation", "blocks"), "the model has no module with parameters to randomise"))
        return problems

    def schema(self) -> dict[str, pa.Schema]:
        return {"": PARTIAL}

    def _randomised(self, model: nn.Module) -> Randomiser:
        # Built once per worker (the model a worker holds does not change between batches).
        if self._randomiser is None or self._randomiser.model is not model:
            r = self.params.randomisation
            self._randomiser = Randomiser(model, r.blocks, r.seed)
        return self._randomiser

    def map_batch(self, batch: MapBatch) -> Rows:
        from jobs.attribution.similarity import similarity

        p = self.params
        tests = set(p.tests)
        rows = _Rows()
        logits = batch.logits.float()
        classes = int(logits.shape[1])
        device = batch.images.device
        methods = self.methods()
        chosen = []  # per method: (rows, targets, x, ids, labels, clean heat)
        for method in methods:
            r, t, _ = choose_targets(logits, batch.labels, method.params.target)
            ids = [batch.image_ids[i] for i in r.tolist()]
            x = batch.images[r.to(device)]
            heat = explain(method, batch.model, x, t.to(device), ids, method.chunk(x))
            chosen.append((method, t, x, ids, batch.labels.cpu()[r].tolist(), heat))

        untouched: dict[int, dict[str, np.ndarray]] = {}
        orders: tuple[Literal["cascading", "independent"], ...] = ("cascading", "independent")
        for order in orders:
            test = f"mprt_{order}"
            if test not in tests:
                continue
            metrics = list(p.randomisation.metrics)
            for step, block, model in self._randomised(batch.model).steps(order):
                for j, (method, t, x, ids, labels, heat) in enumerate(chosen):
                    if step == 0 and j in untouched:  # both orders start from the same model
                        found = untouched[j]
                    else:
                        fresh = type(method)(method.params)
                        other = explain(fresh, model, x, t.to(device), ids, method.chunk(x))
                        found = similarity(heat, other, metrics)
                        if step == 0:
                            untouched[j] = found
                    rows.add(method.params.entry_name, test, step, block, ids, labels, t.tolist(), found)

        for method, t, x, ids, labels, heat in chosen:
            name = method.params.entry_name
            if "random_logit" in tests and classes > 1:
                others = other_classes(ids, t, classes, p.seed)
                other = explain(method, batch.model, x, others.to(device), ids, method.chunk(x))
                rows.add(name, "random_logit", None, None, ids, labels, t.tolist(),
                         similarity(heat, other, list(RANDOM_LOGIT_METRICS)))
            wanted = [k for k in ("max_sensitivity", "avg_sensitivity") if k in tests]
            if wanted:
                from jobs.attribution.robustness import sensitivity

                def noisy(inputs: torch.Tensor, targets: torch.Tensor, index: torch.Tensor, ids: list[str] = ids,
                          method: AttributionAnalysis = method) -> torch.Tensor:
                    # Each noisy copy keeps its image's id (SmoothGrad seeds its noise by it).
                    copies = [ids[i] for i in index.tolist()]
                    return explain(method, batch.model, inputs, targets, copies, method.chunk(inputs))

                s = p.sensitivity
                seeds = [unit_seed(p.seed, ["sensitivity", i, c]) for i, c in zip(ids, t.tolist())]
                moved = sensitivity(noisy, x, t.to(device), heat.to(device), seeds, s.samples, s.radius)
                rows.add(name, "sensitivity", None, None, ids, labels, t.tolist(),
                         {k: moved[k].numpy() for k in wanted})
            if "road" in tests:
                from jobs.attribution.faithfulness import road

                seeds = [unit_seed(p.seed, ["road", i, c]) for i, c in zip(ids, t.tolist())]
                curves = road(batch.model, x, heat.to(device), t.to(device), p.road.percentages,
                              noise=p.road.noise, seeds=seeds, chunk=method.chunk(x))
                for j, pct in enumerate(p.road.percentages):
                    rows.add(name, "road", int(round(pct)), None, ids, labels, t.tolist(),
                             {"morf": curves["morf_curve"][:, j].numpy(), "lerf": curves["lerf_curve"][:, j].numpy()})
                rows.add(name, "road", None, None, ids, labels, t.tolist(),
                         {"morf_auc": curves["morf_auc"].numpy(), "lerf_auc": curves["lerf_auc"].numpy()})
        return {"": rows.arrays()}

    def reduce(self, inputs: ReduceInputs, ctx: ReduceContext) -> ReduceOutput:
        table = inputs.read("") if "" in inputs.partitions() else PARTIAL.empty_table()
        per_image = table.cast(PARTIAL)
        aggregates = aggregate(per_image.to_pandas(), self.params.bootstrap)
        out = pa.concat_tables([per_image.append_column("n", pa.nulls(len(per_image), pa.int64()))
                                         .append_column("lo", pa.nulls(len(per_image), pa.float64()))
                                         .append_column("hi", pa.nulls(len(per_image), pa.float64())),
                                aggregates])
        stats = summary_stats(aggregates.to_pandas())
        for method, line in stats.items():
            ctx.log(f"sanity checks, {method}: " + ", ".join(f"{k} {v}" for k, v in line.items()))
        return ReduceOutput(tables={"": out}, stats={"methods": stats})


GROUP = ["method", "test", "step", "step_name", "metric"]


def aggregate(df: pd.DataFrame, bootstrap: Bootstrap) -> pa.Table:
    """One row per (method, test, step, metric): the mean over images (NaN dropped), their
    count ``n`` and the bootstrap interval ``lo``/``hi`` of the mean."""
    from jobs.core.kernels import bootstrap_interval

    out: dict[str, list] = {f.name: [] for f in SCHEMA}
    if len(df):
        keyed = df.assign(step=df["step"].astype("Int64"))
        for key, group in keyed.groupby(GROUP, sort=False, dropna=False):
            values = group["value"].to_numpy(dtype=np.float64)
            values = values[~np.isnan(values)]
            lo, hi = bootstrap_interval(values, bootstrap.resamples, bootstrap.level, bootstrap.seed)
            for name, v in zip(GROUP, key):
                out[name].append(None if pd.isna(v) else (int(v) if name == "step" else v))
            out["image_id"].append(None)
            out["label"].append(None)
            out["target"].append(None)
            out["value"].append(float(values.mean()) if len(values) else float("nan"))
            out["n"].append(len(values))
            out["lo"].append(lo)
            out["hi"].append(hi)
    return pa.table({f.name: pa.array(out[f.name], f.type) for f in SCHEMA}, schema=SCHEMA)


def summary_stats(agg: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per method, the headline numbers for run.json: the mean ``spearman_abs`` with every block
    randomised (cascading), the random-logit SSIM, max-sensitivity and ROAD's MoRF AUC."""
    out: dict[str, dict[str, float]] = {}
    for method, group in agg.groupby("method", sort=False):
        line: dict[str, float] = {}
        cascade = group[(group.test == "mprt_cascading") & (group.metric == "spearman_abs")]
        if len(cascade):
            line["mprt_last_spearman_abs"] = round(float(cascade.sort_values("step").value.iloc[-1]), 4)
        for test, metric in (("random_logit", "ssim"), ("sensitivity", "max_sensitivity"), ("road", "morf_auc"),
                             ("road", "lerf_auc")):
            hit = group[(group.test == test) & (group.metric == metric)]
            if len(hit):
                line[f"{test}_{metric}" if test != "sensitivity" else metric] = round(float(hit.value.iloc[0]), 4)
        out[str(method)] = line
    return out

