"""``convscope report RUN_DIR``: a static HTML site over a run, from its output contract only.

Reads ``run.json``, ``manifest.resolved.yaml``, ``errors.parquet``, ``images.parquet`` and
each committed entry's Parquet table and image shards -- nothing else, so a report can be
built for a run made on another machine. Writes ``RUN_DIR/report/``::

    index.html            run summary: manifest, model, dataset, every analysis' status
    <entry>.html          a page per committed analysis entry (sections by type)
    <entry>--*.html       sub-pages (a top_patches channel)
    img/<entry>/<key>.png the entry's rendered images, copied out of its shards
    data/*.js             scatter points (a script, so it loads from file:// too)
    assets/report.{css,js}

Self-contained: no network, no CDN; it opens from a file or any static web server. Large
lists are paged in the browser and their images load only when shown; index.html holds the
summary only, so its weight does not grow with the dataset. Every string from the data is
escaped (``html.escape``; JSON for scripts with ``<`` escaped).

The report is built in a staging folder and renamed into place: a crash never leaves a
half-written report that looks complete.
"""

from __future__ import annotations

import functools
import html
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from jobs.core.base import safe_key
from pipeline.errors import UserError
from pipeline.store import Store
from pipeline.writers import SHARDS, SUCCESS

ASSETS = Path(__file__).with_name("report_assets")
ATTRIBUTION_TYPES = ("saliency", "guided_backprop", "deconvnet", "cam", "grad_cam", "guided_grad_cam", "occlusion")
PAGE_SIZE = 24


def esc(value: Any) -> str:
    """Any value as HTML text (None as an em dash)."""
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else html.escape(str(value))


def num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{float(value):.{digits}f}"


