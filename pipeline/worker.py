"""The model side of a map stage: one actor per worker runs every fused per-image analysis.

A plain callable on ``dict[str, np.ndarray]`` batches (those ``pipeline.decode.decode_batch``
makes), so it runs the same under Ray Data and in a test without Ray.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from jobs import REGISTRY, AnalysisParams, MapBatch, MapOutput
from pipeline.manifest import MODEL_SOURCES
from pipeline.plan import Stage

SEP = "|"  # output columns are "<entry>|<partition>|<column>"
# Rows not aligned with the batch (a reduce entry's partials, a MapOutput's rows): one Arrow
# IPC table per partition, in the batch's first row.
PARTIAL = "__partial__"
# A MapOutput's rendered images: an IPC table of (key, png) in the batch's first row.
IMAGES = "__images__"
PACKED = (SEP + PARTIAL, SEP + IMAGES)


def pack_partial(columns: dict[str, np.ndarray]) -> bytes:
    """One batch's partial table (any row count) as Arrow IPC stream bytes."""
    import pyarrow as pa

    from pipeline.writers import to_arrow

    table = pa.table({k: to_arrow(np.asarray(v)) for k, v in columns.items()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def unpack_partial(data: bytes):
    import pyarrow as pa

    return pa.ipc.open_stream(data).read_all()


def pack_images(images) -> bytes:
    """Rendered (key, PIL image) pairs as one IPC table of (key, png bytes), encoded here."""
    import io

    keys, pngs = [], []
    for key, image in images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        keys.append(key)
        pngs.append(buf.getvalue())
    return pack_partial({"key": np.asarray(keys, dtype=object), "png": np.asarray(pngs, dtype=object)})


def normalize(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 ``(x / 255 - mean) / std``, on the pixels' device."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def autocast(device: torch.device, precision: str):
    """``execution.precision`` as a context: nothing for float32, else autocast to bf16/fp16."""
    if precision == "float32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ModelWorker:
    """Loads the model once, then runs every fused per-image analysis on each batch."""

    def __init__(self, model_spec: dict, entries: list[dict], execution: dict, threads: int | None = None,
                 selections: dict[str, int] | None = None, samples: list[list[str]] | None = None):
        from pipeline.models import load_model

        if threads:
            torch.set_num_threads(threads)
        spec = MODEL_SOURCES[model_spec["source"]].model_validate(model_spec)
        self.preprocess = spec.preprocess
        self.device = resolve_device(execution["device"])
        self.precision = execution["precision"]
        self.model = load_model(spec).to(self.device)
        # NHWC suits cuDNN's tensor cores and oneDNN's CPU convolutions alike (ResNet-20 on
        # two CPU cores: 1.3x); outputs differ from NCHW only by float rounding.
        self.channels_last = bool(execution.get("channels_last"))
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        params = [REGISTRY[e["type"]].Params.model_validate(e) for e in entries]
        self.analyses = [REGISTRY[p.type](p) for p in params]
        self.layers = Stage("map", self.analyses).layers()
        # Entries that work on a sample of the dataset see only its images of each batch.
        sets = [frozenset(ids) for ids in samples or []]
        self.selections = {entry: sets[i] for entry, i in (selections or {}).items()}
        h, w = self.preprocess.output_size()
        # One dry pass fixes every output column's shape and dtype, so a batch in which every
        # image failed to decode still yields the same columns (zero-filled, dropped later).
        self.template = self._compute(np.zeros((1, h, w, 3), np.uint8), ["_"], np.array([-1]), dry=True)
        # An analysis that fails on the dry pass is broken for every batch; say so on each.
        self.broken: dict[str, str] = {}
        for a in self.analyses:
            key = error_key(a.params.entry_name)
            if key in self.template:
                self.broken[key] = str(self.template[key][0])
            self.template[key] = np.full(1, "", dtype=object)

    def _autocast(self):
        return autocast(self.device, self.precision)

    def _compute(self, pixels: np.ndarray, image_ids: list[str], labels: np.ndarray,
                 boxes: np.ndarray | None = None, dry: bool = False) -> dict[str, np.ndarray]:
        """Every analysis' columns for the batch; an analysis that raises reports its error instead.

        A failure is returned, not raised, as an ``<entry>||__error__`` column: the stage
        goes on, the other analyses keep their rows, and the runner marks that entry failed.
        """
        from pipeline.models import capture

        out: dict[str, np.ndarray] = {}
        n = len(image_ids)
        try:
            # Ray hands batches over read-only and zero-copy: copy before use on the device.
            pixels = np.array(pixels, copy=True)
            x = torch.from_numpy(pixels)
            if self.device.type == "cuda":
                # uint8 crosses the bus (a quarter of float32), from page-locked memory so the
                # copy is a DMA; normalising happens on the device.
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True)
            x = normalize(x, self.preprocess.mean, self.preprocess.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), self._autocast(), capture(self.model, self.layers) as acts:
                logits = self.model(x)
            batch = MapBatch(
                image_ids=list(image_ids),
                labels=torch.tensor(np.asarray(labels, dtype=np.int64)),
                images=x,
                logits=logits.float() if isinstance(logits, torch.Tensor) else logits,
                activations={k: v.float() for k, v in acts.items()},
                model=self.model,
                pixels=pixels,
                boxes=None if boxes is None else np.asarray(boxes, dtype=np.int64),
            )
        except Exception as e:  # noqa: BLE001 -- the model failed: every analysis of the batch did
            message = _describe(e, "model forward")
            return {error_key(a.params.entry_name): np.full(n, message, dtype=object) for a in self.analyses}
        for analysis in self.analyses:
            entry = analysis.params.entry_name
            try:
                chosen = batch
                selection = None if dry else self.selections.get(entry)
                if selection is not None:
                    keep = np.array([i in selection for i in batch.image_ids], dtype=bool)
                    if not keep.any():
                        continue  # no image of this batch is in the entry's sample
                    chosen = batch.subset(keep) if not keep.all() else batch
                result = analysis.map_batch(chosen)
                if analysis.stage == "reduce" or isinstance(result, MapOutput) or selection is not None:
                    if not isinstance(result, MapOutput):
                        if analysis.stage == "map" and selection is not None:
                            raise TypeError(f"{analysis.name} works on a sample, so map_batch must return a "
                                            "MapOutput whose rows name their images")
                        result = MapOutput(rows=result)
                    # Not aligned with the images: one Arrow table per partition (and the
                    # rendered images) ride in the batch's first row.
                    rows = {}
                    for partition, columns in result.rows.items():
                        rows[SEP.join((entry, partition, PARTIAL))] = _first_row(n, pack_partial(columns))
                    if result.images or (dry and analysis.stage == "map"):
                        rows[SEP.join((entry, "", IMAGES))] = _first_row(n, pack_images(result.images))
                else:
                    rows = {
                        SEP.join((entry, partition, column)): np.asarray(values)
                        for partition, columns in result.items()
                        for column, values in columns.items()
                    }
            except Exception as e:  # noqa: BLE001 -- recorded against this entry only
                rows = {}
                out[error_key(entry)] = np.full(n, _describe(e, analysis.name), dtype=object)
            out.update(rows)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        n = len(ok)
        out = {k: batch[k] for k in ("image_id", "label", "error", "error_stage")}
        boxes = batch["box"][ok] if "box" in batch else None
        computed = self._compute(batch["pixels"][ok], batch["image_id"][ok], batch["label"][ok], boxes) if ok.any() else {}
        for key, message in self.broken.items():
            computed[key] = np.full(int(ok.sum()), message, dtype=object)
        # Every batch carries the template's columns, so all blocks share one schema.
        for key, template in self.template.items():
            if ok.all() and key in computed:
                out[key] = computed[key]
                continue
            if key.endswith(PACKED):
                full = np.full(n, b"", dtype=object)
            elif template.dtype == object:
                full = np.full((n,) + template.shape[1:], "", dtype=object)
            else:
                full = np.zeros((n,) + template.shape[1:], dtype=template.dtype)
            if key in computed:
                if key.endswith(PACKED):
                    full[np.flatnonzero(ok)[0]] = computed[key][0]
                else:
                    full[ok] = computed[key]
            out[key] = full
        return out


def _first_row(n: int, data: bytes) -> np.ndarray:
    cell = np.full(n, b"", dtype=object)
    cell[0] = data
    return cell


def error_key(entry: str) -> str:
    return SEP.join((entry, "", "__error__"))


def _describe(e: Exception, where: str) -> str:
    return f"{where}: {type(e).__name__}: {e}"[:2000]


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def entries_json(params: list[AnalysisParams]) -> list[dict]:
    return [p.model_dump(mode="json") for p in params]
