"""Phase 0 ingest without Ray: URL normalization, captions, readers, scatter + merge, path expansion."""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.sources import (
    SourceConfig,
    bucket_of,
    clean_caption,
    conform,
    expand_paths,
    iter_rows,
    merge_bucket,
    normalize_rows,
    normalize_url,
    sample_id_of,
    scatter_file,
    unify_extra_schema,
)

HEX32 = re.compile(r"^[0-9a-f]{32}$")


# --- normalize_url and sample_id ----------------------------------------------------
@pytest.mark.parametrize("raw,expected", [
    ("HTTP://Example.COM/a.jpg", "http://example.com/a.jpg"),
    ("http://example.com:80/a.jpg", "http://example.com/a.jpg"),
    ("https://example.com:443/a.jpg", "https://example.com/a.jpg"),
    ("http://example.com:443/a.jpg", "http://example.com:443/a.jpg"),  # not the default port for http
    ("https://example.com:8443/a.jpg", "https://example.com:8443/a.jpg"),
    ("http://example.com/a.jpg#frag", "http://example.com/a.jpg"),
    ("http://example.com/Path/IMG.JPG?Size=Big&X=Y", "http://example.com/Path/IMG.JPG?Size=Big&X=Y"),
    ("  http://example.com/a.jpg  ", "http://example.com/a.jpg"),
    ("http://example.com", "http://example.com/"),
    ("https://Bücher.DE/bild.jpg", "https://xn--bcher-kva.de/bild.jpg"),
    ("http://[::1]:80/x", "http://[::1]/x"),
])
def test_normalize_url_ok(raw, expected):
    assert normalize_url(raw) == (expected, None)


@pytest.mark.parametrize("raw,reason", [
    (None, "missing_url"),
    ("", "missing_url"),
    ("   ", "missing_url"),
    ("ftp://example.com/a.jpg", "unsupported_scheme"),
    ("javascript:alert(1)", "unsupported_scheme"),
    ("not a url", "unsupported_scheme"),
    ("mailto:someone@example.com", "unsupported_scheme"),
    ("data:image/png;base64,iVBORw0KGgo=", "unsupported_scheme"),
    ("http://", "invalid_url"),
    ("http:///only/a/path", "invalid_url"),
    ("http://exa mple.com/", "invalid_url"),
    ("http://h:99999/", "invalid_url"),
    ("http://h:port/", "invalid_url"),
    ("http://exa\nmple.com/", "invalid_url"),
])
def test_normalize_url_reasons(raw, reason):
    assert normalize_url(raw) == (None, reason)


def test_normalize_url_max_length():
    base = "http://example.com/"
    url = base + "a" * (100 - len(base))
    assert len(url) == 100
    assert normalize_url(url, max_length=100) == (url, None)
    assert normalize_url(url + "b", max_length=100) == (None, "url_too_long")
    # The limit applies to the normalized form: a dropped fragment does not count.
    assert normalize_url(url + "#" + "f" * 50, max_length=100) == (url, None)


def test_normalize_url_non_string_is_coerced():
    assert normalize_url(12345) == (None, "unsupported_scheme")


def test_sample_id_stable_and_shared_by_url_variants():
    variants = ["http://example.com/a.jpg", "HTTP://EXAMPLE.com:80/a.jpg#top", " http://Example.com/a.jpg"]
    normalized = {normalize_url(v)[0] for v in variants}
    assert normalized == {"http://example.com/a.jpg"}
    ids = {sample_id_of(normalize_url(v)[0]) for v in variants}
    assert len(ids) == 1
    sid = ids.pop()
    assert HEX32.match(sid)
    assert sample_id_of("http://example.com/a.jpg") == sid  # stable across calls
    # Path case matters, so it is another sample.
    assert sample_id_of(normalize_url("http://example.com/A.jpg")[0]) != sid


def test_bucket_of_in_range_and_deterministic():
    ids = [sample_id_of(f"http://example.com/{i}.jpg") for i in range(200)]
    buckets = [bucket_of(s, 7) for s in ids]
    assert all(0 <= b < 7 for b in buckets)
    assert buckets == [bucket_of(s, 7) for s in ids]
    assert len(set(buckets)) == 7  # 200 hashes fill 7 buckets


