"""Common Crawl ingest: WAT files to (image url, alt-text) rows, as LAION built its candidate pool.

``input.format: wat`` (auto-detected from ``.warc.wat.gz`` / ``.wat.gz`` names) reads Common Crawl
WAT files, local or ``s3://``, streaming, one plan task per file like any URL list; ``input.format:
cc-index`` takes a snapshot's list of WAT paths (``wat.paths.gz``: one path a line, relative to
``input.wat.cc_base``) and expands it into those files, so a refresh names a snapshot, not 100,000
files. The rows go through the same plan as URL lists (normalize, ``sample_id``, merge): one image
URL with several alt-texts becomes one sample with several captions.

**Parsing** (fastwarc, a C++ WARC reader): every WARC ``metadata`` record is a WAT JSON document; a
page is one whose envelope's ``WARC-Type`` is ``response`` with ``HTML-Metadata``. Of its ``Links``,
the ``IMG@/src`` ones with an ``alt`` attribute are candidates, with LAION's rules (cc2dataset):

- the link is resolved against the page's ``<base href>`` if it has one, else the page URL;
- ``data:`` and ``javascript:`` links and ``.svg`` / ``.gif`` images (``input.wat.skip_extensions``)
  are skipped;
- the alt-text is repaired (``ftfy.fix_text``: mojibake, HTML entities), whitespace folded, kept
  when it has at least ``min_alt_chars`` (5) characters and cut to ``max_alt_chars`` (2,000);
- the page URL and any Creative Commons licence the page links (``A@/href`` or ``LINK@/href`` to
  ``creativecommons.org/licenses|publicdomain``) come along as the ``page_url`` and ``license``
  columns; (url, alt) pairs already seen in the file are skipped.

Every record and link that gives no row is counted with a reason (``WAT_REASONS``: a request or
metadata record that is not a page, a page that is not HTML, bad JSON, a short alt-text, a bad
scheme, a skipped extension, a duplicate pair); a file that ends inside a gzip member or a record
(``truncated``) or cannot be read (``read_error``) stops there with the rows read so far and the
error. The counts go to the plan manifest (``_PLAN.json``: ``records`` per input file and summed).

**Language** (optional, none bundled): ``input.wat.language.detector`` is ``fasttext`` (the
``fasttext`` package and a LID model at ``model_path``, e.g. lid.176.bin) or ``module:function``, a
callable ``f(texts, model_path) -> [(lang or None, score)]``; it adds ``language`` and
``language_score`` columns. ``languages`` keeps only those (others counted ``other_language``).
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import posixpath
import re
import zlib
from typing import Callable, Iterator
from urllib.parse import urljoin

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.storage import StorageConfig, fsspec_fs

log = logging.getLogger(__name__)

WAT_SUFFIXES = (".warc.wat.gz", ".wat.gz", ".warc.wat", ".wat")
CC_INDEX_SUFFIXES = ("wat.paths.gz", "wat.paths")
IMG_PATHS = ("IMG@/src",)
LICENSE_PATHS = ("A@/href", "LINK@/href")
_LICENSE = re.compile(r"creativecommons\.org/(licenses|publicdomain)/", re.I)
_WS = re.compile(r"\s+")
# Why a record or a link gives no row (counted per input file in the plan manifest).
WAT_REASONS = {
    "not_page": "a WAT record of a request, a warcinfo or a metadata record: no page",
    "not_html": "a page response that is not HTML (no HTML-Metadata)",
    "bad_json": "a WAT record whose payload is not JSON",
    "no_alt": "an image link without an alt attribute",
    "short_alt": "an alt-text shorter than input.wat.min_alt_chars after repair and whitespace folding",
    "bad_scheme": "a data:, javascript: or other non-http(s) image link",
    "skipped_extension": "an image whose path ends in one of input.wat.skip_extensions (.svg, .gif)",
    "duplicate_pair": "an (url, alt) pair already taken from the same file",
    "other_language": "an alt-text whose detected language is not in input.wat.language.languages",
    "truncated": "the file ends inside a gzip member or a record: the rows before it are kept",
    "read_error": "the file could not be read from here on (the message is in read_errors)",
}


class LanguageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    detector: str | None = Field(None, description="null (off), fasttext, or module:function "
                                                   "(f(texts, model_path) -> [(lang, score)])")
    model_path: str | None = Field(None, description="the detector's model file (none bundled)")
    languages: list[str] = Field(default_factory=list, description="keep only alt-texts detected as one of "
                                                                   "these (empty: keep all, add the columns)")

    @model_validator(mode="after")
    def _check(self):
        if self.detector and self.detector != "fasttext" and ":" not in self.detector:
            raise ValueError(f"detector {self.detector!r}: expected fasttext or module:function")
        if self.languages and not self.detector:
            raise ValueError("languages needs a detector")
        return self


class WatConfig(BaseModel):
    """Common Crawl WAT parsing (``input.wat:``; used for ``input.format: wat`` and ``cc-index``)."""

    model_config = ConfigDict(extra="forbid")

    min_alt_chars: int = Field(5, ge=0, description="shorter alt-texts (after repair) are skipped")
    max_alt_chars: int = Field(2000, ge=1, description="longer alt-texts are cut")
    skip_extensions: list[str] = Field(default_factory=lambda: [".svg", ".gif"],
                                       description="image paths ending so are skipped")
    cc_base: str = Field("s3://commoncrawl/", description="where a wat.paths(.gz) file's relative paths live")
    batch_rows: int = Field(65536, ge=1, description="rows per table a WAT file is read into")
    language: LanguageConfig = Field(LanguageConfig(), description="optional language detection of the alt-texts")


def is_wat(path: str) -> bool:
    return path.lower().endswith(WAT_SUFFIXES)


def is_cc_index(path: str) -> bool:
    return path.lower().endswith(CC_INDEX_SUFFIXES)


def expand_cc_index(path: str, cfg: WatConfig, storage: StorageConfig | None) -> list[str]:
    """The WAT files a ``wat.paths(.gz)`` list names (relative paths joined to ``cc_base``)."""
    fs, p = fsspec_fs(path, storage)
    compression = "gzip" if p.lower().endswith(".gz") else None
    with fs.open(p, "rt", compression=compression, encoding="utf-8") as fh:
        lines = [ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")]
    base = cfg.cc_base.rstrip("/") + "/"
    return [ln if "://" in ln or ln.startswith("/") else base + ln for ln in lines]


_PLAIN = re.compile(r"[^\x20-\x7e\t\n\r]|&")  # what can need a repair: non-ASCII, controls, entities


def fold(text: str, fix: Callable[[str], str]) -> str:
    """The alt-text repaired and whitespace folded. Printable ASCII without ``&`` has nothing for
    ftfy to repair (no mojibake, no entity), so only other texts pay for it."""
    if _PLAIN.search(text):
        text = fix(text)
    return _WS.sub(" ", text).strip()


class Resolver:
    """``urljoin(base, src)`` for the links of one page, without urljoin's cost in the common cases
    (an absolute http(s) link, a root-relative or a plain relative path, none with dot segments,
    a query or a scheme); anything else goes to urljoin."""

    def __init__(self, base: str):
        self.base = base
        head, sep, rest = base.partition("://")
        if sep and head.lower() in ("http", "https"):
            host_end = rest.find("/")
            self.origin = head + "://" + (rest if host_end < 0 else rest[:host_end])
            path = "/" if host_end < 0 else rest[host_end:].split("?", 1)[0].split("#", 1)[0]
            self.dir = self.origin + path[:path.rfind("/") + 1]
        else:
            self.origin = None

    def __call__(self, src: str) -> str:
        if src.startswith(("http://", "https://")):
            return src if "/." not in src else urljoin(self.base, src)
        if (self.origin is None or not src or "/." in src or src.startswith((".", "//", "?", "#"))
                or ":" in src.split("/", 1)[0]):
            return urljoin(self.base, src)
        return self.origin + src if src.startswith("/") else self.dir + src


def _fixer() -> Callable[[str], str]:
    try:
        import ftfy

        return lambda s: ftfy.fix_text(s, normalization="NFC")
    except ImportError:  # ftfy comes with open_clip; without it alt-texts are only folded
        import html

        return html.unescape


def _loads():
    try:
        import orjson

        return orjson.loads
    except ImportError:
        return json.loads


def language_detector(cfg: LanguageConfig) -> Callable[[list[str]], list[tuple[str | None, float]]] | None:
    if not cfg.detector:
        return None
    if cfg.detector == "fasttext":
        if not cfg.model_path:
            raise ValueError("input.wat.language.detector=fasttext needs input.wat.language.model_path")
        try:
            import fasttext
        except ImportError:
            raise ValueError("input.wat.language.detector=fasttext needs the fasttext package") from None
        model = fasttext.load_model(cfg.model_path)

        def detect(texts):
            labels, scores = model.predict([t.replace("\n", " ") for t in texts])
            return [(lab[0].replace("__label__", "") if lab else None, float(sc[0]) if len(sc) else 0.0)
                    for lab, sc in zip(labels, scores)]
        return detect
    mod, _, fn = cfg.detector.partition(":")
    if not fn:
        raise ValueError(f"input.wat.language.detector {cfg.detector!r}: expected fasttext or module:function")
    f = getattr(importlib.import_module(mod), fn)
    return lambda texts: f(texts, cfg.model_path)


class GzipMembers(io.RawIOBase):
    """Multi-member gzip, decompressed member by member, that hands out every byte before a cut:
    Python's ``gzip`` raises at a member cut short and loses what the same ``read`` had
    decompressed of the complete members before it; here those bytes are returned first, and the
    next read raises ``EOFError``. A corrupt member raises ``OSError``."""

    def __init__(self, raw, chunk: int = 1 << 16):
        self.raw, self.chunk = raw, chunk
        self._d = zlib.decompressobj(31)
        self._fed = False  # the current member has had input
        self._buf, self._pos = b"", 0
        self._end = False
        self._offset = 0  # decompressed bytes handed out
        self.truncated = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:  # fastwarc asks where it is; forward seeks skip, backward ones fail
        return True

    def tell(self) -> int:
        return self._offset

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._offset + offset if whence == io.SEEK_CUR else None
        if target is None or target < self._offset:
            raise io.UnsupportedOperation("a gzip stream seeks forward only")
        skip = bytearray(1 << 16)
        while self._offset < target:
            if not self.readinto(memoryview(skip)[:min(len(skip), target - self._offset)]):
                break
        return self._offset

    def _fill(self) -> None:
        out = []
        while not out and not self._end:
            data = self.raw.read(self.chunk)
            if not data:
                self._end = True
                self.truncated = self._fed and not self._d.eof
                break
            try:
                piece = self._d.decompress(data)
                self._fed = True
                while self._d.eof:  # a member ended: the next starts in its unused data
                    rest = self._d.unused_data
                    self._d, self._fed = zlib.decompressobj(31), False
                    if not rest:
                        break
                    piece += self._d.decompress(rest)
                    self._fed = True
            except zlib.error as exc:
                raise OSError(f"corrupt gzip data: {exc}") from None
            if piece:
                out.append(piece)
        self._buf, self._pos = b"".join(out), 0

    def readinto(self, b) -> int:
        if self._pos >= len(self._buf):
            self._fill()
            if not self._buf:
                if self.truncated:
                    raise EOFError("the file ends inside a gzip member (truncated)")
                return 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos:self._pos + n]
        self._pos += n
        self._offset += n
        return n


class open_gzip:
    """A gzip reader over ``raw`` when it starts with the gzip magic, else ``raw`` itself."""

    def __init__(self, raw):
        self.raw = raw

    def __enter__(self):
        head = self.raw.read(2)
        self.raw.seek(0)
        self.stream = GzipMembers(self.raw) if head == b"\x1f\x8b" else self.raw
        return self.stream

    def __exit__(self, *exc):
        return False


def _ext_of(url: str) -> str:
    """The lower-cased extension of the URL's path ('' if none)."""
    path = url.split("#", 1)[0].split("?", 1)[0]
    slash = path.find("/", path.find("//") + 2) if "//" in path else 0
    return posixpath.splitext(path[slash:] if slash >= 0 else "")[1].lower()


