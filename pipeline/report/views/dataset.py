"""Pages of the dataset family: predictions, features, activation statistics, top patches,
neighbours, embeddings, probes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from markupsafe import Markup

from jobs.core.base import safe_key
from pipeline.report.charts import bar_chart, line_chart
from pipeline.report.html import esc, figure, num, render, script_json, table_html
from pipeline.report.run import Run
from pipeline.report.views.base import Page, view


def predictions_body(run: Run, entry: str) -> Markup:
    """Accuracy, per-class accuracy and the confusion matrix of a ``predictions`` table."""
    df = run.table(entry, ["label", "pred", "prob"])
    labelled = df[df.label.notna()]
    if not len(labelled):
        return render("predictions.html", labelled=0, total=len(df))
    y, p = labelled.label.astype(int).to_numpy(), labelled.pred.astype(int).to_numpy()
    k = int(max(y.max(), p.max())) + 1
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, p), 1)
    names = [run.label(i) for i in range(k)]
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    bars = bar_chart([(names[i], float(per_class[i])) for i in range(k)], "per-class accuracy")
    return render("predictions.html", labelled=len(labelled), total=len(df), accuracy=float((y == p).mean()),
                  names=names, counts=confusion.tolist(), shares=shares.tolist(), bars=bars)


@view("predictions")
def predictions(page: Page) -> Markup:
    return predictions_body(page.run, page.entry)


def few_shot_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per layer (in table order) and shot count: the few-shot rows' test accuracy, mean and
    sample std over the draws (NaN for one draw), the draws and the mean training images."""
    few = df[df.shots.notna()].astype({"shots": int})
    if not len(few):
        return pd.DataFrame(columns=["layer", "shots", "mean", "std", "draws", "n_train"])
    summary = few.groupby(["layer", "shots"], sort=False).agg(
        mean=("test_accuracy", "mean"), std=("test_accuracy", "std"), draws=("test_accuracy", "size"),
        n_train=("n_train", "mean")).reset_index()
    order = {layer: i for i, layer in enumerate(dict.fromkeys(df.layer))}
    return summary.sort_values(["layer", "shots"], key=lambda c: c.map(order) if c.name == "layer" else c,
                               kind="stable").reset_index(drop=True)


def few_shot_section(df: pd.DataFrame) -> Markup:
    """Test accuracy against training images per class, a line per layer with ±1 std bars
    (Zeiler & Fergus 2014, Tables 4-5), and the numbers beside."""
    summary = few_shot_summary(df)
    shots = sorted(summary.shots.unique())
    series = []
    for layer, rows in summary.groupby("layer", sort=False):
        by = rows.set_index("shots")
        mean = [float(by["mean"].get(k, np.nan)) for k in shots]
        std = [float(by["std"].get(k, np.nan)) for k in shots]
        series.append((str(layer), mean, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]))
    chart = line_chart([str(k) for k in shots], series, "few-shot linear probe test accuracy (mean ± std over draws)",
                       y_label="test accuracy", x_label="training images per class", error_bars=True)
    return chart + table_html(summary)


@view("probes")
def probes(page: Page) -> Markup:
    df = page.run.table(page.entry)
    if "baseline" in df.columns:
        # A baseline's rows read as layers of their own: "layer3 (random_init)".
        named = df.baseline.notna()
        df = df.assign(layer=df.layer.where(~named, df.layer + " (" + df.baseline.astype(str) + ")"))
    full = df[df.shots.isna()] if "shots" in df.columns else df
    own = full[full.baseline.isna()] if "baseline" in full.columns else full
    series = [("test", list(own.test_accuracy)), ("train", list(own.train_accuracy))]
    if "baseline" in full.columns:
        for name, rows in full[full.baseline.notna()].groupby("baseline", sort=False):
            series.append((f"{name} (test)", list(rows.test_accuracy)))
    chart = bar_chart([(f"{r.layer} ({r.classifier})", r.test_accuracy) for r in own.itertuples()],
                      "linear probe accuracy per layer", series=series)
    sections = [("", chart + table_html(full.drop(columns=["shots", "repeat", "baseline"], errors="ignore")))]
    if "shots" in df.columns and df.shots.notna().any():
        sections.append(("Few-shot", few_shot_section(df)))
    return render("cards.html", sections=sections)


@view("activation_stats")
def activation_stats(page: Page) -> Markup:
    df = page.run.table(page.entry)
    per_layer = df.groupby("layer", sort=False).agg(channels=("channel", "size"), dead=("dead", "sum"),
                                                    mean=("mean", "mean"), zero_fraction=("zero_fraction", "mean"))
    return render("cards.html", sections=[("Per layer", table_html(per_layer.reset_index())),
                                          ("Per channel", table_html(df, limit=2000))])


