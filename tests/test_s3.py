"""Input from and output to a real S3-compatible server on loopback (moto server mode)."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq

from jobs import curate
from jobs.samples.data import sample_cases, write_url_list
from tests.pipeline_helpers import job_config


def test_job_reads_and_writes_s3(ray_session, image_server, s3_server, s3fs_client, tmp_path):
    fs = s3fs_client
    fs.mkdir("imgcurate-in")
    fs.mkdir("imgcurate-out")
    cases = sample_cases(12)[:60]
    local = write_url_list(cases, image_server.base_url, str(tmp_path / "urls.csv"))
    fs.put(local, "imgcurate-in/lists/urls-000.csv")
    cfg = job_config("s3://imgcurate-in/lists/*.csv", "s3://imgcurate-out/run1",
                     storage={"endpoint_url": s3_server})
    manifest = curate.run(cfg)

    assert fs.exists("imgcurate-out/run1/_manifest.json")
    on_s3 = json.loads(fs.cat("imgcurate-out/run1/_manifest.json"))
    assert on_s3["samples"] == manifest["samples"] > 0
    files = fs.glob("imgcurate-out/run1/data/**/*.parquet")
    assert files and sorted(files) == sorted(f.removeprefix("s3://") for f in manifest["data_files"])
    rows = 0
    ids = []
    for f in files:
        t = pq.read_table(io.BytesIO(fs.cat(f)))
        rows += t.num_rows
        ids += t.column("sample_id").to_pylist()
    assert rows == len(set(ids)) == manifest["samples"]
    # Nothing written locally under a path that looks like the bucket.
    assert not (tmp_path / "imgcurate-out").exists()
    # Credentials never end up in the manifest.
    assert "imgcurate-test" not in json.dumps(on_s3)
    # The run report next to the manifest on S3, and `imgcurate report` of the S3 output again
    assert manifest["report"]["path"] == "s3://imgcurate-out/run1/report.html"
    page = fs.cat("imgcurate-out/run1/report.html")
    assert len(page) == manifest["report"]["bytes"] and 'class="grid" data-key="kept"' in page.decode()
    from jobs.cli import main

    out = tmp_path / "again.html"
    assert main(["report", "s3://imgcurate-out/run1", "--endpoint-url", s3_server, "-o", str(out)]) == 0
    assert 'class="grid" data-key="kept"' in out.read_text()