# --- clean_caption ---------------------------------------------------------------------
def test_clean_caption_control_chars_and_whitespace():
    out = clean_caption("  a\x00red\x07 barn\t\tin\n\n a   field\r\n", 100)
    assert out is not None
    assert not any(ord(ch) < 32 for ch in out)
    assert "  " not in out and out == out.strip()
    assert out.split() == ["a", "red", "barn", "in", "a", "field"]


@pytest.mark.parametrize("value", [None, "", "   ", "\t\n", "\x00\x01"])
def test_clean_caption_empty_is_none(value):
    assert clean_caption(value, 100) is None


def test_clean_caption_coerces_non_strings():
    assert clean_caption(42, 100) == "42"
    assert clean_caption(1.5, 100) == "1.5"
    assert clean_caption("caf\xe9".encode(), 100) == "caf\xe9"


def test_clean_caption_truncates():
    assert clean_caption("abcdefgh", 3) == "abc"
    assert clean_caption("x" * 5000, 4096) == "x" * 4096
    # Truncation happens after whitespace is collapsed, and leaves no trailing blank.
    assert clean_caption("ab    cd", 4) == "ab c"
    assert clean_caption("abc def", 4) == "abc"


def test_clean_caption_nfc():
    decomposed = "cafe\u0301"  # e + combining acute
    out = clean_caption(decomposed, 100)
    assert out == "caf\xe9" and len(out) == 4


# --- readers ---------------------------------------------------------------------------
ROWS = [
    {"url": "http://example.com/1.jpg", "caption": "one", "a": "x1", "b": "y1"},
    {"url": "http://example.com/2.jpg", "caption": "two", "a": "x2", "b": "y2"},
    {"url": "ftp://example.com/3.jpg", "caption": "three", "a": "x3", "b": "y3"},
]


def _write_csv(path: Path, rows, delimiter=",", gz=False, columns=None):
    columns = columns or list(rows[0])
    opener = (lambda: gzip.open(path, "wt", newline="", encoding="utf-8")) if gz else (
        lambda: open(path, "w", newline="", encoding="utf-8"))
    with opener() as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r[c] for c in columns])


def _write_jsonl(path: Path, lines, gz=False):
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def _read(path: Path, **cfg) -> pa.Table:
    c = SourceConfig(paths=[str(path)], **cfg)
    tables = [normalize_rows(t, c, str(path), 0) for t in iter_rows(str(path), c, None)]
    assert len(tables) == 1
    return tables[0]


@pytest.mark.parametrize("name,writer", [
    ("in.csv", lambda p: _write_csv(p, ROWS)),
    ("in.tsv", lambda p: _write_csv(p, ROWS, delimiter="\t")),
    ("in.csv.gz", lambda p: _write_csv(p, ROWS, gz=True)),
    ("in.jsonl", lambda p: _write_jsonl(p, ROWS)),
    ("in.jsonl.gz", lambda p: _write_jsonl(p, ROWS, gz=True)),
    ("in.parquet", lambda p: pq.write_table(pa.Table.from_pylist(ROWS), p)),
])
def test_formats_read_the_same_rows(tmp_path, name, writer):
    path = tmp_path / name
    writer(path)
    t = _read(path)
    rows = t.to_pylist()
    assert [r["url"] for r in rows] == ["http://example.com/1.jpg", "http://example.com/2.jpg", None]
    assert [r["captions"] for r in rows] == [["one"], ["two"], ["three"]]
    assert [r["caption_sources"] for r in rows] == [["caption"]] * 3
    assert [r["status"] for r in rows] == ["kept", "kept", "failed"]
    assert rows[2]["drop_reason"] == "unsupported_scheme" and "ftp://" in rows[2]["error_message"]
    assert rows[2]["url_original"] == "ftp://example.com/3.jpg"
    assert [r["input_row"] for r in rows] == [0, 1, 2]
    assert {r["input_file"] for r in rows} == {str(path)}
    assert [r["a"] for r in rows] == ["x1", "x2", "x3"]
    assert [r["b"] for r in rows] == ["y1", "y2", "y3"]
    assert rows[0]["sample_id"] == sample_id_of("http://example.com/1.jpg")
    assert all(HEX32.match(r["sample_id"]) for r in rows)