def script_json(obj: Any) -> str:
    """JSON safe inside a <script>: no ``</script>`` or ``<!--`` can end it early."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e").replace(
        "&", "\\u0026")


def table_html(df: pd.DataFrame, sortable: bool = True, digits: int = 3, limit: int | None = None) -> str:
    """A DataFrame as an escaped HTML table (numbers right-aligned)."""
    shown = df if limit is None else df.head(limit)
    head = "".join(f"<th>{esc(c)}</th>" for c in shown.columns)
    rows = []
    for record in shown.itertuples(index=False):
        cells = []
        for value in record:
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                cells.append(f'<td class="num">{num(value, digits)}</td>')
            else:
                cells.append(f"<td>{esc(value)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="note">{len(df) - len(shown):,} more rows not shown.</p>' if len(shown) < len(df) else ""
    cls = ' class="sortable"' if sortable else ""
    return (f'<div class="table-wrap"><table{cls}><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
            f"</table></div>{more}")


def figure(src: str | None, caption: str = "", lazy: bool = True, paged: bool = False, pixelated: bool = True,
           alt: str = "") -> str:
    """An <figure> with an image (``data-src`` inside paged lists, so it loads when shown)."""
    if src is None:
        img = '<div class="missing-img">no image</div>'
    else:
        attr = f'data-src="{esc(src)}"' if paged else f'src="{esc(src)}"' + (' loading="lazy"' if lazy else "")
        cls = ' class="pixelated"' if pixelated else ""
        img = f'<img {attr}{cls} alt="{esc(alt or caption)}">'
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def paged(items: Sequence[str], page_size: int = PAGE_SIZE, cls: str = "grid") -> str:
    """Items the browser shows a page at a time (``report.js``); images inside use data-src."""
    inner = "".join(f'<div class="item">{item}</div>' for item in items)
    return f'<div class="paged {cls}" data-page-size="{page_size}">{inner}</div>'


def badge(status: str) -> str:
    kind = {"complete": "ok", "skipped": "ok", "failed": "failed"}.get(status, "missing")
    return f'<span class="badge {kind}">{esc(status)}</span>'


# ----------------------------------------------------------------------------- reading a run


class Run:
    """A run folder as the output contract describes it, and the report being written."""

    def __init__(self, run_dir: Path | str | Store, out: Path):
        self.store = run_dir if isinstance(run_dir, Store) else Store.open(run_dir)
        self.out = Path(out)
        self.name = self.store.display().rstrip("/").rsplit("/", 1)[-1]
        try:
            self.info = json.loads(self.store.read_text("run.json"))
        except FileNotFoundError:
            raise UserError(f"{self.store.display()}: no run.json; is this the output folder of `convscope run`?"
                            ) from None
        except json.JSONDecodeError as e:
            raise UserError(f"{self.store.display('run.json')}: not valid JSON ({e})") from None
        self.label_names: list[str] | None = (self.info.get("dataset") or {}).get("label_names")
        self._extracted: dict[str, dict[str, str]] = {}

    @property
    def analyses(self) -> dict[str, dict]:
        return self.info.get("analyses") or {}

    def committed(self, entry: str) -> bool:
        return self.store.is_file(f"{entry}/{SUCCESS}")

    def parts(self, entry: str) -> list[str]:
        """The entry's Parquet parts (paths relative to the run), partitions included, sorted."""
        return [f for f in self.store.files(entry, recursive=True)
                if f.rsplit("/", 1)[-1].startswith("part-") and f.endswith(".parquet")]

    def schema(self, part: str):
        with self.store.open_input(part) as f:
            return pq.read_schema(f)

    def table(self, entry: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        frames = []
        for f in self.parts(entry):
            t = self.store.read_table(f, columns=list(columns) if columns else None)
            df = t.to_pandas()
            # Hive partitions (features/layer=layer3/...) as columns.
            for part in f[len(entry) + 1:].split("/")[:-1]:
                if "=" in part:
                    key, value = part.split("=", 1)
                    df[key] = value
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def label(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "unlabelled"
        i = int(value)
        if self.label_names and 0 <= i < len(self.label_names):
            return self.label_names[i]
        return str(i)

    def images(self, entry: str) -> dict[str, str]:
        """{key: path relative to the report} of the entry's rendered images, copied out once."""
        if entry not in self._extracted:
            found: dict[str, str] = {}
            folder = self.out / "img" / safe_key(entry)
            for shard in [f for f in self.store.files(f"{entry}/{SHARDS}") if f.endswith(".tar")]:
                with self.store.open_input(shard) as handle, tarfile.open(fileobj=handle) as tar:
                    for member in tar:
                        name = Path(member.name).name
                        # Only plain PNG files with safe names; anything else in a tar is ignored.
                        if not member.isfile() or not name.endswith(".png") or safe_key(name[:-4]) != name[:-4]:
                            continue
                        folder.mkdir(parents=True, exist_ok=True)
                        data = tar.extractfile(member)
                        if data is not None:
                            (folder / name).write_bytes(data.read())
                            found[name[:-4]] = f"img/{safe_key(entry)}/{name}"
            self._extracted[entry] = found
        return self._extracted[entry]

    def image(self, entry: str, key: Any) -> str | None:
        return None if key is None or (isinstance(key, float) and np.isnan(key)) else self.images(entry).get(str(key))


# ----------------------------------------------------------------------------- page frame


def page(run: Run, title: str, body: str, nav: Iterable[tuple[str, str]], current: str = "") -> str:
    here = ' aria-current="page"'
    links = "".join(f'<a href="{esc(href)}"{here if href == current else ""}>{esc(text)}</a>' for href, text in nav)
    name = esc(run.info.get("name", "run"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · {name} · convscope</title>
<link rel="stylesheet" href="assets/report.css">
<script src="assets/report.js" defer></script>
</head><body>
<nav class="top"><a href="index.html"><b>convscope</b> · {name}</a>{links}</nav>
<main><h1>{esc(title)}</h1>
{body}
</main>
<footer>convscope report · built {esc(time.strftime('%Y-%m-%d %H:%M'))} from {esc(run.name)}</footer>
</body></html>
"""


# ----------------------------------------------------------------------------- sections


def summary_body(run: Run, errors: pd.DataFrame, pages: dict[str, str]) -> str:
    info = run.info
    ds, model, ex = info.get("dataset") or {}, info.get("model") or {}, info.get("execution") or {}
    facts = [
        ("status", badge(info.get("status", "unknown"))),
        ("finished", esc(info.get("finished"))),
        ("seconds", num(info.get("seconds"), 1)),
        ("manifest", esc(info.get("manifest"))),
        ("dataset", f"{esc(ds.get('kind'))}: {num(ds.get('images'))} images, {num(ds.get('errors'))} unusable"),
        ("classes", esc(", ".join(run.label_names)) if run.label_names else "—"),
        ("fingerprint", f"<code>{esc(ds.get('fingerprint'))}</code>"),
        ("model", f"{esc(model.get('source'))} {esc(model.get('name'))} <code>{esc(model.get('hash'))}</code>"),
        ("execution", esc(f"{ex.get('address')}, {ex.get('workers')} worker(s), batch {ex.get('batch_size')}, "
                          f"device {ex.get('device')}, {ex.get('precision')}")),
    ]
    facts_html = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    rows = []
    for name, a in run.analyses.items():
        link = f'<a href="{esc(pages[name])}">{esc(name)}</a>' if name in pages else esc(name)
        note = esc((a.get("error") or "").splitlines()[0][:200]) if a.get("error") else esc(a.get("reason") or "")
        if a.get("status") in ("complete", "skipped") and name not in pages:
            note = note or "committed, no page for this type"
        rows.append(f"<tr><td>{link}</td><td>{esc(a.get('type'))}</td><td>{badge(a.get('status', 'not run'))}</td>"
                    f'<td class="num">{num(a.get("rows"))}</td><td class="num">{num(a.get("seconds"), 1)}</td>'
                    f"<td>{note}</td></tr>")
    analyses = ("<table class=\"sortable\"><thead><tr><th>entry</th><th>type</th><th>status</th><th>rows</th>"
                f"<th>seconds</th><th>note</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    err = (f"<p>{len(errors):,} input(s) could not be used.</p>" + table_html(errors, limit=50)
           + (' <p><a href="errors.html">All errors</a></p>' if len(errors) > 50 else "")) if len(errors) else \
        "<p>Every image was used.</p>"
    manifest = ""
    if run.store.is_file("manifest.resolved.yaml"):
        text = run.store.read_text("manifest.resolved.yaml")
        manifest = f"<details><summary>manifest (resolved)</summary><pre>{esc(text)}</pre></details>"
    return (f'<section class="card"><h2>Run</h2><table class="facts">{facts_html}</table>{manifest}</section>'
            f'<section class="card"><h2>Analyses</h2>{analyses}</section>'
            f'<section class="card"><h2>Errors</h2>{err}</section>')


def predictions_body(run: Run, entry: str) -> str:
    df = run.table(entry, ["label", "pred", "prob"])
    labelled = df[df.label.notna()]
    if not len(labelled):
        return f"<p>{len(df):,} predictions; the dataset has no labels, so no accuracy.</p>"
    y, p = labelled.label.astype(int).to_numpy(), labelled.pred.astype(int).to_numpy()
    k = int(max(y.max(), p.max())) + 1
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, p), 1)
    acc = float((y == p).mean())
    names = [run.label(i) for i in range(k)]
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    body = []
    for i in range(k):
        total = max(confusion[i].sum(), 1)
        cells = "".join(
            f'<td class="num" style="background: rgba(31,119,180,{confusion[i, j] / total:.3f})">'
            f"{confusion[i, j]:,}</td>"
            for j in range(k))
        body.append(f"<tr><th>{esc(names[i])}</th>{cells}</tr>")
    matrix = (f'<table class="confusion"><thead><tr><th>label \\ predicted</th>{head}</tr></thead>'
              f"<tbody>{''.join(body)}</tbody></table>")
    bars = bar_chart([(names[i], float(per_class[i])) for i in range(k)], "per-class accuracy")
    return (f'<section class="card"><h2>Accuracy</h2><p class="big">{acc:.2%}</p>'
            f"<p>top-1 over {len(labelled):,} labelled images ({len(df) - len(labelled):,} unlabelled).</p></section>"
            f'<section class="card"><h2>Per-class accuracy</h2>{bars}</section>'
            f'<section class="card"><h2>Confusion matrix</h2>{matrix}</section>')


def bar_chart(values: Sequence[tuple[str, float]], title: str, top: float = 1.0,
              series: Sequence[tuple[str, Sequence[float]]] | None = None) -> str:
    """Horizontal bars as inline SVG (values in [0, top]); ``series`` draws several per row."""
    series = series or [("", [v for _, v in values])]
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    row_h, label_w, width = 14 * len(series) + 8, 160, 420
    height = row_h * len(values) + 24
    parts = []
    for i, (name, _) in enumerate(values):
        y = 20 + i * row_h
        parts.append(f'<text x="{label_w - 6}" y="{y + row_h / 2}" text-anchor="end" '
                     f'dominant-baseline="middle">{esc(name)}</text>')
        for s, (_, vals) in enumerate(series):
            v = float(vals[i]) if vals[i] is not None and not np.isnan(vals[i]) else 0.0
            w = max(0.0, min(1.0, v / top)) * width
            parts.append(f'<rect x="{label_w}" y="{y + 2 + 14 * s}" width="{w:.1f}" height="12" '
                         f'fill="{colours[s % 4]}"><title>{esc(name)}: {v:.3f}</title></rect>'
                         f'<text x="{label_w + w + 4:.1f}" y="{y + 8 + 14 * s}" dominant-baseline="middle" '
                         f'class="value">{v:.3f}</text>')
    legend = "".join(f'<tspan fill="{colours[s % 4]}">■ {esc(n)} </tspan>' for s, (n, _) in enumerate(series) if n)
    full = label_w + width + 60
    return (f'<svg class="chart" viewBox="0 0 {full} {height}" width="{full}" height="{height}" '
            f'style="max-width: 100%; height: auto; font-size: 12px" role="img" '
            f'aria-label="{esc(title)}"><text x="0" y="12" class="title">{esc(title)} {legend}</text>'
            f"{''.join(parts)}</svg>")


def probes_body(run: Run, entry: str) -> str:
    df = run.table(entry)
    chart = bar_chart([(f"{r.layer} ({r.classifier})", r.test_accuracy) for r in df.itertuples()],
                      "linear probe accuracy per layer",
                      series=[("test", list(df.test_accuracy)), ("train", list(df.train_accuracy))])
    return f'<section class="card">{chart}{table_html(df)}</section>'


def activation_stats_body(run: Run, entry: str) -> str:
    df = run.table(entry)
    per_layer = df.groupby("layer", sort=False).agg(channels=("channel", "size"), dead=("dead", "sum"),
                                                    mean=("mean", "mean"), zero_fraction=("zero_fraction", "mean"))
    return (f'<section class="card"><h2>Per layer</h2>{table_html(per_layer.reset_index())}</section>'
            f'<section class="card"><h2>Per channel</h2>{table_html(df, limit=2000)}</section>')


def features_body(run: Run, entry: str) -> str:
    rows = []
    by_partition: dict[str, list[str]] = {}
    for f in run.parts(entry):
        by_partition.setdefault("/".join(f[len(entry) + 1:].split("/")[:-1]), []).append(f)
    for partition, files in sorted(by_partition.items()):
        count, dims = 0, 0
        for i, f in enumerate(files):
            with run.store.open_input(f) as handle:
                meta = pq.ParquetFile(handle)
                count += meta.metadata.num_rows
                if i == 0:
                    first = meta.read_row_group(0, columns=["vector"]).column("vector")
                    dims = len(first[0].as_py()) if len(first) else 0
        rows.append({"partition": partition, "rows": count, "dims": dims})
    return (f'<section class="card"><p>Feature vectors, one per image: read them with '
            f"<code>pd.read_parquet(\"{esc(entry)}\")</code>.</p>{table_html(pd.DataFrame(rows))}</section>")


def neighbours_body(run: Run, entry: str) -> str:
    df = run.table(entry)
    strips = df.drop_duplicates(["image_id", "space"])
    items = []
    for image_id, group in strips.groupby("image_id", sort=True):
        by_space = {r.space: r for r in group.itertuples()}
        label = run.label(group.label.iloc[0])
        figs = "".join(figure(run.image(entry, by_space[s].key), f"{esc(s)} space", paged=True)
                       for s in ("pixel", "feature") if s in by_space)
        items.append(f'<h3>{esc(image_id)} <small>{esc(label)}</small></h3><div class="pair">{figs}</div>')
    return (f'<section class="card"><p>{len(items):,} queries: the query, then its nearest neighbours, in pixel '
            f"space and in feature space.</p>{paged(items, 8, cls='list')}</section>")


def embedding_body(run: Run, entry: str, data_dir: Path) -> str:
    df = run.table(entry)
    thumbs = run.images(entry)
    sections = []
    names = run.label_names or []
    for (layer, method), group in df.groupby(["layer", "method"], sort=False):
        name = safe_key(f"{entry}-{layer}-{method}")
        labels = group.label.to_numpy()
        points = [[round(float(x), 4), round(float(y), 4), int(lab) if lab == lab and lab is not None else -1, i,
                   thumbs.get(str(t)) if t is not None else None]
                  for x, y, lab, i, t in zip(group.x, group.y, labels, group.image_id,
                                             group["thumb_key"] if "thumb_key" in group else [None] * len(group))]
        data = {"title": f"{layer} · {method}", "labels": names or [str(i) for i in range(int(np.nanmax(
            pd.to_numeric(labels, errors="coerce"))) + 1 if len(labels) else 0)], "points": points}
        (data_dir / f"{name}.js").write_text(
            f"(window.CONVSCOPE_DATA = window.CONVSCOPE_DATA || {{}})[{script_json(name)}] = {script_json(data)};\n")
        atlas = run.image(entry, group["atlas_key"].iloc[0]) if "atlas_key" in group else None
        sections.append(f'<section class="card">'
                        f'<div class="scatter" data-points="{esc(name)}"></div>'
                        f'<script src="data/{esc(name)}.js"></script>'
                        f'<details><summary>atlas</summary>{figure(atlas, "atlas: the image nearest each cell")}'
                        f"</details></section>")
    return "".join(sections)


def top_patches_pages(run: Run, entry: str, write: Callable[[str, str, str], None]) -> str:
    df = run.table(entry)
    sections = []
    for layer, group in df.groupby("layer", sort=False):
        items = []
        for channel, rows in group.groupby("channel", sort=True):
            sub = f"{safe_key(entry)}--{safe_key(layer)}--c{int(channel)}.html"
            grid_img = run.image(entry, rows.grid_key.iloc[0]) if "grid_key" in rows else None
            top = rows.sort_values("rank")
            caption = f"channel {int(channel)} · max {num(top.activation.iloc[0])}"
            items.append(f'<a href="{sub}">{figure(grid_img, caption, paged=True)}</a>')
            crops = "".join(figure(run.image(entry, r.key),
                                   f"#{int(r.rank)} · {num(r.activation)}<br>{esc(r.image_id)}<br>"
                                   f"box {esc(list(r.box) if r.box is not None else None)}")
                            for r in top.itertuples())
            table = table_html(top[["rank", "image_id", "activation", "y", "x"]])
            write(sub, f"{entry}: {layer} channel {int(channel)}",
                  f'<p><a href="{safe_key(entry)}.html">← all channels</a></p>'
                  f'<section class="card"><h2>Top patches</h2><div class="grid">{crops}</div></section>'
                  f'<section class="card"><h2>Where they come from</h2>{table}</section>')
        sections.append(f'<section class="card"><h2>{esc(layer)}</h2><p>{len(items)} channels; each shows its '
                        f"top-{int(group['rank'].max())} patches. Click a channel for its crops, activations and "
                        f"images.</p>{paged(items, 24)}</section>")
    return "".join(sections)


def attribution_body(run: Run, entries: list[str], summary: str | None) -> str:
    parts = []
    if summary:
        s = run.table(summary)
        overall = s[s.label.isna()].drop(columns=["label", "label_name"])
        parts.append(f'<section class="card"><h2>Faithfulness by method</h2><p>Deletion AUC: lower is better; '
                     f"insertion AUC, pointing game, box energy: higher is better.</p>{table_html(overall)}</section>")
        per_class = s[s.label.notna()]
        if len(per_class):
            parts.append(f'<section class="card"><details><summary>per class</summary>{table_html(per_class)}'
                         "</details></section>")
    columns = ["image_id", "label", "method", "target", "score", "deletion_auc", "insertion_auc", "pointing", "key"]
    frames = []
    for entry in entries:
        files = run.parts(entry)
        if not files:
            continue
        df = run.table(entry, [c for c in columns if c in run.schema(files[0]).names])
        df["entry"] = entry
        frames.append(df)
    if frames:
        df = pd.concat(frames, ignore_index=True)
        items = []
        for image_id, group in df.groupby("image_id", sort=True):
            label = run.label(group.label.iloc[0])
            figs = []
            for r in group.itertuples():
                caption = (f"<b>{esc(r.entry)}</b> · class {esc(run.label(r.target))}<br>p {num(r.score, 2)}"
                           f" · del {num(getattr(r, 'deletion_auc', None), 2)} · ins "
                           f"{num(getattr(r, 'insertion_auc', None), 2)}")
                figs.append(figure(run.image(r.entry, getattr(r, "key", None)), caption, paged=True, pixelated=False))
            items.append(f'<h3>{esc(image_id)} <small>{esc(label)}</small></h3>'
                         f'<div class="grid wide">{"".join(figs)}</div>')
        parts.append(f'<section class="card"><h2>Per image</h2><p>{len(items):,} images, every method side by '
                     f"side (image · map over it · colour scale).</p>{paged(items, 6, cls='list')}</section>")
    return "".join(parts)


def gallery(run: Run, entry: str, df: pd.DataFrame, caption: Callable[[Any], str], key: str = "key",
            per_page: int = 48) -> str:
    items = [figure(run.image(entry, getattr(r, key)), caption(r), paged=True) for r in df.itertuples()]
    return paged(items, per_page)


def model_body(run: Run, entry: str, kind: str) -> str:
    df = run.table(entry, None)
    drop = [c for c in ("image", "history", "map", "weight") if c in df.columns]
    if kind == "filters":
        out = []
        for (layer, norm), group in df.groupby(["layer", "norm"], sort=False):
            out.append(f'<section class="card"><h2>{esc(layer)} · {esc(norm)} scale</h2>'
                       f'{figure(run.image(entry, group.grid_key.iloc[0]), f"{len(group)} filters")}</section>')
        return "".join(out)
    if kind == "activation_maps":
        grids = df.drop_duplicates("key")
        return ('<section class="card">'
                f'{gallery(run, entry, grids, lambda r: f"{esc(r.image_id)}<br>{esc(r.layer)}", per_page=12)}'
                "</section>")
    if kind == "class_model":
        df = df.rename(columns={"class": "target_class"})  # "class" is no attribute name

        def caption(r: Any) -> str:
            return f"{esc(r.class_name or r.target_class)} · restart {r.restart}<br>p {num(r.probability)}"

        return (f'<section class="card"><p>Mean probability the model gives each class model for its class: '
                f"<b>{num(df.probability.mean())}</b>.</p>"
                f"{gallery(run, entry, df, caption)}"
                f'</section><section class="card">'
                f'{table_html(df.drop(columns=drop + ["key", "shard"]).rename(columns={"target_class": "class"}))}'
                "</section>")
    if kind == "neuron_ascent":
        def caption(r: Any) -> str:
            return f"{esc(r.layer)} channel {r.channel}<br>{num(r.start_value, 2)} → {num(r.final_value, 2)}"

        return (f'<section class="card">{gallery(run, entry, df, caption)}'
                f'</section><section class="card">{table_html(df.drop(columns=drop + ["key", "shard"]))}</section>')
    if kind == "inversion":
        means = df.groupby("layer", sort=False)[["pixel_error", "relative_feature_error"]].mean().reset_index()
        chart = bar_chart(list(zip(means.layer, means.pixel_error)), "pixel RMSE (lower: the layer keeps more)",
                          top=max(0.3, float(means.pixel_error.max())))

        def caption(r: Any) -> str:
            return f"{esc(r.image_id)} · {esc(r.layer)}<br>pixel error {num(r.pixel_error)}"

        return (f'<section class="card"><h2>Error per layer</h2>'
                f"{chart}"
                f"{table_html(means)}</section>"
                f'<section class="card"><h2>Original · reconstruction</h2>'
                f"{gallery(run, entry, df, caption, per_page=12)}</section>")
    if kind == "deepdream":
        def caption(r: Any) -> str:
            return f"{esc(r.image_id)} · {esc(r.layer)}<br>{num(r.start_value, 2)} → {num(r.final_value, 2)}"

        return (f'<section class="card">{gallery(run, entry, df, caption, per_page=12)}'
                "</section>")
    if kind == "invariance":
        plots = df.drop_duplicates("key")
        figs = "".join(f'<section class="card"><h2>{esc(r.transform)}</h2>'
                       f'{figure(run.image(entry, r.key), "", pixelated=False)}</section>' for r in plots.itertuples())
        return figs + (f'<section class="card"><details><summary>table</summary>{table_html(df, limit=2000)}'
                       "</details></section>")
    return f'<section class="card">{table_html(df.drop(columns=drop), limit=500)}</section>'


MODEL_TYPES = ("filters", "activation_maps", "class_model", "neuron_ascent", "inversion", "deepdream", "invariance")


# ----------------------------------------------------------------------------- the whole site


def build_report(run_dir: Path | str, log: Callable[[str], None] = lambda message: None,
                 out: Path | str | None = None) -> Path | str:
    """Write the report (atomically) and return where its index.html is.

    ``run_dir`` is a local run folder or a run's URI (``s3://bucket/run``). The report goes
    to ``out`` (a local folder) when given, else to ``run_dir/report/``: on an object store
    it is uploaded there file by file, ``index.html`` last.
    """
    store = Store.open(run_dir)
    if not store.is_dir(""):
        raise UserError(f"{store.display()}: no such run folder")
    if out is not None:
        final = Path(out).absolute()
    elif store.local:
        final = Path(store.path("report"))
    else:
        final = Path(tempfile.mkdtemp(prefix="convscope-report-")) / "report"
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}-staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "assets").mkdir(parents=True)
    (staging / "data").mkdir()
    for asset in ("report.css", "report.js"):
        shutil.copyfile(ASSETS / asset, staging / "assets" / asset)
    try:
        run = Run(store, staging)
        _write_pages(run, log)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}-old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    if out is not None or store.local:
        return final / "index.html"
    # Uploaded: the old report goes first, index.html comes last (a report without it is partial).
    store.delete("report")
    files = sorted(p for p in final.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.name == "index.html"):
        store.write_bytes(f"report/{path.relative_to(final).as_posix()}", path.read_bytes(), durable=False)
    shutil.rmtree(final.parent, ignore_errors=True)
    return store.display("report/index.html")


def _write_pages(run: Run, log: Callable[[str], None]) -> None:
    out = run.out
    committed = {name: a for name, a in run.analyses.items()
                 if a.get("status") in ("complete", "skipped") and run.committed(name)}
    types = {name: a.get("type") for name, a in committed.items()}
    attribution = [n for n, t in types.items() if t in ATTRIBUTION_TYPES]
    # Every attribution entry and the summary share one page: methods side by side per image.
    pages = {name: "attribution.html" if kind in ATTRIBUTION_TYPES or kind == "attribution_summary"
             else f"{safe_key(name)}.html" for name, kind in types.items()}
    nav = list({href: "attribution" if href == "attribution.html" else name
                for name, href in reversed(pages.items())}.items())[::-1]

    def write(filename: str, title: str, body: str) -> None:
        (out / filename).write_text(page(run, title, body, nav, filename), encoding="utf-8")

    errors = run.store.read_table("errors.parquet").to_pandas() if run.store.is_file("errors.parquet") else \
        pd.DataFrame()
    write("index.html", "Run summary", summary_body(run, errors, pages))
    if len(errors) > 50:
        write("errors.html", "Errors", f'<section class="card">{table_html(errors)}</section>')
    done_attribution = False
    for name, kind in types.items():
        log(f"  {name} ({kind})")
        if kind in ATTRIBUTION_TYPES or kind == "attribution_summary":
            if not done_attribution:
                summary = next((n for n, t in types.items() if t == "attribution_summary"), None)
                write("attribution.html", "Attribution",
                      _section(functools.partial(attribution_body, run, attribution, summary), "attribution", log))
                done_attribution = True
            continue
        if not run.parts(name):
            body = '<section class="card"><p>This analysis committed no rows.</p></section>'
        else:
            body = _section(functools.partial(_body, run, name, kind, write), name, log)
        write(pages[name], f"{name} ({kind})" if name != kind else name, body)


def _body(run: Run, name: str, kind: str | None, write: Callable[[str, str, str], None]) -> str:
    # ``kind`` is the entry's ``type`` in run.json: None where it has none (drawn as a plain table).
    if kind == "predictions":
        return predictions_body(run, name)
    if kind == "features":
        return features_body(run, name)
    if kind == "neighbours":
        return neighbours_body(run, name)
    if kind == "embedding":
        return embedding_body(run, name, run.out / "data")
    if kind == "top_patches":
        return top_patches_pages(run, name, write)
    if kind == "probes":
        return probes_body(run, name)
    if kind == "activation_stats":
        return activation_stats_body(run, name)
    if kind in MODEL_TYPES:
        return model_body(run, name, kind)
    return f'<section class="card">{table_html(run.table(name), limit=500)}</section>'


def _section(build: Callable[[], str], name: str, log: Callable[[str], None]) -> str:
    """A section's HTML, or a note saying why it could not be drawn (the rest of the report goes on)."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 -- one odd table must not cost the whole report
        log(f"  {name}: could not draw this section: {type(e).__name__}: {e}")
        return (f'<section class="card"><p><span class="badge failed">not drawn</span> This section could not be '
                f"drawn from the tables: {esc(type(e).__name__)}: {esc(e)}</p></section>")
