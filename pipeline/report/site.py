"""The whole report: a page per committed entry (or per family with a page of its own), the run
summary, written in a staging folder and renamed into place (see :mod:`pipeline.report`)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pandas as pd
from markupsafe import Markup

from jobs import REGISTRY
from jobs.core.base import safe_key
from pipeline.errors import UserError
from pipeline.report.blocks import draw
from pipeline.report.evolution import evolution_body
from pipeline.report.html import badge, esc, num, render, table_html
from pipeline.report.run import Run
from pipeline.report.views import FAMILY_VIEWS, VIEWS, Page
from pipeline.store import Store

ASSETS = Path(__file__).parent.with_name("report_assets")
EVOLUTION = "evolution.html"  # a checkpoint series' page


def page(run: Run, title: str, body: Markup, nav: list[tuple[str, str]], current: str = "") -> str:
    """A whole HTML page: the run's navigation, ``title`` and ``body``."""
    return str(render("page.html", title=title, run_name=run.info.get("name", "run"), nav=nav, current=current,
                      body=body, built=time.strftime("%Y-%m-%d %H:%M"), folder=run.name))


def summary_body(run: Run, errors: pd.DataFrame, pages: dict[str, str]) -> Markup:
    """index.html: the run, every analysis' status, the images that could not be used."""
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
    analyses = []
    for name, a in run.analyses.items():
        note = (a.get("error") or "").splitlines()[0][:200] if a.get("error") else (a.get("reason") or "")
        if a.get("status") in ("complete", "skipped") and name not in pages:
            note = note or "committed, no page for this type"
        analyses.append({"name": name, "href": pages.get(name), "type": a.get("type"),
                         "status": a.get("status", "not run"), "rows": a.get("rows"), "seconds": a.get("seconds"),
                         "note": note})
    manifest = run.store.read_text("manifest.resolved.yaml") if run.store.is_file("manifest.resolved.yaml") else None
    return render("summary.html", facts=[(k, Markup(v)) for k, v in facts], analyses=analyses, manifest=manifest,
                  errors=len(errors), error_table=table_html(errors, limit=50) if len(errors) else "")


def _family(kind: str | None) -> str:
    cls = REGISTRY.get(str(kind))
    return cls.family if cls is not None else ""


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
    # A family with a page of its own (attribution: every method side by side per image)
    # gathers all its entries there; every other entry has a page of its own.
    shared = {name: FAMILY_VIEWS[_family(kind)][0] for name, kind in types.items() if _family(kind) in FAMILY_VIEWS}
    pages = {name: shared.get(name, f"{safe_key(name)}.html") for name in types}
    nav = list({href: href[:-len(".html")] if href in shared.values() else name
                for name, href in reversed(pages.items())}.items())[::-1]
    # A checkpoint series: the evolution page compares the checkpoints; every other page shows the last.
    shown = run.at(run.checkpoints[-1]) if run.checkpoints else run
    if run.checkpoints:
        nav.insert(0, (EVOLUTION, "evolution"))

    def write(filename: str, title: str, body: Markup) -> None:
        (out / filename).write_text(page(run, title, body, nav, filename), encoding="utf-8")

    errors = run.store.read_table("errors.parquet").to_pandas() if run.store.is_file("errors.parquet") else \
        pd.DataFrame()
    write("index.html", "Run summary", summary_body(run, errors, pages))
    if run.checkpoints:
        write(EVOLUTION, "Through training", _section(partial(evolution_body, run), "evolution", log))
    if len(errors) > 50:
        write("errors.html", "Errors", render("cards.html", sections=[("", table_html(errors))]))
    done: set[str] = set()
    for name, kind in types.items():
        log(f"  {name} ({kind})")
        family = _family(kind)
        if family in FAMILY_VIEWS:
            if family not in done:
                filename, family_page = FAMILY_VIEWS[family]
                members = [n for n, k in types.items() if _family(k) == family]
                write(filename, filename[:-len(".html")].capitalize(),
                      _section(partial(family_page, shown, members), family, log))
                done.add(family)
            continue
        if not shown.parts(name):
            body = render("cards.html", sections=[("", Markup("<p>This analysis committed no rows.</p>"))])
        else:
            entry_page = Page(shown, name, str(kind), write, run.out / "data")
            body = _section(partial(_body, entry_page), name, log)
        title = f"{name} ({kind})" if name != kind else name
        write(pages[name], f"{title}, checkpoint {shown.checkpoint}" if shown.checkpoint else title, body)


def _body(page: Page) -> Markup:
    """The entry's registered view, else the blocks its analysis declares, else its table."""
    if page.kind in VIEWS:
        return VIEWS[page.kind](page)
    cls = REGISTRY.get(page.kind)
    if cls is not None and cls.view:
        return draw(page.run, page.entry, cls.view)
    return render("cards.html", sections=[("", table_html(page.run.table(page.entry), limit=500))])


def _section(build: Callable[[], Markup], name: str, log: Callable[[str], None]) -> Markup:
    """A section's HTML, or a note saying why it could not be drawn (the rest of the report goes on)."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 -- one odd table must not cost the whole report
        log(f"  {name}: could not draw this section: {type(e).__name__}: {e}")
        return render("not_drawn.html", error=f"{type(e).__name__}: {e}")
