"""The dry run: a local HTTP server serves the bundled sample; the job runs configs/dryrun.yaml.

Everything stays on 127.0.0.1. The sample (a few hundred generated images plus failing,
opt-out, corrupt, non-image, duplicate and oversized cases) is made by jobs/samples/data.py.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from jobs import curate
from jobs.config import CONFIG_DIR, load_config
from jobs.samples.data import build_dryrun_sample, images_dir
from jobs.samples.server import SampleServer

log = logging.getLogger(__name__)


def _target_folder(work: Path, n: int = 8) -> str:
    """The coreset's target set for the dry run: a folder with a few of the sample's good images."""
    target = work / "target"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    good = sorted(p for p in Path(images_dir(str(work))).rglob("*.jpg") if p.stat().st_size > 2000)[:n]
    for p in good:
        shutil.copy(p, target / p.name)
    return str(target)


def run_dryrun(work_dir: str = "imgcurate-dryrun", overrides: list[str] | None = None,
               n_good: int = 240) -> tuple[dict, str]:
    """Run the dry run; returns (run manifest, output path)."""
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((CONFIG_DIR / "dryrun.yaml").read_text())
    out = work / "output"
    if out.exists():  # the server's port changes between runs, so URLs (and ids) do too
        shutil.rmtree(out)
    with SampleServer(root_dir=images_dir(str(work))) as server:
        urls = build_dryrun_sample(str(work), server.base_url, n_good=n_good)
        data["input"]["paths"] = [urls]
        data["output"]["path"] = str(out)
        if data.get("coreset", {}).get("enabled"):
            data["coreset"]["target"] = _target_folder(work)
        cfg = load_config(data=data, overrides=overrides)
        log.info("dry run: serving %s from %s", urls, server.base_url)
        manifest = curate.run(cfg)
    return manifest, cfg.output.path
