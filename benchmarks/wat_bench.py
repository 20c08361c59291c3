"""WAT parsing benchmark: our Common Crawl reader (``operators.commoncrawl.iter_wat``, the default
``input.wat`` config: fastwarc, ftfy repair, LAION's link rules) against warcio's plain iteration
over the same file (every record's payload read, nothing parsed), in the same run.

    python benchmarks/wat_bench.py                 # ~100 MB WAT file
    python benchmarks/wat_bench.py --mb 20 --repeat 3

Data (``jobs/samples/wat.py``): a gzipped WAT file written with warcio, one gzip member a record,
three records a page as Common Crawl's (request, response with HTML-Metadata, metadata), pages
with ~12 image links (relative and absolute, alt-texts of 0-13 words or none, some .svg and
data: links) and ``--anchors`` other links, as real pages have dozens. Prints records/s, MB/s and
(ours) pairs/s, the ratio of records/s ours / warcio, the best of ``--repeat`` passes each.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.samples.wat import envelope, synthetic_pages  # noqa: E402
from operators.commoncrawl import WatConfig, iter_wat  # noqa: E402


def make_file(path: str, mb: float, anchors: int, seed: int) -> int:
    """Write pages in chunks until the file reaches ``mb`` megabytes; returns the pages written."""
    from warcio.warcwriter import WARCWriter

    pages = 0
    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=True)
        chunk = 0
        while fh.tell() < mb * 1e6:
            for p in synthetic_pages(500, seed=seed + chunk, anchors=anchors, all_records=True):
                body = json.dumps(envelope(p)).encode()
                w.write_record(w.create_warc_record(p.url, "metadata", payload=io.BytesIO(body),
                                                    warc_content_type="application/json"))
                pages += p.kind == "response"
            chunk += 1
    return pages


def ours(path: str) -> tuple[float, dict, int]:
    stats: dict = {}
    t0 = time.perf_counter()
    rows = sum(t.num_rows for t in iter_wat(path, WatConfig(), None, stats=stats))
    return time.perf_counter() - t0, stats, rows


def warcio_plain(path: str, parse: bool = False) -> tuple[float, int]:
    """warcio's iteration, every payload read (``parse``: and loaded as JSON, nothing more)."""
    from warcio.archiveiterator import ArchiveIterator

    n = 0
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        for rec in ArchiveIterator(fh):
            body = rec.content_stream().read()
            if parse and rec.rec_type == "metadata":
                json.loads(body)
            n += 1
    return time.perf_counter() - t0, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100.0, help="size of the generated WAT file")
    ap.add_argument("--anchors", type=int, default=60, help="A@/href links a page has besides its images")
    ap.add_argument("--repeat", type=int, default=2, help="passes of each reader (best is reported)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="imgcurate-wat-") as tmp:
        path = os.path.join(tmp, "bench.warc.wat.gz")
        t0 = time.perf_counter()
        pages = make_file(path, args.mb, args.anchors, args.seed)
        size = os.path.getsize(path)
        print(f"data: {size / 1e6:,.1f} MB WAT, {pages:,} pages ({3 * pages + 1:,} records incl. warcinfo), "
              f"written with warcio in {time.perf_counter() - t0:.1f} s")
        best_ours = min((ours(path) for _ in range(args.repeat)), key=lambda r: r[0])
        best_warcio = min((warcio_plain(path) for _ in range(args.repeat)), key=lambda r: r[0])
        best_json = min((warcio_plain(path, parse=True) for _ in range(args.repeat)), key=lambda r: r[0])
        s, stats, rows = best_ours
        records = stats["records"]
        print(f"ours (iter_wat, default input.wat): {s:.2f} s; {records / s:,.0f} WAT records/s, "
              f"{stats['pages'] / s:,.0f} pages/s, {rows / s:,.0f} pairs/s, {size / 1e6 / s:,.1f} MB/s; "
              f"{rows:,} pairs of {stats['links']:,} image links "
              f"(short alt {stats['short_alt']:,}, no alt {stats['no_alt']:,}, bad scheme {stats['bad_scheme']:,}, "
              f"skipped extension {stats['skipped_extension']:,}, duplicate {stats['duplicate_pair']:,}; "
              f"not pages {stats['not_page']:,})")
        ws, wn = best_warcio
        print(f"warcio (ArchiveIterator, every payload read, nothing parsed): {ws:.2f} s; {wn / ws:,.0f} records/s "
              f"(incl. warcinfo), {size / 1e6 / ws:,.1f} MB/s")
        js, jn = best_json
        print(f"warcio + json.loads of each WAT payload (nothing else): {js:.2f} s; {jn / js:,.0f} records/s")
        print(f"ratio records/s ours / warcio plain: {(records / s) / ((wn - 1) / ws):.2f}x (ours also parses the "
              f"JSON, applies the link rules and repairs the alt-texts); ours / warcio + json.loads: "
              f"{(records / s) / ((jn - 1) / js):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
