"""Common Crawl WAT files written here (warcio), for the tests and the WAT benchmark.

A WAT file is a gzipped WARC file of ``metadata`` records whose payload is a JSON envelope: for an
HTML page response, ``Envelope.Payload-Metadata.HTTP-Response-Metadata.HTML-Metadata`` holds the
page's ``Head`` (``Base``) and ``Links`` (``{"path": "IMG@/src", "url": ..., "alt": ...}``), the
layout Common Crawl's WAT files have (and LAION's cc2dataset reads).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Page:
    url: str
    links: list[dict] = field(default_factory=list)
    base: str | None = None
    html: bool = True  # False: a response that is not HTML (no HTML-Metadata)
    kind: str = "response"  # or request / metadata: records that are no page
    metas: list[dict] = field(default_factory=list)


def envelope(page: Page) -> dict:
    head = {"WARC-Type": page.kind, "WARC-Target-URI": page.url, "WARC-Date": "2026-11-01T00:00:00Z"}
    payload: dict = {"Actual-Content-Type": "application/http; msgtype=response"}
    if page.kind == "response":
        meta: dict = {"Headers": {"Content-Type": "text/html; charset=UTF-8" if page.html else "image/jpeg",
                                  "Server": "nginx", "Date": "Sat, 01 Nov 2026 00:00:00 GMT",
                                  "Cache-Control": "max-age=600", "Vary": "Accept-Encoding",
                                  "Set-Cookie": "session=0123456789abcdef; Path=/; HttpOnly",
                                  "X-Frame-Options": "SAMEORIGIN", "Content-Language": "en"},
                      "Headers-Length": "412", "Entity-Length": "48213",
                      "Response-Message": {"Status": "200", "Version": "HTTP/1.1", "Reason": "OK"}}
        if page.html:
            h: dict = {"Head": {"Title": "a page", "Metas": page.metas}, "Links": page.links}
            if page.base:
                h["Head"]["Base"] = page.base
            meta["HTML-Metadata"] = h
        payload["HTTP-Response-Metadata"] = meta
    return {"Envelope": {"Format": "WARC", "WARC-Header-Metadata": head, "Payload-Metadata": payload}}


def write_wat(path: str, pages: list[Page], raw_records: list[bytes] | None = None) -> str:
    """Write ``pages`` as WAT metadata records (each its own gzip member, as Common Crawl does);
    ``raw_records``: payloads written as they are (say, bytes that are not JSON)."""
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=True)
        w.write_record(w.create_warcinfo_record(path.rsplit("/", 1)[-1], {"software": "imgcurate tests"}))
        for p in pages:
            body = json.dumps(envelope(p)).encode()
            w.write_record(w.create_warc_record(p.url, "metadata", payload=io.BytesIO(body),
                                                warc_content_type="application/json"))
        for b in raw_records or []:
            w.write_record(w.create_warc_record("http://example.com/raw", "metadata", payload=io.BytesIO(b),
                                                warc_content_type="application/json"))
    return path


def synthetic_pages(n_pages: int, seed: int = 0, hosts: int = 200, images_per_page: int = 12,
                    anchors: int = 0, all_records: bool = False) -> list[Page]:
    """Pages that look like a crawl's: relative and absolute image links, some alt-texts short or
    missing, some .svg/.gif and data: links, licence links on a few pages. ``anchors``: ``A@/href``
    links a page has besides (a real page has dozens); ``all_records``: each page's WAT also holds
    the record of its request and a metadata record, as a Common Crawl WAT file does (3 a page)."""
    rng = np.random.default_rng(seed)
    words = ["red", "house", "dog", "on", "the", "beach", "with", "a", "blue", "sky", "old", "car", "photo",
             "of", "mountain", "lake", "city", "night", "street", "market", "flowers", "garden", "portrait"]
    pages = []
    for i in range(n_pages):
        host = f"site{int(rng.integers(hosts))}.example"
        url = f"https://{host}/articles/{i}.html"
        links = []
        for j in range(int(rng.integers(1, 2 * images_per_page))):
            r = rng.random()
            src = (f"/img/{i}-{j}.jpg" if r < 0.4 else f"https://cdn{int(rng.integers(20))}.example/{i}/{j}.jpg"
                   if r < 0.8 else f"thumb-{j}.png" if r < 0.9 else f"/icons/{j}.svg" if r < 0.95 else
                   "data:image/png;base64,AAAA")
            link = {"path": "IMG@/src", "url": src}
            if rng.random() < 0.85:
                n = int(rng.integers(0, 14))
                link["alt"] = " ".join(rng.choice(words, n)) if n else ""
            links.append(link)
        links.append({"path": "A@/href", "url": f"/about-{i}", "text": "about"})
        for k in range(anchors):
            links.append({"path": "A@/href", "url": f"/{' '.join(rng.choice(words, 2)).replace(' ', '-')}/{k}",
                          "text": " ".join(rng.choice(words, int(rng.integers(1, 5))))})
        if rng.random() < 0.05:
            links.append({"path": "A@/href", "url": "https://creativecommons.org/licenses/by/4.0/", "text": "cc"})
        metas = [{"name": "description", "content": " ".join(rng.choice(words, 20))},
                 {"name": "viewport", "content": "width=device-width, initial-scale=1"}] if anchors else []
        if all_records:
            pages.append(Page(url, kind="request"))
        pages.append(Page(url, links, metas=metas))
        if all_records:
            pages.append(Page(url, kind="metadata"))
    return pages