@view("features")
def features(page: Page) -> Markup:
    run, entry = page.run, page.entry
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
    return render("features.html", entry=entry, table=table_html(pd.DataFrame(rows)))


@view("neighbours")
def neighbours(page: Page) -> Markup:
    run, entry = page.run, page.entry
    df = run.table(entry)
    if "key" in df:
        df = df[df.key.notna()]  # queries beyond the entry's ``strips`` have a table row but no picture
    strips = df.drop_duplicates(["image_id", "space"])
    items = []
    for image_id, group in strips.groupby("image_id", sort=True):
        by_space = {r.space: r for r in group.itertuples()}
        label = run.label(group.label.iloc[0])
        figs = [figure(run.image(entry, by_space[s].key), f"{esc(s)} space", paged=True)
                for s in ("pixel", "feature") if s in by_space]
        items.append(render("image_row.html", title=image_id, subtitle=label, cls="pair", figures=figs))
    return render("neighbours.html", items=items)


@view("embedding")
def embedding(page: Page) -> Markup:
    run, entry = page.run, page.entry
    df = run.table(entry)
    thumbs = run.images(entry)
    names = run.label_names or []
    plots = []
    for (layer, method), group in df.groupby(["layer", "method"], sort=False):
        name = safe_key(f"{entry}-{layer}-{method}")
        labels = group.label.to_numpy()
        points = [[round(float(x), 4), round(float(y), 4), int(lab) if lab == lab and lab is not None else -1, i,
                   thumbs.get(str(t)) if t is not None else None]
                  for x, y, lab, i, t in zip(group.x, group.y, labels, group.image_id,
                                             group["thumb_key"] if "thumb_key" in group else [None] * len(group))]
        count = int(np.nanmax(pd.to_numeric(labels, errors="coerce"))) + 1 if len(labels) else 0
        data = {"title": f"{layer} · {method}", "labels": names or [str(i) for i in range(count)], "points": points}
        (page.data_dir / f"{name}.js").write_text(
            f"(window.CONVSCOPE_DATA = window.CONVSCOPE_DATA || {{}})[{script_json(name)}] = {script_json(data)};\n")
        atlas = run.image(entry, group["atlas_key"].iloc[0]) if "atlas_key" in group else None
        plots.append({"name": name, "atlas": figure(atlas, "atlas: the image nearest each cell")})
    return render("embedding.html", plots=plots)


@view("top_patches")
def top_patches(page: Page) -> Markup:
    run, entry = page.run, page.entry
    df = run.table(entry)
    layers = []
    for layer, group in df.groupby("layer", sort=False):
        items = []
        by = ["label", "channel"] if "label" in group else ["channel"]
        for keys, rows in group.groupby(by, sort=True):
            channel = int(keys[-1])
            label = f"{run.label(keys[0])} · " if len(by) == 2 else ""
            sub = (f"{safe_key(entry)}--{safe_key(layer)}--" + (f"l{int(keys[0])}-" if len(by) == 2 else "")
                   + f"c{channel}.html")
            grid_img = run.image(entry, rows.grid_key.iloc[0]) if "grid_key" in rows else None
            top = rows.sort_values("rank")
            caption = f"{label}channel {channel} · #1 {num(top.activation.iloc[0])}"
            items.append(Markup(f'<a href="{sub}">{figure(grid_img, caption, paged=True)}</a>'))
            # Zeiler & Fergus Fig. 2: each channel's projections beside its patches.
            for column in [c for c in rows.columns if c.endswith("_grid_key") and c != "grid_key"]:
                shown = figure(run.image(entry, rows[column].iloc[0]), f"{column[:-len('_grid_key')]} projections",
                               paged=True)
                items.append(Markup(f'<a href="{sub}">{shown}</a>'))
            crops = [figure(run.image(entry, r.key),
                            f"#{int(r.rank)} · {num(r.activation)}<br>{esc(r.image_id)}<br>"
                            f"box {esc(list(r.box) if r.box is not None else None)}")
                     for r in top.itertuples()]
            page.write(sub, f"{entry}: {layer} {label}channel {channel}",
                       render("top_patches_channel.html", back=f"{safe_key(entry)}.html", crops=crops,
                              table=table_html(top[["rank", "image_id", "activation", "y", "x"]])))
        layers.append({"name": layer, "channels": items, "k": int(group["rank"].max())})
    return render("top_patches.html", layers=layers)