def iter_wat(path: str, cfg: WatConfig, storage: StorageConfig | None, url_column: str = "url",
             caption_column: str = "caption", stats: dict | None = None) -> Iterator[pa.Table]:
    """Stream one WAT file as tables of ``url_column``, ``caption_column``, ``page_url``, ``license``
    (and ``language``, ``language_score``); ``stats`` gets the counts (module docstring)."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    stats = stats if stats is not None else {}
    for k in ("records", "pages", "links", "pairs", *WAT_REASONS):
        stats.setdefault(k, 0)
    fix, loads = _fixer(), _loads()
    detect = language_detector(cfg.language)
    keep_langs = set(cfg.language.languages)
    skip_ext = tuple(e.lower() for e in cfg.skip_extensions)
    seen: set[int] = set()
    cols: dict[str, list] = {url_column: [], caption_column: [], "page_url": [], "license": []}

    def table() -> pa.Table:
        t = pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()})
        for v in cols.values():
            v.clear()
        if detect is not None and t.num_rows:
            found = detect(t.column(caption_column).to_pylist())
            langs = [lang for lang, _ in found]
            t = t.append_column("language", pa.array(langs, pa.string())).append_column(
                "language_score", pa.array([float(s) for _, s in found], pa.float32()))
            if keep_langs:
                mask = [lang in keep_langs for lang in langs]
                stats["other_language"] += mask.count(False)
                t = t.filter(pa.array(mask))
        return t

    fs, p = fsspec_fs(path, storage)
    with fs.open(p, "rb") as raw:
        # Our member-by-member gzip, not fastwarc's own: it raises at a member cut short (EOFError)
        # after every byte before it, where fastwarc would end quietly with a partial record.
        with open_gzip(raw) as stream:
            try:
                for rec in ArchiveIterator(stream, record_types=WarcRecordType.metadata, parse_http=False,
                                           stream_detect=False):
                    stats["records"] += 1
                    try:
                        doc = loads(rec.reader.read())
                        env = doc["Envelope"]
                    except (ValueError, KeyError, TypeError):
                        stats["bad_json"] += 1
                        continue
                    head = env.get("WARC-Header-Metadata") or {}
                    if head.get("WARC-Type") != "response":
                        stats["not_page"] += 1
                        continue
                    html = ((env.get("Payload-Metadata") or {}).get("HTTP-Response-Metadata") or {}).get("HTML-Metadata")
                    if not isinstance(html, dict):
                        stats["not_html"] += 1
                        continue
                    stats["pages"] += 1
                    page = head.get("WARC-Target-URI") or ""
                    base = ((html.get("Head") or {}).get("Base")) or None
                    base = urljoin(page, base) if base else page
                    resolve = Resolver(base)
                    lic, images = None, []
                    for link in html.get("Links") or ():  # one pass: the image links and the licence
                        where = link.get("path")
                        if where in IMG_PATHS:
                            images.append(link)
                        elif lic is None and where in LICENSE_PATHS and _LICENSE.search(link.get("url") or ""):
                            lic = resolve(link["url"])
                    stats["links"] += len(images)
                    for link in images:
                        alt = link.get("alt")
                        if alt is None:
                            stats["no_alt"] += 1
                            continue
                        src = (link.get("url") or "").strip()
                        if src.lower().startswith(("data:", "javascript:")):
                            stats["bad_scheme"] += 1
                            continue
                        url = resolve(src)
                        if not url.lower().startswith(("http://", "https://")):
                            stats["bad_scheme"] += 1
                            continue
                        ext = _ext_of(url)
                        if ext and ext.endswith(skip_ext):
                            stats["skipped_extension"] += 1
                            continue
                        text = fold(alt, fix) if isinstance(alt, str) else ""
                        if len(text) < cfg.min_alt_chars:
                            stats["short_alt"] += 1
                            continue
                        text = text[:cfg.max_alt_chars].rstrip()
                        key = hash((url, text))
                        if key in seen:
                            stats["duplicate_pair"] += 1
                            continue
                        seen.add(key)
                        cols[url_column].append(url)
                        cols[caption_column].append(text)
                        cols["page_url"].append(page)
                        cols["license"].append(lic)
                        stats["pairs"] += 1
                    if len(cols[url_column]) >= cfg.batch_rows:
                        yield table()
            except (OSError, EOFError, ValueError) as exc:
                msg = str(exc) or type(exc).__name__
                kind = "truncated" if isinstance(exc, EOFError) or any(
                    w in msg.lower() for w in ("truncat", "ended before", "unexpected end")) else "read_error"
                stats[kind] += 1
                stats.setdefault("read_errors", []).append(f"{type(exc).__name__}: {msg}"[:300])
                log.warning("WAT %s: %s after %d records (%s); the rows read so far are kept", path, kind,
                            stats["records"], msg[:200])
    if cols[url_column] or stats["pairs"] == 0:
        yield table()


def merge_stats(parts: list[dict]) -> dict:
    """The sum of per-file WAT counts (read errors listed)."""
    out: dict = {}
    for s in parts:
        for k, v in s.items():
            if isinstance(v, list):
                out.setdefault(k, []).extend(v)
            else:
                out[k] = out.get(k, 0) + v
    return out
