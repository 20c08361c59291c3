"""Common Crawl WAT ingest (operators/commoncrawl.py): WAT files written here with warcio, with
relative links, bad links, short, huge and mojibake alt-texts, duplicates, non-HTML and non-page
records, a payload that is not JSON and a truncated gzip member: the right (url, alt) pairs come
out, the rest is counted with reasons, and the plan (then the whole job) runs over them, a
truncated file included, with a cc-index list expanding into its WAT files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.samples.wat import Page, synthetic_pages, write_wat
from operators.commoncrawl import WatConfig, iter_wat

HUGE = "a picture of " + "very " * 1200 + "long"


def fake_language(texts, model_path):
    """A pluggable detector for the test: 'de' when the text has an umlaut, else 'en'."""
    assert model_path == "model.bin"
    return [("de" if any(c in t for c in "äöü") else "en", 0.9) for t in texts]


def pages() -> list[Page]:
    return [
        Page("http://shop.example/a/page.html", [
            {"path": "IMG@/src", "url": "img/one.jpg", "alt": "A red  bicycle\n leaning on a wall"},  # relative
            {"path": "IMG@/src", "url": "/two.jpg", "alt": "Two cats sleeping"},  # root-relative
            {"path": "IMG@/src", "url": "https://cdn.example/three.jpg", "alt": "caf\u00c3\u00a9 au lait"},  # mojibake
            {"path": "IMG@/src", "url": "https://cdn.example/four.jpg", "alt": "Tom &amp; Jerry poster"},
            {"path": "IMG@/src", "url": "https://cdn.example/huge.jpg", "alt": HUGE},
            {"path": "IMG@/src", "url": "https://cdn.example/short.jpg", "alt": "  dog "},  # 3 chars: short
            {"path": "IMG@/src", "url": "https://cdn.example/none.jpg"},  # no alt
            {"path": "IMG@/src", "url": "data:image/png;base64,AAAA", "alt": "an inline image"},
            {"path": "IMG@/src", "url": "javascript:void(0)", "alt": "a script link"},
            {"path": "IMG@/src", "url": "/logo.svg", "alt": "the company logo"},
            {"path": "IMG@/src", "url": "/anim.GIF?x=1", "alt": "an animated banner"},
            {"path": "IMG@/src", "url": "img/one.jpg", "alt": "A red bicycle leaning on a wall"},  # duplicate
            {"path": "A@/href", "url": "https://creativecommons.org/licenses/by-sa/4.0/", "text": "CC BY-SA"},
            {"path": "A@/href", "url": "/contact", "text": "contact"},
        ]),
        Page("http://blog.example/post/7", [  # <base href> wins over the page URL
            {"path": "IMG@/src", "url": "pic.jpg", "alt": "Sunset over the harbour"},
            {"path": "IMG@/src", "url": "https://cdn.example/three.jpg", "alt": "Ein Café in München"},
        ], base="https://static.blog.example/media/"),
        Page("http://shop.example/b.jpg", html=False),  # a response that is not HTML
        Page("http://shop.example/a/page.html", kind="request"),  # a request record: no page
    ]


EXPECTED = {
    ("http://shop.example/a/img/one.jpg", "A red bicycle leaning on a wall"),
    ("http://shop.example/two.jpg", "Two cats sleeping"),
    ("https://cdn.example/three.jpg", "café au lait"),
    ("https://cdn.example/four.jpg", "Tom & Jerry poster"),
    ("https://cdn.example/huge.jpg", HUGE[:2000].rstrip()),
    ("https://static.blog.example/media/pic.jpg", "Sunset over the harbour"),
    ("https://cdn.example/three.jpg", "Ein Café in München"),
}


def _pairs(path, cfg=None, stats=None):
    rows = [r for t in iter_wat(str(path), cfg or WatConfig(), None, stats=stats) for r in t.to_pylist()]
    return rows


def test_the_right_pairs_come_out_and_the_rest_is_counted(tmp_path):
    path = write_wat(str(tmp_path / "x.warc.wat.gz"), pages(), raw_records=[b"{not json"])
    stats: dict = {}
    rows = _pairs(path, stats=stats)
    assert {(r["url"], r["caption"]) for r in rows} == EXPECTED and len(rows) == len(EXPECTED)
    first = [r for r in rows if r["page_url"] == "http://shop.example/a/page.html"]
    assert {r["license"] for r in first} == {"https://creativecommons.org/licenses/by-sa/4.0/"}
    assert {r["license"] for r in rows if r["page_url"] == "http://blog.example/post/7"} == {None}
    assert len(next(r["caption"] for r in rows if r["url"].endswith("huge.jpg"))) <= 2000
    assert stats["records"] == 5 and stats["pages"] == 2  # the warcinfo record is not a metadata record
    assert {k: stats[k] for k in ("not_html", "not_page", "bad_json", "short_alt", "no_alt", "bad_scheme",
                                   "skipped_extension", "duplicate_pair", "truncated", "read_error")} == {
        "not_html": 1, "not_page": 1, "bad_json": 1, "short_alt": 1, "no_alt": 1, "bad_scheme": 2,
        "skipped_extension": 2, "duplicate_pair": 1, "truncated": 0, "read_error": 0}
    assert stats["links"] == 14 and stats["pairs"] == len(EXPECTED)


def test_a_truncated_gzip_member_keeps_the_rows_before_it(tmp_path):
    many = synthetic_pages(300, seed=1)
    whole = write_wat(str(tmp_path / "whole.warc.wat.gz"), many)
    full: dict = {}
    n_full = len(_pairs(whole, stats=full))
    data = Path(whole).read_bytes()
    cut = tmp_path / "cut.warc.wat.gz"
    cut.write_bytes(data[:len(data) * 2 // 3 + 11])  # inside a member
    stats: dict = {}
    rows = _pairs(cut, stats=stats)
    assert stats["truncated"] == 1 and stats["read_error"] == 0 and stats["read_errors"]
    assert 0 < len(rows) < n_full and 0 < stats["pages"] < full["pages"]
    assert {(r["url"], r["caption"]) for r in rows} <= {(r["url"], r["caption"]) for r in _pairs(whole)}


def test_a_pluggable_language_detector(tmp_path):
    path = write_wat(str(tmp_path / "x.warc.wat.gz"), pages())
    lang = {"detector": "test_commoncrawl:fake_language", "model_path": "model.bin", "languages": ["en"]}
    stats: dict = {}
    rows = _pairs(path, WatConfig(language=lang), stats)
    assert {r["language"] for r in rows} == {"en"} and stats["other_language"] == 1  # "Ein Café in München"
    with pytest.raises(ValueError, match="model_path"):
        _pairs(path, WatConfig(language={"detector": "fasttext"}))
    with pytest.raises(ValueError, match="module:function"):
        WatConfig(language={"detector": "langid"})


def test_the_job_takes_wat_files_and_a_cc_index(ray_session, image_server, tmp_path):
    """``imgcurate run`` over a WAT glob and a wat.paths.gz list: pages whose images are on the
    loopback server; one image under two alt-texts becomes one sample with both captions; the
    truncated file is read up to its cut and does not stop the job."""
    from jobs import curate
    from jobs.samples.data import good_image_names
    from pipeline_helpers import job_config

    names = good_image_names(40)[:6]
    base = image_server.url("/img/")
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    links = [{"path": "IMG@/src", "url": f"{base}{n}", "alt": f"photo number {k} of the set"} for k, n in
             enumerate(names[:4])]
    write_wat(str(crawl / "a.warc.wat.gz"), [Page("http://pages.example/1", links)])
    write_wat(str(crawl / "b.warc.wat.gz"), [Page("http://pages.example/2", [
        {"path": "IMG@/src", "url": f"{base}{names[0]}", "alt": "the same photo, another page"}])])
    cut = write_wat(str(tmp_path / "c.warc.wat.gz"), [Page(f"http://pages.example/c{i}", [
        {"path": "IMG@/src", "url": f"{base}{names[4 + i % 2]}?p={i}", "alt": f"cut file photo {i}"}])
        for i in range(40)])
    data = Path(cut).read_bytes()
    (tmp_path / "cc" / "crawl-data").mkdir(parents=True)
    (tmp_path / "cc" / "crawl-data" / "c.warc.wat.gz").write_bytes(data[:len(data) // 2])
    with gzip.open(tmp_path / "wat.paths.gz", "wt") as fh:
        fh.write("crawl-data/c.warc.wat.gz\n")
    cfg = job_config([str(crawl / "*.warc.wat.gz"), str(tmp_path / "wat.paths.gz")], str(tmp_path / "out"),
                     overrides=[f"input.wat.cc_base={tmp_path / 'cc'}", "index.enabled=false"],
                     clip={"enabled": False}, safety={"enabled": False}, recaption={"enabled": False},
                     reward={"enabled": False}, selection={"reward_top_fraction": None},
                     dedup={"perceptual": {"enabled": False}})
    manifest = curate.run(cfg)
    plan = json.loads((tmp_path / "out" / "plan" / "_PLAN.json").read_text())
    assert [Path(f["path"]).name for f in plan["input_files"]] == ["a.warc.wat.gz", "b.warc.wat.gz",
                                                                    "c.warc.wat.gz"]
    assert plan["records"]["truncated"] == 1 and plan["records"]["pages"] >= 3
    cut_rows = plan["input_files"][2]["rows"]
    assert 0 < cut_rows < 40
    assert manifest["input_rows"] == 5 + cut_rows and manifest["samples"] == 4 + cut_rows
    rows = pq.read_table([str(p) for p in (tmp_path / "out" / "data").rglob("*.parquet")]).to_pylist()
    merged = next(r for r in rows if r["url"].endswith(names[0]))
    assert sorted(merged["captions"]) == ["photo number 0 of the set", "the same photo, another page"]
    assert merged["page_url"] in ("http://pages.example/1", "http://pages.example/2")
    assert manifest["kept"] == manifest["samples"]  # every image is on the server


def test_the_fast_link_resolver_equals_urljoin():
    import itertools
    from urllib.parse import urljoin

    from operators.commoncrawl import Resolver

    bases = ["http://shop.example/a/page.html", "https://h.example", "https://h.example/dir/", "http://h/x/y?q=1#f",
             "https://static.blog.example/media/", "https://h.example:8443/a/b/c", "http://h/a;p/b"]
    srcs = ["img/one.jpg", "/two.jpg", "https://cdn/x.jpg", "../up.jpg", "./same.jpg", "//proto.rel/x.jpg", "?q=2",
            "#frag", "a b.jpg", "mailto:x", "x.jpg?y=1", "https://cdn/a/../b.jpg", "", "/", "dir/./x.jpg", "é.jpg"]
    for b, s in itertools.product(bases, srcs):
        assert Resolver(b)(s) == urljoin(b, s), (b, s)