def test_small_read_batches_keep_row_numbers(tmp_path):
    path = tmp_path / "in.csv"
    _write_csv(path, [{"url": f"http://e.com/{i}.jpg", "caption": str(i)} for i in range(7)])
    c = SourceConfig(paths=[str(path)], read_batch_rows=3)
    batches = list(iter_rows(str(path), c, None))
    assert [b.num_rows for b in batches] == [3, 3, 1]
    seen, first = [], 0
    for b in batches:
        t = normalize_rows(b, c, str(path), first)
        first += b.num_rows
        seen += t.column("input_row").to_pylist()
    assert seen == list(range(7))


def test_csv_short_row_and_bom(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes("\ufeffurl,caption,extra\nhttp://e.com/1.jpg,one,z\nhttp://e.com/2.jpg\n".encode())
    rows = _read(path).to_pylist()
    assert [r["url"] for r in rows] == ["http://e.com/1.jpg", "http://e.com/2.jpg"]
    assert [r["status"] for r in rows] == ["kept", "kept"]
    assert rows[1]["captions"] == [] and rows[1]["extra"] is None
    assert rows[0]["extra"] == "z"


def test_jsonl_bad_lines_and_nested_values(tmp_path):
    path = tmp_path / "in.jsonl"
    _write_jsonl(path, [
        {"url": "http://e.com/1.jpg", "caption": "one", "meta": {"k": [1, 2]}, "n": 3},
        "this is {not json",
        "[1, 2, 3]",
        "",
        {"url": "http://e.com/2.jpg", "caption": None, "tags": ["a", "b"]},
    ])
    rows = _read(path).to_pylist()
    assert len(rows) == 4  # the blank line is not a row
    assert json.loads(rows[0]["meta"]) == {"k": [1, 2]}
    assert rows[0]["n"] == "3"
    assert json.loads(rows[3]["tags"]) == ["a", "b"]
    assert rows[3]["captions"] == [] and rows[3]["status"] == "kept"
    for bad, text in ((rows[1], "this is {not json"), (rows[2], "[1, 2, 3]")):
        assert bad["status"] == "failed" and bad["url"] is None
        assert bad["drop_reason"] == "bad_line"
        assert text in bad["error_message"]  # the offending line is recorded, not lost
    assert "__bad_line__" not in rows[0]
    assert [r["input_row"] for r in rows] == [0, 1, 2, 3]


def test_extra_columns_selection_and_reserved_names(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({
        "url": ["http://e.com/1.jpg"], "caption": ["c"], "a": [1], "b": ["y"],
        "status": ["from input"], "sample_id": ["theirs"], "captions": ["theirs too"],
    }), path)
    all_cols = _read(path)
    assert all_cols.column("a").type == pa.int64()  # parquet types are kept
    row = all_cols.to_pylist()[0]
    assert row["extra_status"] == "from input" and row["status"] == "kept"
    assert row["extra_sample_id"] == "theirs" and row["sample_id"] == sample_id_of("http://e.com/1.jpg")
    assert row["extra_captions"] == "theirs too" and row["captions"] == ["c"]

    picked = _read(path, extra_columns=["a", "missing_col"])
    assert "a" in picked.column_names
    assert not {"b", "extra_status", "extra_sample_id", "missing_col"} & set(picked.column_names)


def test_dictionary_columns_are_decoded(tmp_path):
    path = tmp_path / "in.parquet"
    t = pa.table({"url": ["http://e.com/1.jpg", "http://e.com/2.jpg"],
                  "lang": pa.array(["en", "de"]).dictionary_encode()})
    pq.write_table(t, path)
    out = _read(path)
    assert out.column("lang").type == pa.string()
    assert out.column("lang").to_pylist() == ["en", "de"]


def test_missing_url_column_fails_every_row(tmp_path):
    path = tmp_path / "in.csv"
    _write_csv(path, ROWS)
    t = _read(path, url_column="URL")
    rows = t.to_pylist()
    assert len(rows) == 3
    assert {r["status"] for r in rows} == {"failed"}
    assert {r["drop_reason"] for r in rows} == {"missing_url"}
    assert all("'URL'" in r["error_message"] for r in rows)
    assert len({r["sample_id"] for r in rows}) == 3  # unusable rows never merge
    assert [r["captions"] for r in rows] == [["one"], ["two"], ["three"]]  # still recorded


def test_unknown_format_names_the_file(tmp_path):
    path = tmp_path / "in.xlsx"
    path.write_text("x")
    with pytest.raises(ValueError, match="in.xlsx"):
        list(iter_rows(str(path), SourceConfig(paths=[str(path)]), None))
    # An explicit format overrides the extension.
    _write_csv(path, ROWS)
    assert _read(path, format="csv").num_rows == 3


# --- scatter + merge -----------------------------------------------------------------
URL_A = "http://example.com/a.jpg"
URL_B = "http://example.com/b.jpg"


def _two_inputs(tmp_path: Path) -> tuple[Path, Path, int]:
    """File 1 (CSV) and file 2 (JSONL) share URLs (also as variants) with other captions."""
    f1 = tmp_path / "in" / "1-first.csv"
    f2 = tmp_path / "in" / "2-second.jsonl"
    f1.parent.mkdir()
    _write_csv(f1, [
        {"url": URL_A, "caption": "a from csv", "title": "title a", "n": "1", "only1": "p"},
        {"url": "HTTP://EXAMPLE.com:80/a.jpg#x", "caption": "a again", "title": None, "n": "2", "only1": "q"},
        {"url": "not a url", "caption": "bad one", "title": None, "n": "3", "only1": "r"},
        {"url": URL_B, "caption": "b", "title": "title b", "n": "4", "only1": "s"},
        {"url": URL_A, "caption": "a from csv", "title": "title a", "n": "5", "only1": "t"},  # exact repeat
        {"url": "", "caption": "no url", "title": None, "n": "6", "only1": "u"},
    ], columns=["url", "caption", "title", "n", "only1"])
    _write_jsonl(f2, [
        {"url": "http://Example.com/a.jpg", "caption": "a from jsonl", "title": "title a", "n": 10},
        {"url": URL_B, "caption": "b", "title": None, "n": 11},
        {"url": "ftp://example.com/c.jpg", "caption": "ftp", "n": 12},
        "garbage line",
        {"url": "http://example.com/c.jpg", "caption": "c", "n": 13},
    ])
    return f1, f2, 6 + 5


def _plan(tmp_path: Path, files: list[str], num_buckets: int, flush_rows: int = 200_000, **cfg):
    c = SourceConfig(paths=files, caption_columns=["caption", "title"], **cfg)
    scatter_dir = str(tmp_path / "scatter")
    stats = [scatter_file(i, f, c, None, scatter_dir, num_buckets, flush_rows) for i, f in enumerate(files)]
    extra = unify_extra_schema([pa.ipc.read_schema(pa.py_buffer(s["extra_schema"])) for s in stats])
    samples, merged = {}, []
    for b in range(num_buckets):
        m = merge_bucket(b, scatter_dir, str(tmp_path / "samples" / f"bucket={b:05d}"), extra, None)
        merged.append(m)
        for path in m["files"]:
            for row in pq.read_table(path).to_pylist():
                assert row["sample_id"] not in samples
                samples[row["sample_id"]] = {**row, "_bucket": b}
    return stats, extra, merged, samples


@pytest.mark.parametrize("flush_rows", [200_000, 2])
def test_scatter_merge_end_to_end(tmp_path, flush_rows):
    f1, f2, n_rows = _two_inputs(tmp_path)
    stats, extra, merged, samples = _plan(tmp_path, [str(f1), str(f2)], num_buckets=4, flush_rows=flush_rows)

    assert [s["rows"] for s in stats] == [6, 5]
    assert sum(m["rows"] for m in merged) == n_rows
    assert sum(m["samples"] for m in merged) == len(samples)
    # Every input row is accounted for, once.
    assert sum(s["n_input_rows"] for s in samples.values()) == n_rows
    for sid, s in samples.items():
        assert s["_bucket"] == bucket_of(sid, 4)

    a = samples[sample_id_of(URL_A)]
    assert a["url"] == URL_A
    assert a["n_input_rows"] == 4
    # Input order (file, row); the exact repeat (row 4) and ("title a", title) from file 2 are kept once.
    assert a["captions"] == ["a from csv", "title a", "a again", "a from jsonl"]
    assert a["caption_sources"] == ["caption", "title", "caption", "caption"]
    # The first occurrence (file 1, row 0) gives the URL and the extra columns.
    assert (a["input_file"], a["input_row"]) == (str(f1), 0)
    assert a["url_original"] == URL_A
    assert (a["n"], a["only1"]) == ("1", "p")
    assert a["status"] == "kept" and a["drop_stage"] is None and a["drop_reason"] is None

    b = samples[sample_id_of(URL_B)]
    assert b["n_input_rows"] == 2
    assert b["captions"] == ["b", "title b"] and b["caption_sources"] == ["caption", "title"]
    assert b["n"] == "4"

    c = samples[sample_id_of("http://example.com/c.jpg")]
    assert c["n_input_rows"] == 1 and c["n"] == "13" and c["only1"] is None  # column absent in its file

    failed = [s for s in samples.values() if s["status"] == "failed"]
    assert sorted(s["drop_reason"] for s in failed) == sorted(
        ["unsupported_scheme", "missing_url", "unsupported_scheme", "bad_line"])
    assert {s["drop_stage"] for s in failed} == {"plan"}
    assert all(s["n_input_rows"] == 1 and s["url"] is None for s in failed)
    assert sum(m["invalid"] for m in merged) == len(failed)
    kept = [s for s in samples.values() if s["status"] == "kept"]
    assert len(kept) == 3

    # Conflicting extra types (string in CSV, int in JSONL -> text there too) and a column only one
    # file has: one schema for all shards.
    assert extra.field("n").type == pa.string() and extra.field("only1").type == pa.string()
    schemas = {pq.read_schema(p) for m in merged for p in m["files"]}
    assert len(schemas) == 1


def test_scatter_merge_is_deterministic(tmp_path):
    f1, f2, _ = _two_inputs(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    _, _, _, first = _plan(tmp_path / "x", [str(f1), str(f2)], num_buckets=3)
    _, _, _, again = _plan(tmp_path / "y", [str(f1), str(f2)], num_buckets=3, flush_rows=1)
    assert first == again


def test_scatter_merge_typed_extras_conflict(tmp_path):
    """An int column in one Parquet file and a string column in another become strings."""
    p1, p2 = tmp_path / "1.parquet", tmp_path / "2.parquet"
    pq.write_table(pa.table({"url": ["http://e.com/1.jpg", "http://e.com/2.jpg"], "caption": ["x", "y"],
                             "width": pa.array([640, 800], pa.int64()), "score": [0.5, 0.25]}), p1)
    pq.write_table(pa.table({"url": ["http://e.com/3.jpg"], "caption": ["z"],
                             "width": ["1024px"], "score": pa.array([None], pa.null())}), p2)
    _, extra, merged, samples = _plan(tmp_path, [str(p1), str(p2)], num_buckets=2)
    assert extra.field("width").type == pa.string()
    assert extra.field("score").type == pa.float64()  # a null column does not force a conflict
    by_url = {s["url"]: s for s in samples.values()}
    assert by_url["http://e.com/1.jpg"]["width"] == "640"
    assert by_url["http://e.com/3.jpg"]["width"] == "1024px"
    assert by_url["http://e.com/2.jpg"]["score"] == 0.25 and by_url["http://e.com/3.jpg"]["score"] is None


def test_merge_rows_orders_by_file_then_row_whatever_the_arrival_order():
    from operators.sources import merge_rows

    sid = sample_id_of(URL_A)
    rows = pa.table({
        "sample_id": [sid, sid, sid],
        "url": [URL_A] * 3,
        "url_original": ["third", "first", "second"],
        "captions": [["late"], ["same", "same"], ["mid", "same"]],
        "caption_sources": [["caption"], ["caption", "title"], ["caption", "caption"]],
        "input_file": ["f2", "f1", "f1"],
        "input_row": pa.array([0, 3, 7], pa.int64()),
        "status": ["kept"] * 3,
        "drop_reason": pa.array([None] * 3, pa.string()),
        "error_message": pa.array([None] * 3, pa.string()),
        "k": ["c", "a", "b"],
    })
    out = merge_rows(rows, pa.schema([("k", pa.string())])).to_pylist()
    assert len(out) == 1
    s = out[0]
    assert (s["url_original"], s["k"], s["input_file"], s["input_row"]) == ("first", "a", "f1", 3)
    # The same text from another column is another (caption, source) pair: both kept.
    assert s["captions"] == ["same", "same", "mid", "late"]
    assert s["caption_sources"] == ["caption", "title", "caption", "caption"]
    assert s["n_input_rows"] == 3


def test_unify_extra_schema_and_conform():
    s1 = pa.schema([("n", pa.int64()), ("x", pa.null()), ("status", pa.string()), ("f", pa.float32())])
    s2 = pa.schema([("n", pa.string()), ("x", pa.int32()), ("y", pa.bool_()), ("f", pa.float32())])
    u = unify_extra_schema([s1, s2])
    assert u.names == ["n", "x", "f", "y"]  # reserved names are not extras
    assert [u.field(k).type for k in u.names] == [pa.string(), pa.int32(), pa.float32(), pa.bool_()]
    assert unify_extra_schema([pa.schema([("z", pa.null())])]).field("z").type == pa.string()

    t = pa.table({"sample_id": ["s1", "s2"], "n": pa.array([7, None], pa.int64()),
                  "f": pa.array([1.5, 2.5], pa.float32())})
    out = conform(t, u)
    assert out.schema.field("n").type == pa.string() and out.column("n").to_pylist() == ["7", None]
    assert out.column("x").to_pylist() == [None, None] and out.schema.field("x").type == pa.int32()
    assert out.schema.field("y").type == pa.bool_()
    assert out.column("sample_id").to_pylist() == ["s1", "s2"]

    nested = pa.table({"n": pa.array([{"k": 1}], pa.struct([("k", pa.int64())]))})
    assert json.loads(conform(nested, pa.schema([("n", pa.string())])).column("n")[0].as_py()) == {"k": 1}


def test_merge_empty_bucket(tmp_path):
    f1, f2, _ = _two_inputs(tmp_path)
    # With many buckets most are empty: they merge to no samples and fail nothing.
    _, _, merged, samples = _plan(tmp_path, [str(f1), str(f2)], num_buckets=64)
    empty = [m for m in merged if m["samples"] == 0]
    assert empty and all(m["rows"] == 0 and m["invalid"] == 0 for m in empty)
    assert sum(s["n_input_rows"] for s in samples.values()) == 11


# --- expand_paths ----------------------------------------------------------------------
def _touch(path: Path, text: str = "url\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_expand_paths_globs_dirs_and_files(tmp_path):
    for name in ("a/1.csv", "a/2.csv", "a/3.jsonl", "d/x.parquet", "d/sub/y.parquet", "d/_SUCCESS",
                 "d/.hidden.parquet", "d/_temporary/0/z.parquet", "d/.cache/w.parquet", "single.tsv"):
        _touch(tmp_path / name)
    files = expand_paths(SourceConfig(paths=[str(tmp_path / "a" / "*.csv")]), None)
    assert files == [str(tmp_path / "a" / "1.csv"), str(tmp_path / "a" / "2.csv")]

    files = expand_paths(SourceConfig(paths=[str(tmp_path / "d")]), None)
    assert files == [str(tmp_path / "d" / "sub" / "y.parquet"), str(tmp_path / "d" / "x.parquet")]

    files = expand_paths(SourceConfig(paths=[str(tmp_path / "single.tsv"), str(tmp_path / "a" / "?.jsonl")]), None)
    assert files == [str(tmp_path / "single.tsv"), str(tmp_path / "a" / "3.jsonl")]  # pattern order kept


def test_expand_paths_missing(tmp_path):
    _touch(tmp_path / "a.csv")
    missing = str(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        expand_paths(SourceConfig(paths=[str(tmp_path / "a.csv"), missing]), None)
    pattern = str(tmp_path / "*.parquet")
    with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
        expand_paths(SourceConfig(paths=[pattern]), None)


def test_source_config_rejects_empty_paths():
    with pytest.raises(ValueError, match="paths"):
        SourceConfig(paths=[])
    with pytest.raises(ValueError, match="empty input path"):
        SourceConfig(paths=["a.csv", "  "])


def test_counter_of_reasons_matches_rows(tmp_path):
    """normalize_rows gives each unusable row its own id and a reason; kept rows share ids by URL."""
    path = tmp_path / "in.csv"
    _write_csv(path, [{"url": u, "caption": "c"} for u in
                      [URL_A, "HTTP://Example.com/a.jpg", "", "mailto:x@y.z", "http://exa mple.com/"]])
    rows = _read(path).to_pylist()
    assert Counter(r["drop_reason"] for r in rows) == Counter(
        {None: 2, "missing_url": 1, "unsupported_scheme": 1, "invalid_url": 1})
    assert rows[0]["sample_id"] == rows[1]["sample_id"]
    assert len({r["sample_id"] for r in rows[2:]}) == 3
