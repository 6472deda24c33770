"""The linear heads a ``probes`` entry saved: one per layer, features -> logits.

A committed probes entry keeps its full-data probes in the sidecar table
``<entry>/_heads/part-*.parquet`` (a folder starting with ``_``, which readers of the probes
table skip). Each head maps a layer's pooled features -- the ``pool`` of the entry, as the
``features`` analysis writes them with the same ``pool`` -- to logits over the labelled classes.

Example::

    from pipeline.heads import load_head
    head = load_head("runs/cifar10/probes", "layer3")
    feats = pd.read_parquet("runs/cifar10/features", filters=[("layer", "=", "layer3")])
    logits = head.logits(np.stack(feats.vector))        # (n, classes)
    predicted = head.predict(np.stack(feats.vector))     # labels
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from jobs.dataset.probes import HEADS, LinearHead, heads_from_table
from pipeline.errors import UserError
from pipeline.store import Store
from pipeline.writers import SUCCESS, table_parts

__all__ = ["LinearHead", "load_head", "load_heads"]


def load_heads(entry_dir: str | Path | Store) -> dict[str, LinearHead]:
    """{layer: head} of a committed probes entry folder (a local path, a URI or a :class:`Store`)."""
    store = entry_dir if isinstance(entry_dir, Store) else Store.open(entry_dir)
    if not store.is_file(SUCCESS):
        raise UserError(f"{store.display()}: not a committed entry (no {SUCCESS})")
    files = table_parts(store, HEADS)
    if not files:
        series = sorted(f.split("/")[0] for f in store.files("", recursive=True)
                        if f.startswith("checkpoint=") and f"/{HEADS}/" in f)
        if series:  # a checkpoint series keeps one set of heads per checkpoint
            folders = ", ".join(dict.fromkeys(series))
            raise UserError(f"{store.display()}: a checkpoint series; its heads are per checkpoint, in "
                            f"{folders}: load one of those folders")
        raise UserError(f"{store.display()}: no saved heads ({HEADS}/part-*.parquet); "
                        "is this a probes entry, written by this version?")
    table = pa.concat_tables(store.read_table(f) for f in files)
    return {head.layer: head for head in heads_from_table(table)}


def load_head(entry_dir: str | Path | Store, layer: str) -> LinearHead:
    """The head of one layer of a committed probes entry; KeyError naming the layers saved."""
    heads = load_heads(entry_dir)
    if layer not in heads:
        raise KeyError(f"no head for layer {layer!r}; saved: {', '.join(heads) or 'none'}")
    return heads[layer]
