"""``convscope report RUN_DIR``: a static HTML site over a run, from its output contract only.

Reads ``run.json``, ``manifest.resolved.yaml``, ``errors.parquet``, ``images.parquet`` and
each committed entry's Parquet table and image shards -- nothing else, so a report can be
built for a run made on another machine. Writes ``RUN_DIR/report/``::

    index.html            run summary: manifest, model, dataset, every analysis' status
    <entry>.html          a page per committed analysis entry (its view)
    <entry>--*.html       sub-pages (a top_patches channel)
    img/<entry>/<key>.png the entry's rendered images, copied out of its shards
    data/*.js             scatter points (a script, so it loads from file:// too)
    assets/report.{css,js}

Self-contained: no network, no CDN; it opens from a file or any static web server. Large
lists are paged in the browser and their images load only when shown; index.html holds the
summary only, so its weight does not grow with the dataset. Every string from the data is
escaped (Jinja2 templates, autoescaped; JSON for scripts with ``<`` escaped).

The report is built in a staging folder and renamed into place: a crash never leaves a
half-written report that looks complete.

- :mod:`.run`: the run folder as the output contract describes it;
- :mod:`.html`: the Jinja2 templates (``templates/``) and the small blocks every page uses;
- :mod:`.charts`: static charts (matplotlib, inline SVG);
- :mod:`.views`: each analysis' page, registered by name (a family's shared page by family);
- :mod:`.blocks`: the pages analyses declare as blocks (:mod:`jobs.core.views`);
- :mod:`.site`: the whole site, written atomically.
"""

from pipeline.report.charts import bar_chart
from pipeline.report.html import badge, esc, figure, num, paged, render, script_json, table_html
from pipeline.report.run import Run
from pipeline.report.site import build_report, page, summary_body
from pipeline.report.views.dataset import predictions_body

__all__ = ["Run", "badge", "bar_chart", "build_report", "esc", "figure", "num", "page", "paged",
           "predictions_body", "render", "script_json", "summary_body", "table_html"]
