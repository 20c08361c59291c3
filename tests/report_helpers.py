"""Generated run outputs for the report's tests, and a headless Chromium to open pages in.

``write_run`` writes what a finished run leaves (data files through the real sink, the manifest)
for any number of samples without downloading anything: the 100k-sample size test and the
renders without embeddings or without drops use it. ``chromium`` drives Debian's chromium with
its chromedriver through Selenium (no browser download), on local files or 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.sinks import SinkConfig, sink_prep

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _jpegs(n: int, px: int = 48) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(7)
    out = []
    for _ in range(n):
        a = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        im = Image.fromarray(a).resize((px, px), Image.NEAREST)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
        out.append(buf.getvalue())
    return out


# (status, stage, reason, share) of the generated outcomes; the rest is kept.
DROPS = [("failed", "plan", "missing_url", 0.01), ("failed", "download", "http_404", 0.08),
         ("dropped", "download", "robots_noai", 0.01), ("failed", "image", "decode_error", 0.02),
         ("dropped", "clip", "clip_below_0.28", 0.25)]


def write_run(out: Path, n: int, files: int = 4, embeddings: bool = True, drops: bool = True, seed: int = 0,
              dim: int = 32) -> dict:
    """A finished run of ``n`` generated samples under ``out``: data files as the sink writes them
    (image bytes on kept rows, thumbnails on a few rows dropped after decoding), and ``_manifest.json``."""
    rng = np.random.default_rng(seed)
    images = _jpegs(32)
    ids = [hashlib.blake2b(f"u{seed}-{i}".encode(), digest_size=16).hexdigest() for i in range(n)]
    status = np.array(["kept"] * n, dtype=object)
    stage = np.array([None] * n, dtype=object)
    reason = np.array([None] * n, dtype=object)
    if drops:
        u = rng.random(n)
        lo = 0.0
        for st, sg, rs, share in DROPS:
            sel = (u >= lo) & (u < lo + share)
            status[sel], stage[sel], reason[sel] = st, sg, rs
            lo += share
    decoded = np.array([s == "kept" or g == "clip" for s, g in zip(status, stage)])
    clip = np.where(decoded, rng.normal(0.3, 0.05, n), np.nan).astype(np.float32)
    if drops:
        clip[stage == "clip"] = rng.uniform(0.1, 0.28, int((stage == "clip").sum()))
    centres = rng.normal(size=(6, dim))
    emb = centres[rng.integers(0, 6, n)] + 0.3 * rng.normal(size=(n, dim))
    data_dir = out / "data" / "wave=00000"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths, outcomes = [], {}
    for f, part in enumerate(np.array_split(np.arange(n), files)):
        k = len(part)
        cols = {
            "sample_id": pa.array([ids[i] for i in part], pa.string()),
            "status": pa.array(status[part].tolist(), pa.string()),
            "drop_stage": pa.array(stage[part].tolist(), pa.string()),
            "drop_reason": pa.array(reason[part].tolist(), pa.string()),
            "error_message": pa.array([None if s == "kept" else "generated" for s in status[part]], pa.string()),
            "url": pa.array([f"http://127.0.0.1:9/img/{i}.jpg" for i in part], pa.string()),
            "captions": pa.array([[f"a generated picture {i}", "alt text <b>&amp;</b>"] for i in part],
                                 pa.list_(pa.string())),
            "caption_sources": pa.array([["caption", "title"]] * k, pa.list_(pa.string())),
            "image": pa.array([images[i % len(images)] if decoded[i] else None for i in part], pa.binary()),
            "clip_score": pa.array([None if np.isnan(v) else float(v) for v in clip[part]], pa.float32()),
        }
        if embeddings:
            flat = pa.array(emb[part].astype(np.float16).ravel(), pa.float16())
            cols["clip_image_embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim,
                                                                             mask=pa.array(~decoded[part]))
        table = sink_prep(pa.table(cols), SinkConfig(thumbnails_per_reason=12))
        path = data_dir / f"part-{f:05d}.parquet"
        pq.write_table(table, path)
        paths.append(str(path))
    for s, g, r in zip(status, stage, reason):
        key = "kept" if s == "kept" else f"{s}/{g}/{r}"
        outcomes[key] = outcomes.get(key, 0) + 1
    kept = outcomes.get("kept", 0)
    manifest = {
        "name": f"generated-{n}", "input_rows": n, "samples": n, "outcomes": dict(sorted(outcomes.items())),
        "kept": kept, "data_files": paths, "phase2": {},
        "final": {"kept": kept, "outcomes": dict(sorted(outcomes.items())), "sidecars": None, "order": []},
        "config": {"clip": {"enabled": True, "min_score": 0.28}, "safety": {"enabled": False},
                   "reward": {"enabled": False}, "recaption": {"enabled": False}},
        "models": {"clip": {"model": "generated", "pretrained": None, "random_weights": True}},
        "versions": {"python": "3"}, "timings": {"plan_s": 1.0, "phase1_s": 2.0, "total_s": 3.0},
        "waves": [{"wave": 0, "samples": n, "seconds": 2.0, "files": paths,
                   "stats": [{"operator": "ReadSampleShards->MapBatches(HttpDownloader)", "wall_s": 1.5, "cpu_s": 1.0,
                              "tasks": 4, "rows_in": 0, "rows_out": n}]}],
        "throughput_samples_per_s": n / 2.0,
    }
    (out / "_manifest.json").write_text(json.dumps(manifest))
    return manifest


# --- the browser ----------------------------------------------------------------------------------------
def chromium_available() -> bool:
    return shutil.which(CHROMIUM) is not None and shutil.which(CHROMEDRIVER) is not None


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """A headless Chromium (Debian's, through its chromedriver). CI installs both (.ci/run); elsewhere
    the browser tests skip without them."""
    if not chromium_available():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install chromium chromium-driver)")
        pytest.skip("no chromium / chromedriver (apt-get install chromium chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1300,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def console_errors(driver) -> list[dict]:
    """The browser console's errors since the last call (Chromium's SEVERE entries)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def wait_for(driver, script: str, timeout: float = 60.0):
    """Wait until ``script`` (a JavaScript expression) is truthy; returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: d.execute_script(f"return {script};"))


def screenshot(driver, name: str, full_height: bool = True) -> Path:
    """A PNG of the page under test-artifacts/ (kept after the run, for people to look at)."""
    ARTIFACTS.mkdir(exist_ok=True)
    if full_height:
        h = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1300, min(int(h) + 100, 12000))
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    driver.set_window_size(1300, 1000)
    return path
