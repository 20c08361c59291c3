"""``imgcurate report RUN_OUTPUT [-o report.html]``: the run report, one self-contained HTML file.

Written at the end of every run next to ``_manifest.json`` (``report:`` in the job config), or
again at any time from a finished output, local or ``s3://``. It shows the funnel (every stage's
entering and leaving samples, drop reasons stacked), histograms of every score column with the
thresholds, image grids per outcome (seeded uniform samples), an embedding explorer (DendroMap's
treemap over hierarchical clusters), Ray Data's per-operator time and throughput, the config and
the models, with a banner when any model had random weights. The data comes from the manifest and
one bounded pass over the data files (operators/report/collect.py); nothing in the page is fetched.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from jobs.stages import PHASE2, PLAN_STAGE, STAGES
from operators.base import KEPT
from operators.report.collect import (EMBEDDING, ScanSpec, display_histogram, rank_threshold, scan,
                                      score_columns, thumbnails)
from operators.report.config import ReportConfig
from operators.report.explorer import cluster_tree, walk
from operators.report.html import hover_text, render
from operators.storage import StorageConfig, arrow_fs, join, qualify, read_json, write_bytes_atomic

log = logging.getLogger(__name__)
REPORT_NAME = "report.html"
PHASE_NAMES = {0: "plan", 1: "phase 1", 2: "phase 2"}
# Score column -> the config keys of its thresholds (phase 1's filters), in the manifest's config.
THRESHOLD_KEYS = {
    "clip_score": ["clip.min_score"],
    "punsafe": ["safety.nsfw.max_punsafe"],
    "aesthetic": ["safety.aesthetic.min_aesthetic"],
    "pwatermark": ["safety.watermark.max_pwatermark"],
    "rigid_similarity": ["safety.rigid.min_similarity"],
    "reward": ["reward.min_reward"],
}


def _get(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def phase1_stages(config: dict) -> list[str]:
    """``drop_stage`` names of phase 1 in pipeline order: the plan, then the stages that ran."""
    out = [PLAN_STAGE]
    for s in STAGES:
        if s.runs_in == PHASE2:
            continue
        if s.always or _get(config, f"{s.section}.enabled"):
            out.append(s.drop_stage())
    return out


def funnel(manifest: dict) -> list[dict]:
    """Per stage, in order: samples entering, dropped by outcome key, leaving. Phase 1 from the
    manifest's ``outcomes`` (each sample's phase-1 status), phase 2 from its step reports."""
    by_stage: dict[str, dict[str, int]] = {}
    for key, n in manifest["outcomes"].items():
        if key != KEPT:
            by_stage.setdefault(key.split("/", 2)[1], {})[key] = n
    order = phase1_stages(manifest.get("config") or {})
    order += [s for s in by_stage if s not in order]  # a stage this code does not know: still counted
    rows, entering = [], manifest["samples"]
    for stage in order:
        drops = by_stage.get(stage, {})
        leaving = entering - sum(drops.values())
        rows.append({"phase": 0 if stage == PLAN_STAGE else 1, "stage": stage, "entering": entering,
                     "dropped": drops, "leaving": leaving})
        entering = leaving
    steps = sorted((manifest.get("phase2") or {}).items(), key=lambda kv: kv[1].get("order", 0))
    final_outcomes = (manifest.get("final") or {}).get("outcomes") or {}
    for name, rep in steps:
        stage = rep.get("stage", name)
        if "reasons" in rep:
            drops = {f"dropped/{stage}/{r}": n for r, n in rep["reasons"].items() if n}
        elif sum(1 for _, r in steps if r.get("stage") == stage) == 1:  # older runs: the stage's final drops
            drops = {k: n for k, n in final_outcomes.items() if k.split("/", 2)[1:2] == [stage]}
        else:
            drops = {f"dropped/{stage}/(reason not recorded)": rep["dropped"]} if rep["dropped"] else {}
        rows.append({"phase": 2, "stage": name, "entering": rep["entering"], "dropped": drops, "leaving": rep["kept"]})
    for r in rows:
        r["phase_name"] = PHASE_NAMES[r["phase"]]
    return rows


def thresholds(manifest: dict) -> dict[str, list[dict]]:
    """Score column -> the thresholds to draw: phase 1's configured filters and phase 2's cuts."""
    config = manifest.get("config") or {}
    out: dict[str, list[dict]] = {}
    for column, keys in THRESHOLD_KEYS.items():
        if not _get(config, f"{keys[0].split('.')[0]}.enabled"):
            continue
        for key in keys:
            value = _get(config, key)
            if isinstance(value, (int, float)):
                out.setdefault(column, []).append({"value": float(value), "label": key})
    for name, rep in (manifest.get("phase2") or {}).items():
        if rep.get("column") and isinstance(rep.get("threshold"), (int, float)):
            out.setdefault(rep["column"], []).append({"value": float(rep["threshold"]), "label": f"{name} cut"})
    return out


def group_title(key: str) -> str:
    if key == KEPT:
        return "kept"
    status, stage, reason = key.split("/", 2)
    return f"{status} at {stage}: {reason}"


def random_weight_models(manifest: dict) -> list[str]:
    return [name for name, m in (manifest.get("models") or {}).items() if m.get("random_weights")]


def operator_stats(manifest: dict) -> list[dict]:
    """Ray Data's per-operator figures of phase 1, summed over the waves that recorded them."""
    total: dict[str, dict] = {}
    for wave in manifest.get("waves") or []:
        for s in wave.get("stats") or []:
            t = total.setdefault(s["operator"], {"operator": s["operator"], "wall_s": 0.0, "cpu_s": 0.0,
                                                 "rows_in": 0, "rows_out": 0})
            for k in ("wall_s", "cpu_s", "rows_in", "rows_out"):
                t[k] += s.get(k) or 0
    for t in total.values():  # rows an operator took in (a read: gave out) per second of its wall time
        rows = t["rows_in"] or t["rows_out"]
        t["rows_per_s"] = rows / t["wall_s"] if t["wall_s"] > 0 else 0.0
    return list(total.values())


