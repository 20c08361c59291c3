"""Incremental refresh (``refresh:`` in the job config; jobs/refresh.py drives it): what a refresh
knows of the samples already seen, the bucket-by-bucket anti-join of a new crawl against them,
and the two phase-2 steps it runs first over old and new samples together: takedowns and
re-checks.

**Seen ids.** Every snapshot records where the sample ids its lineage has decided on (kept or
dropped) live, by hash-prefix bucket (``operators.sources.bucket_of``): a snapshot of
``imgcurate run`` points at that run's plan (``plan/samples/bucket=NNNNN/part-*.parquet``, every
sample the crawl held); a snapshot of a refresh at its own ``seen/bucket=NNNNN.parquet`` (the
parent's seen ids of the bucket plus the refresh's new ones). The anti-join runs one Ray task per
group of buckets: a task reads the new crawl's samples of a bucket and the seen ids of that same
bucket (one bucket's ids in memory, never a global set), writes the new ones as sample shards of
``plan.shard_rows`` rows (``delta/bucket=NNNNN/``, the layout phase 1 reads) and the union as the
refresh's seen ids of the bucket.

**Takedowns** (``TakedownStep``, phase 2's first step): lists of image URLs (normalized as the
plan does, so compared by ``sample_id``), of image sha256 (the image stage's hash of the
downloaded bytes) and of 64-bit perceptual hashes (``operators/phash.py``, imagehash's ``phash``,
as 16 hex digits or a signed integer) matched within ``refresh.takedown_phash_distance`` bits, as
the hash lists Re-LAION-5B was cleaned with. The phash match is exact for any distance below 64:
the hash is cut into ``distance + 1`` blocks and by the pigeonhole principle a hash within the
distance equals an entry on at least one block, so only rows sharing a block with some entry are
compared bit by bit. A list file is plain text (one entry per line, ``#`` comments) or CSV /
Parquet with a ``url`` / ``sha256`` / ``phash`` column.

**Re-checks** (``RecheckStep``, second): a seeded fraction of the old samples still kept (a new
slice each refresh: the draw hashes the sample id with the refresh's version) is requested again
through the download operator with the job's download config (its SSRF guard and opt-out
headers). A sample whose answer is now a permanent drop (an ``X-Robots-Tag`` opt-out, not an
image, an SSRF block, too large) or one of ``refresh.recheck_dead_reasons`` (404, 410, DNS
failure, ...) is dropped as ``recheck_<reason>``; a transient failure (timeout, 5xx, reset) keeps it
and is counted as inconclusive.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from operators.base import DROPPED, KEPT, DropReason
from operators.phase2 import FILE_COLUMN, Phase2Step, StepResult, drops
from operators.sources import bucket_of, normalize_url, sample_id_of
from operators.storage import StorageConfig, fsspec_fs, join

log = logging.getLogger(__name__)

REFRESH_STAGE = "refresh"
TAKEDOWN_URL = DropReason("takedown_url", DROPPED, "the image URL is on a takedown list (refresh.takedown_urls)")
TAKEDOWN_SHA256 = DropReason("takedown_sha256", DROPPED,
                             "the image bytes' sha256 is on a takedown list (refresh.takedown_sha256)")
TAKEDOWN_PHASH = DropReason("takedown_phash", DROPPED, "the image's pHash is within refresh.takedown_phash_distance "
                                                       "bits of a takedown list entry (refresh.takedown_phash)")
RECHECK = DropReason("recheck_{reason}", DROPPED, "an old sample re-requested by a refresh now fails for good: the "
                                                  "download's reason (an opt-out, a dead link, ...)")
REFRESH_REASONS = (TAKEDOWN_URL, TAKEDOWN_SHA256, TAKEDOWN_PHASH, RECHECK)
SEEN_DIR = "seen"
DELTA_DIR = "delta"


class RefreshConfig(BaseModel):
    """``imgcurate refresh``: process only the new samples of a crawl, re-check old ones, apply takedowns."""

    model_config = ConfigDict(extra="forbid")

    recheck_fraction: float = Field(0.01, ge=0, le=1, description="fraction of the old kept samples re-requested "
                                                                  "by each refresh (a new seeded slice each time)")
    recheck_dead_reasons: list[str] = Field(
        default_factory=lambda: ["http_404", "http_410", "http_451", "http_403", "dns_error"],
        description="download reasons of a re-check that drop an old sample, besides every permanent drop "
                    "(opt-out, not an image, SSRF, too large); others (timeouts, 5xx) keep it")
    takedown_urls: list[str] = Field(default_factory=list, description="files or globs listing image URLs to take "
                                                                        "down (text lines, or CSV/Parquet column url)")
    takedown_sha256: list[str] = Field(default_factory=list, description="files or globs listing image sha256 "
                                                                          "(hex) to take down")
    takedown_phash: list[str] = Field(default_factory=list, description="files or globs listing 64-bit pHashes "
                                                                         "(16 hex digits or integers) to take down")
    takedown_phash_distance: int = Field(4, ge=0, le=32, description="a pHash within this many bits of an entry "
                                                                     "is taken down")
    keep_versions: int = Field(0, ge=0, description="committed snapshots kept after a refresh publishes (the "
                                                    "oldest go first; 0 keeps every one)")
    antijoin_buckets_per_task: int = Field(16, ge=1, description="buckets one anti-join task handles")


# --- seen ids and the anti-join ----------------------------------------------------------------------
def seen_of_plan(plan_dir: str, plan: dict) -> dict:
    """The seen-ids reference of a run's plan (``imgcurate run``: every sample of its crawl, in its
    sample shards ``<plan>/samples/bucket=NNNNN/part-*.parquet``)."""
    return {"kind": "plan", "dir": join(plan_dir, "samples"), "num_buckets": len(plan["buckets"])}


def seen_files(seen: dict | None, bucket: int, storage: StorageConfig | None = None) -> list[str]:
    """The files holding the seen ids of ``bucket`` (column ``sample_id``)."""
    if not seen:
        return []
    if seen["kind"] == "plan":
        d = join(seen["dir"], f"bucket={bucket:05d}")
        fs, p = fsspec_fs(d, storage)
        proto = d.split("://", 1)[0] + "://" if "://" in d else ""
        return [proto + f for f in sorted(fs.find(p)) if f.endswith(".parquet")] if fs.exists(p) else []
    return [join(seen["dir"], f"bucket={bucket:05d}.parquet")]


def _ids(files: list[str], storage) -> pa.Array:
    out = []
    for f in files:
        fs, p = fsspec_fs(f, storage)
        if not fs.exists(p):
            continue
        with fs.open(p, "rb") as fh:
            out.append(pq.read_table(fh, columns=["sample_id"]).column("sample_id").combine_chunks())
    return pa.concat_arrays(out) if out else pa.array([], pa.string())


def antijoin_buckets(buckets: list[dict], seen: dict | None, delta_dir: str, seen_dir: str, shard_rows: int,
                     storage: StorageConfig | None) -> list[dict]:
    """One task's buckets: the new crawl's samples not seen before, as sample shards, and the
    union of the seen ids (see the module docstring). Idempotent: a retried task rewrites its files."""
    out = []
    for b in buckets:
        k = int(b["bucket"])
        tables = []
        for f in b["files"]:
            fs, p = fsspec_fs(f, storage)
            with fs.open(p, "rb") as fh:
                tables.append(pq.read_table(fh))
        new = pa.concat_tables(tables, promote_options="permissive") if tables else None
        known = _ids(seen_files(seen, k, storage), storage)
        if new is not None and new.num_rows:
            fresh = pc.invert(pc.is_in(new.column("sample_id"), value_set=known)) if len(known) else \
                pa.array(np.ones(new.num_rows, bool))
            delta = new.filter(fresh)
        else:
            delta = new
        bdir = join(delta_dir, f"bucket={k:05d}")
        fs, p = fsspec_fs(bdir, storage)
        if fs.exists(p):
            fs.rm(p, recursive=True)
        files = []
        if delta is not None and delta.num_rows:
            fs.makedirs(p, exist_ok=True)
            for n, start in enumerate(range(0, delta.num_rows, shard_rows)):
                path = join(bdir, f"part-{n:05d}.parquet")
                sfs, sp = fsspec_fs(path, storage)
                with sfs.open(sp, "wb") as fh:
                    pq.write_table(delta.slice(start, shard_rows), fh)
                files.append(path)
        added = delta.column("sample_id").combine_chunks() if delta is not None and delta.num_rows else \
            pa.array([], pa.string())
        union = pc.unique(pa.concat_arrays([known.cast(pa.string()), added.cast(pa.string())]))
        union = union.take(pc.sort_indices(union))
        spath = join(seen_dir, f"bucket={k:05d}.parquet")
        sfs, sp = fsspec_fs(spath, storage)
        sfs.makedirs(posixpath.dirname(sp), exist_ok=True)
        with sfs.open(sp, "wb") as fh:
            pq.write_table(pa.table({"sample_id": union}), fh)
        n_new = 0 if new is None else new.num_rows
        out.append({"bucket": k, "samples": 0 if delta is None else delta.num_rows, "files": files,
                    "crawl_samples": n_new, "known": n_new - (0 if delta is None else delta.num_rows),
                    "seen": len(union)})
    return out


# --- takedown lists ------------------------------------------------------------------------------------
def _list_files(patterns: list[str], storage) -> list[str]:
    out = []
    for pat in patterns:
        fs, p = fsspec_fs(pat, storage)
        proto = pat.split("://", 1)[0] + "://" if "://" in pat else ""
        if any(c in p for c in "*?["):  # a folder of lists may be empty this time
            hits = sorted(fs.glob(p))
            if not hits:
                log.warning("refresh: takedown list glob %r matches no file", pat)
        else:
            hits = [p]
            if not fs.exists(p):
                raise FileNotFoundError(f"refresh: takedown list {pat!r} does not exist")
        out += [proto + h if proto else h for h in hits]
    return out


def read_list(patterns: list[str], column: str, storage: StorageConfig | None = None) -> list[str]:
    """The entries of takedown list files: Parquet / CSV (column ``column``, else the first) or
    text (one a line; blank lines and ``#`` comments skipped)."""
    values: list[str] = []
    for path in _list_files(patterns, storage):
        fs, p = fsspec_fs(path, storage)
        with fs.open(p, "rb") as fh:
            data = fh.read()
        if path.endswith(".parquet"):
            t = pq.read_table(io.BytesIO(data))
            col = t.column(column if column in t.column_names else t.column_names[0])
            values += [str(v) for v in col.to_pylist() if v is not None]
            continue
        text = data.decode("utf-8-sig", errors="replace")
        if path.endswith(".csv"):
            rows = list(csv.reader(io.StringIO(text)))
            if rows and column in rows[0]:
                k = rows[0].index(column)
                rows = rows[1:]
            else:
                k = 0
            values += [r[k].strip() for r in rows if len(r) > k and r[k].strip()]
            continue
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                values.append(line)
    return values


def parse_phash(value: str) -> int:
    """A pHash as 16 hex digits (imagehash's ``str(hash)``), ``0x...`` or a (signed) integer -> signed int64."""
    v = value.strip().lower()
    try:
        if v.startswith("0x"):
            n = int(v, 16)
        elif len(v) == 16 and all(c in "0123456789abcdef" for c in v):  # imagehash's form (even all digits)
            n = int(v, 16)
        else:
            n = int(v)
    except ValueError:
        raise ValueError(f"refresh: {value!r} is not a pHash (16 hex digits or an integer)") from None
    if not -(1 << 63) <= n < (1 << 64):
        raise ValueError(f"refresh: {value!r} is not a 64-bit pHash")
    n &= (1 << 64) - 1
    return n - (1 << 64) if n >= 1 << 63 else n


class PhashIndex:
    """Exact Hamming-distance lookup of 64-bit hashes within ``distance`` (pigeonhole blocks)."""

    def __init__(self, hashes: list[int], distance: int):
        self.distance = distance
        self.values = np.asarray(hashes, np.int64).view(np.uint64)
        nblocks = distance + 1
        self.bounds = [(64 * j // nblocks, 64 * (j + 1) // nblocks) for j in range(nblocks)]
        self.tables = []
        for lo, hi in self.bounds:
            keys = self._block(self.values, lo, hi)
            table: dict[int, list[int]] = {}
            for i, key in enumerate(keys.tolist()):
                table.setdefault(key, []).append(i)
            self.tables.append((table, np.fromiter(table.keys(), np.uint64, len(table))))

    @staticmethod
    def _block(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
        return (v >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)

    def match(self, hashes: np.ndarray) -> np.ndarray:
        """Per query hash, the index of an entry within the distance, or -1."""
        q = np.asarray(hashes, np.int64).view(np.uint64)
        found = np.full(len(q), -1, np.int64)
        if not len(self.values) or not len(q):
            return found
        for (lo, hi), (table, keys) in zip(self.bounds, self.tables):
            qb = self._block(q, lo, hi)
            cand = np.flatnonzero(np.isin(qb, keys) & (found < 0))
            for r in cand.tolist():
                for i in table[int(qb[r])]:
                    if bin(int(q[r] ^ self.values[i])).count("1") <= self.distance:
                        found[r] = i
                        break
        return found


class Takedowns:
    """The takedown lists of a refresh, loaded once in the driver."""

    def __init__(self, cfg: RefreshConfig, max_url_length: int = 2048, storage: StorageConfig | None = None):
        self.url_ids: dict[str, str] = {}
        bad = 0
        for raw in read_list(cfg.takedown_urls, "url", storage):
            url, _ = normalize_url(raw, max_url_length)
            if url is None:
                bad += 1
                continue
            self.url_ids[sample_id_of(url)] = url
        if bad:
            log.warning("refresh: %d takedown URLs are not valid URLs (skipped)", bad)
        self.sha256 = {v.strip().lower() for v in read_list(cfg.takedown_sha256, "sha256", storage)}
        self.phashes = [parse_phash(v) for v in read_list(cfg.takedown_phash, "phash", storage)]
        self.distance = cfg.takedown_phash_distance

    @property
    def empty(self) -> bool:
        return not (self.url_ids or self.sha256 or self.phashes)

    def counts(self) -> dict:
        return {"urls": len(self.url_ids), "sha256": len(self.sha256), "phash": len(self.phashes),
                "phash_distance": self.distance}


class TakedownStep(Phase2Step):
    """Phase-2 step (a refresh's first): every kept sample, old or new, on a takedown list is dropped."""

    name = "refresh.takedown"
    stage = REFRESH_STAGE
    reasons = (TAKEDOWN_URL, TAKEDOWN_SHA256, TAKEDOWN_PHASH)

    def __init__(self, takedowns: Takedowns, columns: list[str]):
        self.t = takedowns
        self.columns = [c for c in ("sha256", "phash") if c in columns]

    def reads(self) -> tuple[str, ...]:
        return tuple(self.columns)

    def run(self, ctx) -> StepResult:
        import ray

        report = self.t.counts()
        if self.t.empty:
            return StepResult(report, None)
        key = hashlib.sha256(repr((sorted(self.t.phashes), self.t.distance)).encode()).hexdigest()
        lists = ray.put((self.t.url_ids, self.t.sha256, self.t.phashes, self.t.distance, key))
        cols, reasons = self.columns, self.reasons

        def decide(t: pa.Table) -> pa.Table:
            url_ids, shas, phashes, distance, key = ray.get(lists)
            ids = t.column("sample_id").to_pylist()
            reason: list[str | None] = [TAKEDOWN_URL.name if s in url_ids else None for s in ids]
            msgs: list[str | None] = [f"takedown list: {url_ids[s]}" if s in url_ids else None for s in ids]
            if "sha256" in cols and shas:
                for k, h in enumerate(t.column("sha256").to_pylist()):
                    if reason[k] is None and h is not None and h.lower() in shas:
                        reason[k], msgs[k] = TAKEDOWN_SHA256.name, f"sha256 {h} on a takedown list"
            if "phash" in cols and phashes and t.num_rows:
                ph = t.column("phash")
                valid = np.asarray(ph.is_valid().to_numpy(zero_copy_only=False), bool)
                hashes = ph.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
                hit = _phash_index(key, phashes, distance).match(hashes)
                for k in np.flatnonzero((hit >= 0) & valid).tolist():
                    if reason[k] is None:
                        entry = phashes[int(hit[k])] & ((1 << 64) - 1)
                        reason[k] = TAKEDOWN_PHASH.name
                        msgs[k] = f"pHash within {distance} bits of takedown entry {entry:016x}"
            pick = [k for k, r in enumerate(reason) if r is not None]
            files = t.column(FILE_COLUMN).to_pylist()
            parts = [drops([files[k] for k in pick if reason[k] == r.name],
                           [ids[k] for k in pick if reason[k] == r.name], r.name,
                           [msgs[k] for k in pick if reason[k] == r.name]) for r in reasons]
            return pa.concat_tables(parts)

        return StepResult(report, ctx.alive(cols, then=decide))


_PHASH_CACHE: dict = {}


def _phash_index(key: str, phashes: list[int], distance: int) -> PhashIndex:
    """One index per worker process and list (built on first use)."""
    if key not in _PHASH_CACHE:
        _PHASH_CACHE.clear()
        _PHASH_CACHE[key] = PhashIndex(phashes, distance)
    return _PHASH_CACHE[key]


# --- re-checks ---------------------------------------------------------------------------------------
def recheck_draw(sample_ids: list[str], fraction: float, salt: str) -> np.ndarray:
    """A seeded draw of samples at ``fraction``: the same ids and salt always draw the same."""
    if fraction <= 0:
        return np.zeros(len(sample_ids), bool)
    if fraction >= 1:
        return np.ones(len(sample_ids), bool)
    cut = int(fraction * 2 ** 64)
    return np.fromiter((int.from_bytes(hashlib.blake2b(f"{salt}\0{s}".encode(), digest_size=8).digest(), "big") < cut
                        for s in sample_ids), bool, len(sample_ids))


class RecheckStep(Phase2Step):
    """Phase-2 step (a refresh's second): re-request a seeded fraction of the old kept samples."""

    name = "refresh.recheck"
    stage = REFRESH_STAGE
    reasons = (RECHECK,)

    def __init__(self, fraction: float, old_files: int, salt: str, download_config, dead_reasons: list[str]):
        self.fraction, self.old_files, self.salt = fraction, old_files, salt
        self.download, self.dead = download_config, set(dead_reasons)

    def reads(self) -> tuple[str, ...]:
        return ("url",)

    def run(self, ctx) -> StepResult:
        from ray.data import ActorPoolStrategy

        from operators.download import HttpDownloader

        report = {"fraction": self.fraction, "rechecked": 0, "dropped": 0, "inconclusive": 0, "outcomes": {}}
        if self.fraction <= 0 or self.old_files == 0:
            return StepResult(report, None)
        n_old, fraction, salt = self.old_files, self.fraction, self.salt

        def pick(t: pa.Table) -> pa.Table:
            old = pc.less(t.column(FILE_COLUMN), n_old)
            t = t.filter(old)
            t = t.filter(pa.array(recheck_draw(t.column("sample_id").to_pylist(), fraction, salt)))
            n = t.num_rows
            return t.select([FILE_COLUMN, "sample_id", "url", "status"]).append_column(
                "drop_stage", pa.nulls(n, pa.string())).append_column(
                "drop_reason", pa.nulls(n, pa.string())).append_column("error_message", pa.nulls(n, pa.string()))

        res = HttpDownloader.resources(self.download)
        lo, hi = max(1, self.download.pool_min), max(1, self.download.pool_max)
        checked = ctx.alive(["url"], then=pick).map_batches(
            HttpDownloader, fn_constructor_kwargs={"config": self.download}, batch_format="pyarrow",
            batch_size=res.batch_size, num_cpus=res.num_cpus, compute=ActorPoolStrategy(min_size=lo, max_size=hi)
        ).map_batches(lambda t: t.select([FILE_COLUMN, "sample_id", "status", "drop_reason", "error_message",
                                          "http_status"]), batch_format="pyarrow").materialize()
        dead = self.dead
        outcomes: dict[str, int] = {}
        for row in checked.groupby(["status", "drop_reason"]).count().take_all():
            key = row["status"] if row["status"] == KEPT else f"{row['status']}/{row['drop_reason']}"
            outcomes[key] = outcomes.get(key, 0) + int(row["count()"])

        def gone(status: str, why: str | None) -> bool:
            return status != KEPT and (status == DROPPED or why in dead)

        def decide(t: pa.Table) -> pa.Table:
            st, rs, msg = (t.column(c).to_pylist() for c in ("status", "drop_reason", "error_message"))
            files, ids = t.column(FILE_COLUMN).to_pylist(), t.column("sample_id").to_pylist()
            by_reason: dict[str, list[int]] = {}
            for k in range(t.num_rows):
                if gone(st[k], rs[k]):
                    by_reason.setdefault(rs[k], []).append(k)
            parts = [drops([files[k] for k in ks], [ids[k] for k in ks], RECHECK.format(reason=r),
                           [f"re-checked by a refresh: {msg[k] or r}" for k in ks]) for r, ks in by_reason.items()]
            return pa.concat_tables(parts) if parts else drops([], [], RECHECK.name, None)

        n = sum(outcomes.values())
        n_gone = sum(v for k, v in outcomes.items() if k != KEPT and gone(k.split("/", 1)[0], k.split("/", 1)[1]))
        report.update({"rechecked": n, "dropped": n_gone, "inconclusive": n - outcomes.get(KEPT, 0) - n_gone,
                       "outcomes": dict(sorted(outcomes.items()))})
        return StepResult(report, checked.map_batches(decide, batch_format="pyarrow"))


def bucket_groups(plan: dict, per_task: int) -> list[list[dict]]:
    buckets = list(plan["buckets"])
    return [buckets[k:k + per_task] for k in range(0, len(buckets), per_task)]


__all__ = ["RefreshConfig", "REFRESH_REASONS", "TakedownStep", "RecheckStep", "Takedowns", "PhashIndex",
           "antijoin_buckets", "bucket_of", "seen_of_plan", "seen_files", "read_list", "parse_phash"]
