"""The report page: one self-contained HTML file (no server, no network).

Plots are drawn by **Plotly** (plotly.js, shipped inside the ``plotly`` Python package, so nothing
is fetched at run time or at view time). Its 4.8 MB bundle is inlined gzip-compressed (1.5 MB)
and unpacked by the browser's ``DecompressionStream``; the thumbnails are inlined as ``data:``
JPEGs. The image grids are plain HTML (they need no script); ``assets/report.js`` draws the funnel,
the histograms, the timings and the treemap from the JSON embedded in the page.
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import json
from importlib import resources


@functools.lru_cache(maxsize=1)
def plotly_gz_b64() -> str:
    """plotly.js, gzip-compressed and base64-encoded (computed once per process)."""
    from plotly.offline import get_plotlyjs

    return base64.b64encode(gzip.compress(get_plotlyjs().encode(), compresslevel=9, mtime=0)).decode()


def plotly_version() -> str:
    import plotly

    return plotly.__version__


def _asset(name: str) -> str:
    return resources.files("operators.report").joinpath("assets", name).read_text()


def esc(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _json_for_script(obj) -> str:
    """JSON safe inside a <script> element (no ``</script>`` or ``<!--`` can close it)."""
    return json.dumps(obj, separators=(",", ":"), default=str).replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("&", "\\u0026")


def hover_text(item: dict) -> str:
    """What a thumbnail says on hover: id, reason, captions with their sources, scores, URL."""
    lines = [item["sample_id"] or ""]
    if item["status"] != "kept":
        lines.append(f"{item['status']} at {item['stage']}: {item['reason']}" +
                     (f" ({item['message']})" if item.get("message") else ""))
    else:
        lines.append("kept")
    if item.get("duplicate_of"):
        lines.append(f"duplicate of {item['duplicate_of']}")
    sources = item.get("caption_sources") or []
    for i, c in enumerate(item.get("captions") or []):
        src = sources[i] if i < len(sources) else ""
        lines.append(f"caption [{src}]: {c}" if src else f"caption: {c}")
    scores = {k: v for k, v in (item.get("scores") or {}).items() if v is not None}
    if scores:
        lines.append("  ".join(f"{k}={v:.4g}" for k, v in scores.items()))
    if item.get("url"):
        lines.append(item["url"])
    return "\n".join(lines)


def grid_html(grid: dict) -> str:
    """One grid: a header that says how many it shows of how many, then a figure per sample."""
    figures = []
    for item in grid["items"]:
        tip = esc(hover_text(item))
        caption = esc((item.get("captions") or [""])[0][:80])
        if item.get("thumb"):
            pic = f'<img src="{item["thumb"]}" alt="{esc(item["sample_id"])}">'
        else:
            pic = f'<div class="noimg">{esc(item["reason"] or "no image")}</div>'
        figures.append(f'<figure class="thumb" title="{tip}">{pic}<figcaption>{caption}</figcaption></figure>')
    images = sum(1 for i in grid["items"] if i.get("thumb"))
    note = "" if images == len(grid["items"]) else (
        f", {images} with a picture" if images else ", no picture (dropped before an image was kept)")
    return (f'<div class="grid" data-key="{esc(grid["key"])}" data-total="{grid["total"]}" '
            f'data-shown="{len(grid["items"])}" data-images="{images}">'
            f'<h3>{esc(grid["title"])} <span class="count">{len(grid["items"])} of {grid["total"]:,} shown'
            f'{note}</span></h3><div class="thumbs">{"".join(figures)}</div></div>')


def funnel_table(funnel: list[dict]) -> str:
    rows = []
    for f in funnel:
        drops = ", ".join(f"{esc(k.split('/', 2)[-1])} {v:,}" for k, v in sorted(f["dropped"].items(),
                                                                                   key=lambda kv: -kv[1]))
        rows.append(f'<tr data-stage="{esc(f["stage"])}" data-entering="{f["entering"]}" '
                    f'data-dropped="{sum(f["dropped"].values())}" data-leaving="{f["leaving"]}">'
                    f'<td>{esc(f["phase_name"])}</td><td>{esc(f["stage"])}</td><td class="n">{f["entering"]:,}</td>'
                    f'<td class="n">{sum(f["dropped"].values()):,}</td><td class="n">{f["leaving"]:,}</td>'
                    f'<td>{drops}</td></tr>')
    return ('<table class="funnel"><thead><tr><th>phase</th><th>stage</th><th>entering</th><th>dropped</th>'
            '<th>leaving</th><th>drop reasons</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def kv_table(rows: list[tuple], header: tuple | None = None, cls: str = "kv") -> str:
    head = "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def render(report: dict) -> str:
    """The page for ``report`` (as jobs/report.py builds it)."""
    banner = ""
    if report["random_weights"]:
        names = ", ".join(report["random_weights"])
        banner = (f'<div class="banner" id="random-weights">RANDOM WEIGHTS: {esc(names)}. Their scores, '
                  f'captions and drops are meaningless; this run only shows the pipeline working.</div>')
    s = report["summary"]
    headline = kv_table([(k, v) for k, v in s.items()], cls="kv summary")
    grids = "".join(grid_html(g) for g in report["grids"])
    unshown = report.get("grids_not_shown") or []
    if unshown:
        grids += ("<p>Reasons without a grid (past report.max_grids): " +
                  ", ".join(f"{esc(k)} ({n:,})" for k, n in unshown) + "</p>")
    hist_divs = "".join(f'<div class="plot hist" id="hist-{esc(h["column"])}"></div>' for h in report["histograms"]) \
        or "<p>No score column in this run (no model stage ran).</p>"
    explorer = report.get("explorer")
    if explorer:
        explorer_html = (
            f'<p>{explorer["n"]:,} image embeddings (a seeded sample of {explorer["population"]:,} with one) in '
            f'hierarchical clusters (Ward linkage), drawn as a treemap after DendroMap: a cell is a cluster, its '
            f'area the samples in it, its colour the share finally kept; click a cell to zoom in, the bar above to '
            f'zoom out. Thumbnails are the samples nearest each cluster\'s mean.</p>'
            '<div class="treemap-wrap"><div class="plot" id="treemap"></div><div id="treemap-thumbs"></div></div>'
            '<div id="cell-detail"></div>')
    else:
        explorer_html = f'<p id="no-explorer">{esc(report.get("explorer_note") or "No image embeddings in this run.")}</p>'
    search = report.get("search")
    search_html = ""
    if search:
        search_html = (f'<p id="search-link">This snapshot has kNN indices ({esc(", ".join(search["columns"]))}). '
                       f'Start its search page with <code>{esc(search["command"])}</code> and open '
                       f'<a href="{esc(search["url"])}">{esc(search["url"])}</a>.</p>')
    stats = report.get("stats") or []
    stats_html = (kv_table([(r["operator"], f'{r["wall_s"]:.2f}', f'{r["cpu_s"]:.2f}', f'{r["rows_in"]:,}',
                             f'{r["rows_out"]:,}', f'{r["rows_per_s"]:.1f}') for r in stats],
                           ("Ray Data operator", "wall s", "CPU s (tasks)", "rows in", "rows out", "rows/s"),
                           cls="stats")
                  if stats else "<p>This run's manifest has no Ray Data operator stats (an older run).</p>")
    timings = kv_table([(k, v) for k, v in (report.get("timings") or {}).items()], cls="kv")
    models = kv_table([(name, m.get("model"), "RANDOM WEIGHTS" if m.get("random_weights") else m.get("pretrained"))
                       for name, m in (report.get("models") or {}).items()], ("stage", "model", "weights"))
    versions = kv_table(sorted((report.get("versions") or {}).items()), ("package", "version"))
    config = esc(json.dumps(report.get("config") or {}, indent=2, sort_keys=True))
    data = {k: report[k] for k in ("funnel", "histograms", "stats", "explorer", "name") if k in report}
    return TEMPLATE.format(
        title=esc(f"imgcurate report: {report['name']}"), css=_asset("report.css"), banner=banner,
        name=esc(report["name"]), output=esc(report["output"]), generated=esc(report["generated"]),
        headline=headline, funnel_table=funnel_table(report["funnel"]), hist_divs=hist_divs, grids=grids,
        explorer=explorer_html, search=search_html, stats=stats_html, timings=timings, models=models,
        versions=versions, config=config, data=_json_for_script(data), plotly=plotly_gz_b64(),
        plotly_version=esc(plotly_version()), js=_asset("report.js"))


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body>
{banner}
<header><h1>imgcurate report: {name}</h1><p class="meta">{output} &middot; generated {generated}</p>
<nav><a href="#funnel">funnel</a> <a href="#scores">scores</a> <a href="#grids">images</a>
<a href="#explorer">explorer</a> <a href="#timing">time</a> <a href="#config">config</a></nav></header>
<div id="status" class="status">Drawing the plots&hellip;</div>
<section id="summary">{headline}{search}</section>
<section id="funnel"><h2>Funnel</h2><p>Samples entering and leaving each stage, phase 2's steps included; the
coloured parts of a bar are what the stage dropped, by reason.</p><div class="plot" id="funnel-plot"></div>
{funnel_table}</section>
<section id="scores"><h2>Scores</h2><p>Every score column, finally kept and dropped samples stacked; dashed lines are
the configured thresholds and the cuts phase 2 found.</p>{hist_divs}</section>
<section id="grids"><h2>Images</h2><p>A seeded uniform sample of the kept samples and of each drop reason (hover for
captions, scores and reason).</p>{grids}</section>
<section id="explorer"><h2>Embedding explorer</h2>{explorer}</section>
<section id="timing"><h2>Throughput and time</h2><div class="plot" id="stats-plot"></div>{stats}
<h3>Phases</h3>{timings}</section>
<section id="config"><h2>Models, versions, config</h2>{models}{versions}
<details><summary>config</summary><pre>{config}</pre></details>
<p class="meta">Plots: Plotly {plotly_version}, inlined.</p></section>
<script type="application/json" id="report-data">{data}</script>
<script type="application/octet-stream" id="plotly-gz">{plotly}</script>
<script>{js}</script>
</body></html>
"""