def build(output: str, storage: StorageConfig | None = None, cfg: ReportConfig | None = None,
          use_ray: bool | None = None) -> dict:
    """Everything the page shows, from ``output``'s manifest and one bounded pass over its files."""
    cfg = cfg or ReportConfig()
    manifest = read_json(join(output, "_manifest.json"), storage)
    if manifest is None:
        raise FileNotFoundError(f"{output} has no _manifest.json: the run has not finished (a report reads only "
                                f"committed runs)")
    files = qualify(manifest.get("data_files") or [], output)
    final = manifest.get("final") or {}
    outcomes = final.get("outcomes") or manifest["outcomes"]
    dropped_keys = sorted((k for k in outcomes if k != KEPT), key=lambda k: -outcomes[k])
    shown = dropped_keys[:cfg.max_grids]
    groups = {KEPT: (cfg.kept_per_grid, rank_threshold(cfg.kept_per_grid, outcomes.get(KEPT, 0)))}
    groups.update({k: (cfg.dropped_per_grid, rank_threshold(cfg.dropped_per_grid, outcomes[k])) for k in shown})
    groups.update({k: (0, 0) for k in dropped_keys[cfg.max_grids:]})
    fun = funnel(manifest)
    reached_clip = next((f["entering"] for f in fun if f["stage"] == "clip"), 0)
    schema_cols: list[str] = []
    if files:
        fs, p = arrow_fs(files[0], storage)
        import pyarrow.parquet as pq

        schema_cols = score_columns(pq.read_schema(fs.open_input_file(p)))
    spec = ScanSpec(score_columns=schema_cols, groups=groups, default_k=cfg.dropped_per_grid,
                    embedding_k=cfg.explorer_sample, embedding_threshold=rank_threshold(cfg.explorer_sample, reached_clip),
                    seed=cfg.seed, sidecar_dir=final.get("sidecars"), storage=storage)
    t0 = time.time()
    summary = scan(files, spec, use_ray=use_ray)
    log.info("report: scanned %d files (%d rows) in %.1fs", len(files), summary.rows, time.time() - t0)
    if summary.rows != manifest["samples"]:
        log.warning("report: the data files hold %d rows, the manifest %d samples", summary.rows, manifest["samples"])
    marks = thresholds(manifest)
    histograms = []
    for col in schema_cols:
        h = display_histogram(summary.hist.get(col, {}), cfg.histogram_bins) if col in summary.hist else None
        if h is not None:
            histograms.append({"column": col, **h, "thresholds": marks.get(col, [])})
    # The explorer: cluster the embedding sample, then thumbnails for the grids and the cells' representatives.
    explorer, explorer_note, tree, emb_rows = None, None, None, summary.embeddings
    if len(emb_rows) >= 2:
        has_pic = np.array([bool(r["image"]) for r in emb_rows])
        tree = cluster_tree(np.stack([r["embedding"] for r in emb_rows]), cfg.explorer_branching,
                            cfg.explorer_leaf_size, cfg.explorer_representatives, has_pic)
    elif cfg.explorer_sample == 0:
        explorer_note = "The explorer is off (report.explorer_sample: 0)."
    else:
        explorer_note = f"No image embeddings in this run ({EMBEDDING} is written by the CLIP stage)."
    grid_rows = [r for key in [KEPT, *shown] for r in summary.groups.get(key, [])]
    rep_rows = [emb_rows[i] for c in (walk(tree) if tree else []) for i in c.reps]
    thumbs = thumbnails(grid_rows + rep_rows, files, cfg.thumbnail_px, storage, cfg.thumbnail_quality)
    grids = []
    for key in [KEPT, *shown]:
        items = summary.groups.get(key, [])
        for r in items:
            r["thumb"] = thumbs.get((r["file"], r["row"]))
        grids.append({"key": key, "title": group_title(key), "total": outcomes.get(key, 0), "items": items})
    if tree is not None:
        explorer = explorer_data(tree, emb_rows, thumbs, reached_clip)
    snap = manifest.get("snapshot") or {}
    indices = [c for c, ix in (snap.get("indices") or {}).items() if "skipped" not in ix]
    search = None
    if indices and snap.get("path"):
        search = {"columns": indices, "command": f"imgcurate serve {snap['path']}", "url": "http://127.0.0.1:8080/"}
    timings = dict(manifest.get("timings") or {})
    summary_rows = {"input rows": manifest.get("input_rows"), "samples": manifest["samples"],
                    "kept after phase 1": manifest["outcomes"].get(KEPT, 0), "kept in the end": final.get("kept", manifest.get("kept")),
                    "phase-1 throughput (samples/s)": manifest.get("throughput_samples_per_s")}
    if snap:
        summary_rows["snapshot"] = f"v={snap.get('version')} at {snap.get('path')} ({snap.get('kept')} samples)"
    return {"name": manifest.get("name") or "run", "output": output,
            "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "summary": summary_rows, "random_weights": random_weight_models(manifest), "funnel": fun,
            "histograms": histograms, "grids": grids,
            "grids_not_shown": [(k, outcomes[k]) for k in dropped_keys[cfg.max_grids:]],
            "explorer": explorer, "explorer_note": explorer_note, "search": search,
            "stats": operator_stats(manifest), "timings": timings, "models": manifest.get("models"),
            "versions": manifest.get("versions"), "config": manifest.get("config")}


