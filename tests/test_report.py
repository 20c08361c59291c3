"""The run report: its parts without a browser, then the page of a real dry run in headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import report as job_report
from operators.base import KEPT, outcome_key
from operators.report.collect import (ScanSpec, display_histogram, rank_threshold, sample_ranks,
                                      scan, thumbnail_jpeg)
from operators.report.config import ReportConfig
from operators.report.explorer import cluster_tree, walk
from operators.selection import high_histogram
from operators.sinks import SinkConfig, SinkPrep, dropped_thumbnails
from tests.report_helpers import console_errors, screenshot, wait_for, write_run

MB = 1_000_000


# --- parts ------------------------------------------------------------------------------------------
def test_ranks_are_seeded_and_stable():
    ids = [f"{i:032x}" for i in range(1000)]
    a, b, c = sample_ranks(ids, 0), sample_ranks(list(reversed(ids)), 0), sample_ranks(ids, 1)
    assert np.array_equal(a, b[::-1])
    assert not np.array_equal(a, c)
    assert len(set(a.tolist())) == 1000
    # roughly uniform: each quarter of the range holds about a quarter of the ids
    quarters = np.bincount((a >> np.uint64(62)).astype(np.int64), minlength=4)
    assert quarters.min() > 180


def test_group_samples_do_not_depend_on_how_the_run_is_split(tmp_path):
    """A group's sample is the run's k smallest ranks: the same rows from 1 file or from 7."""
    one = write_run(tmp_path / "one", 700, files=1, embeddings=False)
    many = write_run(tmp_path / "many", 700, files=7, embeddings=False)
    picks = []
    for m in (one, many):
        outcomes = m["outcomes"]
        spec = ScanSpec(score_columns=["clip_score"], default_k=5, embedding_k=0, embedding_threshold=0, seed=3,
                        groups={k: (5, rank_threshold(5, n)) for k, n in outcomes.items()})
        s = scan(m["data_files"], spec, use_ray=False)
        assert s.rows == 700 and s.outcomes == outcomes
        picks.append({k: [r["sample_id"] for r in rows] for k, rows in s.groups.items()})
    assert picks[0] == picks[1]
    # and they are the k smallest ranks of each group, over every row
    table = pa.concat_tables([pq.read_table(f, columns=["sample_id", "status", "drop_stage", "drop_reason"])
                              for f in one["data_files"]])
    ids = table.column("sample_id").to_pylist()
    ranks = sample_ranks(ids, 3)
    keys = [outcome_key(*r) for r in zip(*(table.column(c).to_pylist() for c in ("status", "drop_stage", "drop_reason")))]
    for key, got in picks[0].items():
        members = sorted((int(r), i) for i, (r, k) in enumerate(zip(ranks, keys)) if k == key)
        assert got == [ids[i] for _, i in members[:5]], key


def test_display_histogram_keeps_every_value_in_its_bin():
    rng = np.random.default_rng(0)
    kept, dropped = rng.normal(0.3, 0.05, 5000).astype(np.float32), rng.uniform(-0.2, 0.28, 3000).astype(np.float32)
    h = display_histogram({"kept": high_histogram(kept), "dropped": high_histogram(dropped)}, bins=40)
    assert sum(h["counts"]["kept"]) == 5000 and sum(h["counts"]["dropped"]) == 3000
    edges = np.array(h["edges"])
    assert edges[0] <= min(kept.min(), dropped.min()) + 1e-2 and edges[-1] >= max(kept.max(), dropped.max()) - 1e-2
    # the coarse binning moves a value at most one bin from numpy's exact histogram on the same edges
    exact, _ = np.histogram(np.clip(kept, edges[0], edges[-1]), bins=edges)
    assert np.abs(np.cumsum(exact) - np.cumsum(h["counts"]["kept"])).max() <= 0.02 * 5000
    assert display_histogram({"kept": high_histogram(np.array([], np.float32))}) is None


def test_cluster_tree_partitions_and_finds_planted_clusters():
    rng = np.random.default_rng(1)
    centres = np.eye(8)[:4] * 10
    labels = rng.integers(0, 4, 600)
    x = centres[labels] + rng.normal(scale=0.5, size=(600, 8))
    root = cluster_tree(x, branching=4, leaf_size=40, reps=3)
    for cell in walk(root):
        assert set(cell.reps) <= set(cell.members.tolist()) and 1 <= len(cell.reps) <= 3
        if cell.children:
            assert sorted(np.concatenate([c.members for c in cell.children]).tolist()) == cell.members.tolist()
        else:
            assert len(cell.members) <= 40
    assert sorted(root.members.tolist()) == list(range(600))
    # the root's four children are the four planted clusters
    assert len(root.children) == 4
    assert sorted(len(set(labels[c.members].tolist())) for c in root.children) == [1, 1, 1, 1]


def test_cluster_tree_of_equal_embeddings_is_deep_but_whole():
    """Equal vectors make a chain of zero-height merges: the tree is built without recursion."""
    x = np.ones((3000, 8)) + np.random.default_rng(3).normal(scale=1e-9, size=(3000, 8))
    root = cluster_tree(x, branching=2, leaf_size=2, reps=1)
    cells = list(walk(root))
    assert sum(len(c.members) for c in cells if not c.children) == 3000
    assert all(c.reps for c in cells)


def test_representatives_prefer_samples_with_a_picture():
    x = np.random.default_rng(2).normal(size=(50, 4))
    has = np.zeros(50, dtype=bool)
    has[[3, 17, 40]] = True
    root = cluster_tree(x, branching=3, leaf_size=100, reps=2, has_picture=has)
    assert set(root.reps) <= {3, 17, 40}


def _sink_batch(n: int, images: list[bytes]):
    status = ["kept" if i % 3 == 0 else "dropped" for i in range(n)]
    return pa.table({
        "sample_id": [f"{i:032x}" for i in range(n)], "status": status,
        "drop_stage": [None if s == "kept" else "clip" for s in status],
        "drop_reason": [None if s == "kept" else ("clip_below_0.28" if i % 2 else "aesthetic_below_5") for i, s in
                        enumerate(status)],
        "error_message": pa.nulls(n, pa.string()),
        "image": pa.array([images[i % len(images)] if i % 5 else None for i in range(n)], pa.binary()),
    })


def test_sink_keeps_thumbnails_of_the_smallest_ranks_per_reason():
    from tests.report_helpers import _jpegs

    batch = _sink_batch(90, _jpegs(4, px=200))
    out = SinkPrep(SinkConfig(thumbnails_per_reason=4, seed=5))(batch)
    thumbs = out.column("thumbnail").to_pylist()
    for i, (st, r, img, t) in enumerate(zip(batch.column("status").to_pylist(), batch.column("drop_reason").to_pylist(),
                                            batch.column("image").to_pylist(), thumbs)):
        if st == "kept" or img is None:
            assert t is None
    ranks = sample_ranks(batch.column("sample_id").to_pylist(), 5)
    for reason in ("clip_below_0.28", "aesthetic_below_5"):
        eligible = [i for i in range(90) if batch.column("drop_reason")[i].as_py() == reason
                    and batch.column("image")[i].as_py() is not None]
        smallest = sorted(eligible, key=lambda i: ranks[i])[:4]
        assert sorted(i for i in eligible if thumbs[i] is not None) == sorted(smallest)
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(next(t for t in thumbs if t)))
    assert max(im.size) <= 128
    kept_with_bytes = [i for i in range(90) if i % 3 == 0 and i % 5]
    assert out.column("image").null_count == 90 - len(kept_with_bytes)  # only kept rows keep their bytes
    assert SinkPrep()(batch).column_names == batch.column_names  # off: no column added
    assert dropped_thumbnails(batch.drop_columns(["image"]), 4, 0).null_count == 90


def test_thumbnail_of_a_broken_image_is_none():
    assert thumbnail_jpeg(b"not an image", 64) is None


def test_funnel_of_a_manifest_adds_up():
    m = {"samples": 100, "outcomes": {"kept": 60, "failed/plan/missing_url": 2, "failed/download/http_404": 20,
                                      "dropped/clip/clip_below_0.28": 15, "failed/mystery/x": 3},
         "config": {"clip": {"enabled": True}, "safety": {"enabled": False}},
         "phase2": {"dedup.exact": {"order": 1, "stage": "dedup", "entering": 60, "dropped": 5, "kept": 55,
                                    "reasons": {"exact_duplicate": 5}},
                    "selection.clip_top_fraction": {"order": 2, "stage": "selection", "entering": 55, "dropped": 27,
                                                    "kept": 28, "reasons": {"clip_score_not_top_0.5": 27}}}}
    rows = job_report.funnel(m)
    assert [r["stage"] for r in rows] == ["plan", "download", "image", "clip", "mystery", "dedup.exact",
                                          "selection.clip_top_fraction"]
    assert [(r["entering"], r["leaving"]) for r in rows] == [(100, 98), (98, 78), (78, 78), (78, 63), (63, 60),
                                                            (60, 55), (55, 28)]
    assert rows[-1]["dropped"] == {"dropped/selection/clip_score_not_top_0.5": 27}


def test_thresholds_come_from_config_and_phase2():
    m = {"config": {"clip": {"enabled": True, "min_score": 0.28}, "safety": {"enabled": True, "nsfw": {"max_punsafe": 0.5},
                                                                           "aesthetic": None},
                    "reward": {"enabled": False, "min_reward": 1.0}},
         "phase2": {"selection.reward_top_fraction": {"column": "reward", "threshold": 0.7}}}
    t = job_report.thresholds(m)
    assert t["clip_score"] == [{"value": 0.28, "label": "clip.min_score"}]
    assert t["punsafe"] == [{"value": 0.5, "label": "safety.nsfw.max_punsafe"}]
    assert t["reward"] == [{"value": 0.7, "label": "selection.reward_top_fraction cut"}]  # min_reward: stage off
    assert "aesthetic" not in t


def test_report_cli_refuses_a_bad_setting_and_an_unfinished_run(tmp_path, capsys):
    from jobs.cli import main

    write_run(tmp_path / "run", 50, files=1)
    assert main(["report", str(tmp_path / "run"), "--set", "kept_per_grid=-1"]) == 2
    assert "kept_per_grid" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "_manifest.json" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 0


def test_report_size_is_bounded_for_100k_samples(tmp_path):
    small = write_run(tmp_path / "small", 300, files=2)
    big = write_run(tmp_path / "big", 100_000, files=20, seed=1)
    sizes = {}
    for name, m in (("small", small), ("big", big)):
        out = str(tmp_path / name)
        path, size = job_report.write_report(out, use_ray=False)
        page = Path(path).read_text()
        sizes[name] = size
        assert page.count('class="grid"') == len(m["outcomes"])
    print(f"report size: {sizes['small'] / MB:.2f} MB for 300 generated samples, "
          f"{sizes['big'] / MB:.2f} MB for 100,000")
    assert sizes["big"] < 5 * MB
    assert sizes["big"] < sizes["small"] + 1.5 * MB  # what grows with the run is bounded


# --- in a browser -------------------------------------------------------------------------------------
def _open(driver, path: str) -> dict:
    console_errors(driver)  # drop what an earlier page left
    driver.get(Path(path).resolve().as_uri())
    wait_for(driver, "window.__report && (window.__report.ready || window.__report.errors.length)")
    state = driver.execute_script("return window.__report")
    assert not state["errors"], state["errors"]
    return state


def _grids_claim_what_they_show(driver) -> int:
    grids = driver.execute_script("""return Array.from(document.querySelectorAll('.grid')).map(g => ({
        key: g.dataset.key, shown: +g.dataset.shown, images: +g.dataset.images, total: +g.dataset.total,
        header: g.querySelector('h3 .count').textContent,
        figures: g.querySelectorAll('figure.thumb').length,
        loaded: Array.from(g.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth > 0).length,
        imgs: g.querySelectorAll('img').length}))""")
    for g in grids:
        assert g["figures"] == g["shown"] == int(g["header"].split(" of ")[0]), g
        assert g["imgs"] == g["images"] == g["loaded"], g  # every thumbnail it counts is there and decodes
        assert g["shown"] <= g["total"]
    return len(grids)


@pytest.fixture(scope="module")
def dry_run(ray_session, tmp_path_factory):
    from jobs.dryrun import run_dryrun

    work = tmp_path_factory.mktemp("dryrun")
    # small leaves: the explorer's tree of this small run has cells with children to zoom into; a CLIP
    # threshold on the tiny random model drops some decoded samples, whose thumbnails the sink keeps
    manifest, out = run_dryrun(str(work), overrides=["report.explorer_leaf_size=8", "clip.min_score=0.1"],
                               n_good=60)
    return manifest, out


def test_dry_run_report_in_chromium(dry_run, chromium):
    manifest, out = dry_run
    assert manifest["report"]["path"] == out + "/report.html"
    size = Path(out, "report.html").stat().st_size
    print(f"dry run report: {size / MB:.2f} MB ({manifest['samples']} samples)")
    state = _open(chromium, out + "/report.html")
    assert not console_errors(chromium)
    # the funnel's numbers are the manifest's
    rows = chromium.execute_script("""return Array.from(document.querySelectorAll('table.funnel tbody tr')).map(
        r => ({stage: r.dataset.stage, entering: +r.dataset.entering, dropped: +r.dataset.dropped,
               leaving: +r.dataset.leaving}))""")
    by_stage: dict[str, int] = {}
    for key, n in manifest["outcomes"].items():
        if key != KEPT:
            by_stage[key.split("/")[1]] = by_stage.get(key.split("/")[1], 0) + n
    phase1 = [r for r in rows if r["stage"] not in manifest["phase2"]]
    assert phase1[0]["stage"] == "plan" and phase1[0]["entering"] == manifest["samples"]
    for r in phase1:
        assert r["dropped"] == by_stage.get(r["stage"], 0) and r["leaving"] == r["entering"] - r["dropped"]
    assert phase1[-1]["leaving"] == manifest["kept"]
    assert {s for s in by_stage} <= {r["stage"] for r in phase1}
    phase2 = [r for r in rows if r["stage"] in manifest["phase2"]]
    assert [r["stage"] for r in phase2] == manifest["final"]["order"]
    for r in phase2:
        step = manifest["phase2"][r["stage"]]
        assert (r["entering"], r["dropped"], r["leaving"]) == (step["entering"], step["dropped"], step["kept"])
    assert phase2[-1]["leaving"] == manifest["final"]["kept"]
    # the plotted funnel has the same numbers as the table
    plotted = chromium.execute_script("""const gd = document.getElementById('funnel-plot');
        return gd.data.map(t => ({name: t.name, x: t.x}))""")
    assert plotted[0]["name"] == "continues" and plotted[0]["x"] == [r["leaving"] for r in rows]
    assert [sum(t["x"][i] for t in plotted[1:]) for i in range(len(rows))] == [r["dropped"] for r in rows]
    # a random-weights banner, histograms of the score columns, grids that show what they claim
    assert chromium.find_element("id", "random-weights").is_displayed()
    hists = chromium.execute_script("return Array.from(document.querySelectorAll('.hist')).map(d => d.id)")
    assert {"hist-clip_score", "hist-reward", "hist-punsafe", "hist-aesthetic"} <= set(hists)
    assert _grids_claim_what_they_show(chromium) >= 5
    # samples dropped in phase 1 after decoding are shown with their picture (the sink's thumbnails)
    clip_drop = "dropped/clip/clip_below_0.1"
    assert manifest["outcomes"].get(clip_drop, 0) > 0, manifest["outcomes"]
    grid = chromium.execute_script(f"return document.querySelector('.grid[data-key=\"{clip_drop}\"]').dataset")
    assert int(grid["shown"]) == min(12, manifest["final"]["outcomes"][clip_drop]) == int(grid["images"])
    # and the threshold is drawn on the clip_score histogram
    shapes = chromium.execute_script("return document.getElementById('hist-clip_score').layout.shapes.map(s => s.x0)")
    assert shapes == [0.1]
    # the treemap: cells with thumbnails; a click on a cell zooms into it
    assert state["overlays"] > 0
    explorer = chromium.execute_script("return JSON.parse(document.getElementById('report-data').textContent).explorer")
    with_children = {p for p in explorer["parents"] if p and p != "root"}
    assert with_children, explorer["parents"]
    cell = chromium.execute_script("""return Array.from(document.querySelectorAll('#treemap g.slice'))
        .map(g => g.__data__.data.data.id).find(id => arguments[0].includes(id))""", sorted(with_children))
    assert cell is not None
    target = chromium.execute_script(f"""return Array.from(document.querySelectorAll('#treemap g.slice'))
        .find(g => g.__data__.data.data.id === '{cell}').querySelector('path.surface')""")
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(chromium).move_to_element(target).click().perform()
    wait_for(chromium, f"window.__report.treemapRoot === '{cell}'", timeout=20)
    wait_for(chromium, f"document.getElementById('cell-detail').dataset.cell === '{cell}'", timeout=20)
    level = wait_for(chromium, "document.getElementById('treemap')._fullData[0].level", timeout=20)
    assert level == cell  # Plotly itself zoomed to the cell
    shot = screenshot(chromium, "report-dry-run.png")
    assert shot.stat().st_size > 10_000
    assert not console_errors(chromium)


def test_reports_without_embeddings_or_drops_render(tmp_path, chromium):
    for name, kw in (("no-embeddings", {"embeddings": False}), ("no-drops", {"drops": False})):
        m = write_run(tmp_path / name, 120, files=2, **kw)
        path, _ = job_report.write_report(str(tmp_path / name), cfg=ReportConfig(), use_ray=False)
        _open(chromium, path)
        assert not console_errors(chromium)
        assert _grids_claim_what_they_show(chromium) == len(m["outcomes"])
        has_tree = chromium.execute_script("return !!document.getElementById('treemap')")
        assert has_tree == kw.get("embeddings", True)
        if not has_tree:
            assert "No image embeddings" in chromium.find_element("id", "no-explorer").text
        screenshot(chromium, f"report-{name}.png", full_height=False)


def test_report_embeds_no_network_address(dry_run):
    """Self-contained: no script, style or image is loaded from anywhere (only links to follow)."""
    page = Path(dry_run[1], "report.html").read_text()
    assert not re.search(r"""<(script|img|link)[^>]+(src|href)=["']?(https?:)?//""", page)
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page,
                                re.S).group(1))
    assert data["funnel"][0]["stage"] == "plan"