def explorer_data(tree, rows: list[dict], thumbs: dict, population: int) -> dict:
    """The treemap's arrays (Plotly ids/labels/parents/values), each cell's kept share and mix, and
    its representatives as indices into one pool of thumbnails."""
    pool: dict[tuple[int, int], int] = {}
    out = {"n": len(rows), "population": population, "ids": [], "labels": [], "parents": [], "values": [],
           "kept": [], "mix": [], "reps": {}, "thumbs": [], "thumb_info": []}
    for cell in walk(tree):
        members = [rows[i] for i in cell.members]
        kept = sum(1 for r in members if r["status"] == KEPT)
        mix: dict[str, int] = {}
        for r in members:
            if r["status"] != KEPT:
                k = f"{r['stage']}: {r['reason']}"
                mix[k] = mix.get(k, 0) + 1
        n = len(members)
        text = f"{n} samples, {kept} kept ({kept / n:.0%})" if n else "empty"
        if mix:
            text += "; dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(mix.items(), key=lambda kv: -kv[1]))
        out["ids"].append(cell.id)
        out["labels"].append(f"{n} · {kept / n:.0%} kept" if n else "empty")
        out["parents"].append(cell.parent)
        out["values"].append(n)
        out["kept"].append(round(kept / n, 4) if n else 0.0)
        out["mix"].append(text)
        reps = []
        for i in cell.reps:
            key = (rows[i]["file"], rows[i]["row"])
            if key not in thumbs:
                continue
            if key not in pool:
                pool[key] = len(out["thumbs"])
                out["thumbs"].append(thumbs[key])
                out["thumb_info"].append(hover_text(rows[i]))
            reps.append(pool[key])
        out["reps"][cell.id] = reps
    return out


def report_path(output: str, cfg: ReportConfig | None = None) -> str:
    return (cfg.path if cfg and cfg.path else None) or join(output, REPORT_NAME)


def write_report(output: str, storage: StorageConfig | None = None, cfg: ReportConfig | None = None,
                 path: str | None = None, use_ray: bool | None = None) -> tuple[str, int]:
    """Build the report of ``output`` and write it (one atomic write); returns (path, bytes)."""
    page = render(build(output, storage, cfg, use_ray=use_ray)).encode()
    path = path or report_path(output, cfg)
    write_bytes_atomic(path, page, storage)
    log.info("report: %s (%.2f MB)", path, len(page) / 1e6)
    return path, len(page)


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write the HTML report of a finished run (funnel, score histograms, image "
                                      "grids, embedding explorer, timings): one self-contained file")
    p.add_argument("output", help="the run's output.path (local or s3://): where _manifest.json is")
    p.add_argument("-o", "--out", default=None, help="where to write it (default: <output>/report.html)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a report setting, e.g. --set kept_per_grid=48 (the keys of report: in the job config)")


def run_cli(args: argparse.Namespace) -> int:
    from jobs.config import ConfigError, apply_override, _format_error
    from pydantic import ValidationError

    data: dict = {}
    for o in args.overrides:
        apply_override(data, o)
    try:
        cfg = ReportConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc).replace("invalid config", "invalid report setting")) from None
    storage = StorageConfig(endpoint_url=args.endpoint_url) if args.endpoint_url else None
    path, size = write_report(args.output, storage, cfg, path=args.out, use_ray=False)
    print(f"report: {path} ({size / 1e6:.2f} MB)")
    return 0
