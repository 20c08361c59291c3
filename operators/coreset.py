"""CoresetStep: keep the open-set samples nearest a target set (SimCore), or a spread of them (k-center).

**SimCore** (Kim, Bae and Yun, "Coreset Sampling from Open-Set for Fine-Grained Self-Supervised
Learning", CVPR 2023; reference code github.com/sungnyun/openssl-simcore, ``util/sampling.py``
``simcore_sampling`` / ``greedy``): k-means (here faiss) on the target's L2-normalized embeddings
gives ``k`` centroids (normalized again; with ``k >= `` the target's size the target points themselves
are the centroids, as in the reference). Then greedy rounds: in each round every centroid, in order,
takes its most similar (cosine) open-set sample not picked in an *earlier* round (two centroids may
take the same sample in one round; it counts once). The round's value is the mean over the ``k``
centroids of the similarity each one took. Stopping, as the reference code does it:

- ``stop_ratio`` (reference ``--stop_thresh 0.95``) and ``stop_round`` (reference ``--patience``):
  at round ``stop_round`` (1-based) the threshold becomes ``stop_ratio`` x that round's value; the
  first round whose value is below the threshold stops the sampling and is **not** added. Before
  round ``stop_round`` the threshold is 0 (the reference's initial value), so an earlier round with a
  negative mean similarity stops it too. ``stop_ratio: null`` turns the rule off.
- ``budget``: the round that would exceed it adds a random subset (seeded by ``seed``) of its new
  picks, just enough to reach the budget (the reference: ``np.random.choice`` of the round's set).
  Here the subset is ``numpy.random.default_rng(seed).choice(len(new), budget - picked, replace=False)``
  over the round's new picks in the order the centroids took them.
- the open set runs out (every sample picked): the reference would fail (``popleft`` on an empty
  queue); here it stops.

Ties in similarity are broken by (``_file``, ``sample_id``), so the result is one well-defined set.
Similarities are float64 dot products of the float64-normalized embeddings.

**Distributed, exactly.** No process holds the open-set x centroid matrix. Each block of the open
set (Ray Data ``map_batches`` over ``ctx.alive``) proposes, per centroid, its top-R candidates
(faiss ``IndexFlatIP`` on float32, faiss-gpu when the tasks get a GPU), rescored in float64, plus a
*floor*: every sample of the block it did not propose has a similarity at most the floor (faiss's
R-th float32 similarity plus a bound on float32's error, ``sim_margin``). A ``groupby("q")`` keeps
each centroid's global top R (and the largest floor), so the driver receives at most k x R rows.
A merged list holds *every* open-set sample above its floor, so it is a prefix of the centroid's
full ranking; the driver replays the rounds on these prefixes. If a centroid reaches the end of its
prefix before the stopping point, the R of the centroids that ran out is multiplied by 4 (by 2 for
those past half of theirs) and the shards are asked again (the replay starts over), so the picks
**equal** the single-process algorithm's (tests/test_coreset.py checks
this against a plain greedy loop over the full matrix).

**k-center greedy** (Sener and Savarese, "Active Learning for Convolutional Neural Networks: A
Core-Set Approach", ICLR 2018), ``method: kcenter``, for diversity: starting from the target's
centroids as the chosen set, repeatedly pick the open-set point farthest (least cosine-similar) from
everything chosen so far, ``budget`` times (required). Distributed: Ray actors hold the blocks and
each point's similarity to its nearest chosen point; each round is a max-reduce of their farthest
points at the driver, and the picked vector is broadcast back.

The picked ids (at most ``budget``, or what the stopping rule lets through) are the one per-sample
structure the driver holds: the coreset itself.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.base import DROPPED, DropReason
from operators.coreset_target import EmbedFn, clip_embedder, embedding_matrix, load_target, normalize
from operators.phase2 import FILE_COLUMN, Phase2Step, StepResult, drops

log = logging.getLogger(__name__)

EMBEDDING = "clip_image_embedding"
NOT_IN_CORESET = DropReason("not_in_coreset", DROPPED,
                            "not picked by the coreset step (SimCore: not among the samples nearest the target's "
                            "centroids before the budget or the stopping rule; kcenter: not among the budget's "
                            "farthest points)")
U32 = 2.0 ** -24  # float32 unit roundoff


class CoresetConfig(BaseModel):
    """Coreset step settings (``coreset:`` in the job config): phase 2's last step."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="run the coreset step (phase 2, after dedup and the selections)")
    target: str | None = Field(None, description=(
        "the target set: Parquet with an embedding column (a .parquet file or a folder of them), or a folder of "
        "images, or a URL list (.txt one URL per line; .csv/.tsv/.jsonl with target_url_column; .gz allowed) "
        "downloaded with the job's download settings; images are embedded with the job's CLIP model; local or "
        "s3://"))
    target_url_column: str = Field("url", description="URL column of a .csv/.tsv/.jsonl target URL list")
    target_column: str = Field(EMBEDDING, description="embedding column of a Parquet target (same space as the "
                                                       "open set's clip_image_embedding)")
    k: int = Field(100, ge=1, description="k-means centroids of the target (SimCore's cluster_num: 100)")
    budget: int | None = Field(None, ge=1, description="most samples to keep; null = until the stopping rule "
                                                        "(kcenter needs a budget)")
    stop_ratio: float | None = Field(0.95, gt=0, le=1, description=(
        "SimCore stops at the first round whose mean similarity is below stop_ratio x round stop_round's "
        "(reference stop_thresh 0.95); null = no stopping rule"))
    stop_round: int = Field(20, ge=1, description="the round whose mean similarity sets the stopping threshold")
    method: Literal["simcore", "kcenter"] = Field("simcore", description=(
        "simcore: nearest the target's centroids (Kim et al., 2023); kcenter: k-center greedy from the "
        "centroids, for diversity (Sener & Savarese, 2018)"))
    seed: int = Field(0, description="k-means seed and the budget round's random subset")
    candidates: int | None = Field(None, ge=1, description=(
        "first per-centroid candidates each shard proposes (R); grown where a list runs out. null = "
        "max(64, 2 * ceil(budget / k)) with a budget, else max(64, 16 * stop_round)"))
    num_gpus: float = Field(0, ge=0, description="GPUs per proposal task (faiss-gpu where installed)")

    @model_validator(mode="after")
    def _check(self):
        if self.enabled and self.target is None:
            raise ValueError("coreset.enabled needs coreset.target")
        if self.method == "kcenter" and self.budget is None:
            raise ValueError("coreset.method kcenter needs coreset.budget (k-center greedy has no stopping rule)")
        if self.enabled and self.budget is None and self.stop_ratio is None:
            raise ValueError("coreset: with neither budget nor stop_ratio every sample would be kept")
        return self


# --- the target's centroids ------------------------------------------------------------------------
def centroids_of(target: np.ndarray, k: int, seed: int = 0, niter: int = 25) -> np.ndarray:
    """``k`` k-means centroids (faiss) of the normalized target, L2-normalized (float64); the target
    itself when it has no more than ``k`` points."""
    t = np.asarray(target, np.float64)
    if len(t) <= k:
        return normalize(t)[0]
    import faiss

    km = faiss.Kmeans(t.shape[1], k, niter=niter, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(t, np.float32))
    return normalize(km.centroids.astype(np.float64))[0]


def sim_margin(dim: int) -> float:
    """A bound on |float32 faiss similarity - float64 similarity| of unit vectors: rounding the vectors
    to float32 (2u) plus the float32 dot product's error (dim * u, Higham's gamma_d), doubled."""
    return 2.0 * (dim + 4) * U32


# --- one shard's proposals -------------------------------------------------------------------------
CAND_SCHEMA = pa.schema([("q", pa.int32()), ("sim", pa.float64()), (FILE_COLUMN, pa.int32()),
                         ("sample_id", pa.string()), ("n", pa.int64())])


def open_rows(table: pa.Table, column: str = EMBEDDING) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(_file, sample_id, float64 normalized embeddings) of the rows with a usable embedding."""
    valid, x = embedding_matrix(table.column(column))
    xn, ok = normalize(x)
    files = table.column(FILE_COLUMN).to_numpy(zero_copy_only=False)[valid][ok].astype(np.int32)
    ids = np.asarray(table.column("sample_id").to_pylist(), dtype=object)[valid][ok]
    return files, ids, xn[ok]


def _search(x32: np.ndarray, c32: np.ndarray, r: int, use_gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(x32.shape[1])
    if use_gpu and getattr(faiss, "get_num_gpus", lambda: 0)() > 0 and r <= 2048:  # faiss-gpu's k limit
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x32)
    return index.search(c32, r)


def propose(table: pa.Table, centroids: np.ndarray, r_of: np.ndarray, column: str = EMBEDDING,
            use_gpu: bool = False) -> pa.Table:
    """Per centroid q: this shard's top ``r_of[q]`` samples with float64 similarities, and a floor row
    (``sample_id`` null, ``sim`` the floor: every sample not proposed is at most that similar;
    ``-inf`` when the shard proposed all of its rows). ``n`` counts the shard's usable rows (on q 0)."""
    files, ids, xn = open_rows(table, column)
    n, k = len(xn), len(centroids)
    qs, sims, fs, sids = [], [], [], []
    floors = np.full(k, -math.inf)
    if n:
        rmax = int(min(r_of.max(), n))
        if rmax >= n:  # the whole shard: exact similarities, no float32 search
            s = centroids @ xn.T
            for q in range(k):
                r = int(min(r_of[q], n))
                order = np.lexsort((ids, files, -s[q]))  # sim desc, then _file, sample_id
                top = order[:r]
                if r < n:
                    floors[q] = s[q, order[r]]
                    top = top[s[q, top] > floors[q]]
                qs.append(np.full(len(top), q)), sims.append(s[q, top]), fs.append(files[top]), sids.append(ids[top])
        else:
            d32, i32 = _search(np.ascontiguousarray(xn, np.float32), np.ascontiguousarray(centroids, np.float32),
                               rmax, use_gpu)
            margin = sim_margin(xn.shape[1])
            for q in range(k):
                r = int(min(r_of[q], n))
                cand = i32[q, :r]
                cand = cand[cand >= 0]
                exact = xn[cand] @ centroids[q]
                floors[q] = float(d32[q, r - 1]) + margin
                keep = exact > floors[q]
                cand = cand[keep]
                qs.append(np.full(len(cand), q)), sims.append(exact[keep]), fs.append(files[cand])
                sids.append(ids[cand])
    q_all = np.concatenate(qs) if qs else np.zeros(0, np.int64)
    cands = pa.table({"q": pa.array(q_all, pa.int32()),
                      "sim": pa.array(np.concatenate(sims) if sims else np.zeros(0), pa.float64()),
                      FILE_COLUMN: pa.array(np.concatenate(fs) if fs else np.zeros(0, np.int32), pa.int32()),
                      "sample_id": pa.array(list(np.concatenate(sids)) if sids else [], pa.string()),
                      "n": pa.array(np.zeros(len(q_all), np.int64))}, schema=CAND_SCHEMA)
    floor_rows = pa.table({"q": pa.array(np.arange(k), pa.int32()), "sim": pa.array(floors, pa.float64()),
                           FILE_COLUMN: pa.nulls(k, pa.int32()), "sample_id": pa.nulls(k, pa.string()),
                           "n": pa.array([n] + [0] * (k - 1), pa.int64())}, schema=CAND_SCHEMA)
    return pa.concat_tables([cands, floor_rows])


def _ranked(t: pa.Table) -> pa.Table:
    return t.take(pc.sort_indices(t, sort_keys=[("sim", "descending"), (FILE_COLUMN, "ascending"),
                                                ("sample_id", "ascending")]))


def merge_proposals(group: pa.Table, r_of: np.ndarray) -> pa.Table:
    """One centroid's proposals from every shard: its global top R above the largest floor."""
    q = int(group.column("q")[0].as_py())
    is_floor = pc.is_null(group.column("sample_id"))
    floor_rows = group.filter(is_floor)
    floor = max(floor_rows.column("sim").to_pylist() or [-math.inf])
    n = int(pc.sum(floor_rows.column("n")).as_py() or 0)
    cands = _ranked(group.filter(pc.invert(is_floor)))
    sims = cands.column("sim").to_numpy()
    r = int(r_of[q])
    if len(sims) > r:
        floor = max(floor, float(sims[r]))
    cands = cands.filter(pa.array(sims > floor))
    floor_row = pa.table({"q": pa.array([q], pa.int32()), "sim": pa.array([floor], pa.float64()),
                          FILE_COLUMN: pa.nulls(1, pa.int32()), "sample_id": pa.nulls(1, pa.string()),
                          "n": pa.array([n], pa.int64())}, schema=CAND_SCHEMA)
    return pa.concat_tables([cands, floor_row])


# --- the rounds, replayed on the candidate prefixes ----------------------------------------------
@dataclass
class Prefixes:
    """Per centroid, the head of its ranking: keys ``(_file, sample_id)`` and similarities, complete
    above ``floors[q]`` (``-inf``: the centroid's whole ranking)."""

    keys: list[list[tuple[int, str]]]
    sims: list[np.ndarray]
    floors: np.ndarray
    scored: int = 0  # usable open-set rows


@dataclass
class Rounds:
    picks: list[tuple[int, str]] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # mean similarity of each added round
    stop_reason: str = ""
    threshold: float | None = None
    stopped_value: float | None = None  # the value of the round that stopped it (not added)
    starving: list[int] = field(default_factory=list)  # centroids whose prefix ran out: fetch more
    scored: int = 0  # usable open-set rows
    used: list[int] = field(default_factory=list)  # how far into its prefix each centroid got


def prefixes_of(merged: pa.Table, k: int) -> Prefixes:
    keys: list[list] = [[] for _ in range(k)]
    sims = [np.zeros(0) for _ in range(k)]
    floors = np.full(k, -math.inf)
    scored = 0
    is_floor = pc.is_null(merged.column("sample_id"))
    for row in merged.filter(is_floor).to_pylist():
        floors[row["q"]] = row["sim"]
        scored += row["n"]
    cands = merged.filter(pc.invert(is_floor))
    cands = cands.take(pc.sort_indices(cands, sort_keys=[("q", "ascending"), ("sim", "descending"),
                                                         (FILE_COLUMN, "ascending"), ("sample_id", "ascending")]))
    q = cands.column("q").to_numpy()
    s = cands.column("sim").to_numpy()
    f = cands.column(FILE_COLUMN).to_pylist()
    i = cands.column("sample_id").to_pylist()
    bounds = np.searchsorted(q, np.arange(k + 1))
    for c in range(k):
        a, b = bounds[c], bounds[c + 1]
        keys[c] = list(zip(f[a:b], i[a:b]))
        sims[c] = s[a:b]
    return Prefixes(keys, sims, floors, scored)


def replay_rounds(p: Prefixes, budget: int | None, stop_ratio: float | None, stop_round: int,
                  seed: int) -> Rounds:
    """SimCore's greedy rounds (module docstring) on the prefixes; ``starving`` lists the centroids
    whose prefix ran out before the stopping point (then nothing else is meaningful)."""
    out = Rounds(used=[0] * len(p.keys))
    _replay(p, out, budget, stop_ratio, stop_round, seed)
    return out


def _replay(p: Prefixes, out: Rounds, budget, stop_ratio, stop_round, seed) -> None:
    k = len(p.keys)
    picked: set = set()
    ptr = out.used  # updated in place: the caller sees how far each centroid got
    threshold = 0.0
    r = 0
    while budget is None or len(out.picks) < budget:
        r += 1
        new: list = []
        new_set: set = set()
        total = 0.0
        for q in range(k):
            keys, j = p.keys[q], ptr[q]
            while j < len(keys) and keys[j] in picked:
                j += 1
            if j == len(keys):
                if p.floors[q] != -math.inf:
                    out.starving.append(q)
                    continue
                out.stop_reason = "exhausted"  # the whole ranking is picked: so is the whole open set
                return
            ptr[q] = j + 1
            total += float(p.sims[q][j])
            if keys[j] not in new_set:
                new_set.add(keys[j])
                new.append(keys[j])
        if out.starving:
            return
        value = total / k
        if stop_ratio is not None:
            if r == stop_round:
                threshold = value * stop_ratio
                out.threshold = threshold
            if value < threshold:
                out.stop_reason, out.stopped_value = "similarity", value
                return
        if budget is not None and len(out.picks) + len(new) > budget:
            need = budget - len(out.picks)
            chosen = np.sort(np.random.default_rng(seed).choice(len(new), size=need, replace=False))
            new = [new[c] for c in chosen]
            out.stop_reason = "budget"
        out.picks.extend(new)
        picked.update(new)
        out.values.append(value)
    out.stop_reason = out.stop_reason or "budget"


def first_candidates(cfg: CoresetConfig, k: int) -> int:
    if cfg.candidates is not None:
        return cfg.candidates
    if cfg.budget is not None:
        return max(64, 2 * -(-cfg.budget // k))
    return max(64, 16 * cfg.stop_round)


# --- k-center greedy ------------------------------------------------------------------------------
class _KCenterShard:
    """Ray actor: some blocks of the open set and each point's similarity to its nearest chosen point."""

    def __init__(self, column: str, centers: np.ndarray, *blocks: pa.Table):
        parts = [open_rows(b, column) for b in blocks if b.num_rows]
        d = centers.shape[1]
        self.files = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
        self.ids = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, object)
        self.x = np.concatenate([p[2] for p in parts]) if parts else np.zeros((0, d))
        self.near = np.full(len(self.x), -math.inf)
        for s in range(0, len(centers), 256):
            if len(self.x):
                self.near = np.maximum(self.near, (self.x @ centers[s:s + 256].T).max(axis=1))

    def size(self) -> int:
        return len(self.x)

    def farthest(self):
        """(similarity to the chosen set, _file, sample_id, vector) of this shard's farthest point."""
        if not len(self.x):
            return None
        m = self.near.min()
        if m == math.inf:
            return None
        tied = np.flatnonzero(self.near == m)
        j = min(tied, key=lambda t: (int(self.files[t]), self.ids[t]))
        return float(m), int(self.files[j]), str(self.ids[j]), self.x[j]

    def add(self, center: np.ndarray, file: int, sample_id: str) -> None:
        if len(self.x):
            self.near = np.maximum(self.near, self.x @ center)
            self.near[(self.files == file) & (self.ids == sample_id)] = math.inf  # picked: never again


def kcenter_greedy(blocks: list, centers: np.ndarray, budget: int, column: str = EMBEDDING,
                   shards: int = 2) -> tuple[list[tuple[int, str]], list[float]]:
    """k-center greedy over Ray-held blocks (object refs or tables): the picks, in order, and each
    pick's similarity to the chosen set when it was picked."""
    import ray

    actor = ray.remote(num_cpus=0)(_KCenterShard)
    groups = [blocks[s::shards] for s in range(min(shards, len(blocks)))] or [[]]
    actors = [actor.remote(column, centers, *g) for g in groups]
    picks, sims = [], []
    for _ in range(budget):
        best = None
        for cand in ray.get([a.farthest.remote() for a in actors]):
            if cand is not None and (best is None or (cand[0], cand[1], cand[2]) < (best[0], best[1], best[2])):
                best = cand
        if best is None:
            break
        sim, f, sid, vec = best
        picks.append((f, sid))
        sims.append(sim)
        ray.get([a.add.remote(vec, f, sid) for a in actors])
    for a in actors:
        ray.kill(a)
    return picks, sims


# --- the phase-2 step -----------------------------------------------------------------------------
def _drop_unpicked(t: pa.Table, picked: dict, message: str) -> pa.Table:
    files = t.column(FILE_COLUMN).to_pylist()
    ids = t.column("sample_id").to_pylist()
    sel = [j for j, (f, i) in enumerate(zip(files, ids)) if i not in picked.get(f, ())]
    return drops([files[j] for j in sel], [ids[j] for j in sel], NOT_IN_CORESET.name, message)


class CoresetStep(Phase2Step):
    """Phase-2 step: keep the coreset (module docstring), drop every other kept sample."""

    name = "coreset"
    stage = "coreset"
    reasons = (NOT_IN_CORESET,)

    def __init__(self, config: CoresetConfig | dict, clip_config=None, embed: EmbedFn | None = None,
                 download_config=None):
        self.config = config if isinstance(config, CoresetConfig) else CoresetConfig(**config)
        if self.config.target is None:
            raise ValueError("CoresetStep needs coreset.target")
        self.clip_config = clip_config
        self.embed = embed
        self.download_config = download_config  # a URL-list target is fetched with the job's download settings

    def reads(self) -> tuple[str, ...]:
        return (EMBEDDING,)

    def _target(self, storage):
        embed = self.embed
        if embed is None and self.clip_config is not None:
            cfg = self.clip_config
            lazy: dict = {}

            def embed(blobs):  # the model is built only when the target is images (a folder or URLs)
                if "fn" not in lazy:
                    lazy["fn"] = clip_embedder(cfg, storage)
                return lazy["fn"](blobs)
        return load_target(self.config.target, self.config.target_column, storage, embed,
                           download=self.download_config, url_column=self.config.target_url_column)

    def run(self, ctx) -> StepResult:
        import ray

        cfg = self.config
        target = self._target(ctx.storage)
        centers = centroids_of(target.vectors, cfg.k, cfg.seed)
        report = {"method": cfg.method, "target": cfg.target, "target_kind": target.kind,
                  "target_rows": len(target.vectors), "target_skipped": target.skipped, "centroids": len(centers),
                  "budget": cfg.budget}
        if target.reasons is not None:
            report["target_failed"] = target.reasons
        if cfg.method == "kcenter":
            blocks = ctx.alive([EMBEDDING]).to_arrow_refs()
            picks, sims = kcenter_greedy(blocks, centers, cfg.budget, EMBEDDING, ctx.parallelism)
            report.update({"picked": len(picks),
                           "last_pick_similarity": sims[-1] if sims else None,
                           "first_pick_similarity": sims[0] if sims else None})
            message = f"not among the {len(picks)} k-center picks"
        else:
            rounds, passes, r_of = self._simcore(ctx, centers)
            picks = rounds.picks
            report.update({"stop_ratio": cfg.stop_ratio, "stop_round": cfg.stop_round, "scored": rounds.scored,
                           "picked": len(picks), "rounds": len(rounds.values), "stop_reason": rounds.stop_reason,
                           "threshold": rounds.threshold, "stopped_round_similarity": rounds.stopped_value,
                           "round_similarity": [round(v, 6) for v in rounds.values[:100]],
                           "mean_pick_rounds_similarity": float(np.mean(rounds.values)) if rounds.values else None,
                           "candidate_passes": passes, "candidates_max": int(r_of.max())})
            message = f"not among the {len(picks)} SimCore picks ({rounds.stop_reason})"
        picked: dict = {}
        for f, i in picks:
            picked.setdefault(f, set()).add(i)
        ref = ray.put(picked)
        decisions = ctx.alive([]).map_batches(lambda t: _drop_unpicked(t, ray.get(ref), message),
                                              batch_format="pyarrow")
        return StepResult(report, decisions)

    def _simcore(self, ctx, centers: np.ndarray):
        cfg = self.config
        k = len(centers)
        r_of = np.full(k, first_candidates(cfg, k), np.int64)
        passes = 0
        while True:
            passes += 1
            merged = propose_all(ctx.alive([EMBEDDING]), centers, r_of, ctx.parallelism, cfg.num_gpus)
            pre = prefixes_of(merged, k)
            rounds = replay_rounds(pre, cfg.budget, cfg.stop_ratio, cfg.stop_round, cfg.seed)
            rounds.scored = pre.scored
            if not rounds.starving:
                return rounds, passes, r_of
            log.info("coreset: %d centroids ran out of candidates at R=%d; asking the shards again",
                     len(rounds.starving), int(r_of[rounds.starving].max()))
            r_of[:] = grown(r_of, rounds, pre)


def grown(r_of: np.ndarray, rounds: Rounds, pre: Prefixes) -> np.ndarray:
    """Next pass's R: x4 for the centroids that ran out, x2 for those past half of their prefix
    (each pass reads the whole open set, so fewer, larger passes)."""
    out = r_of.copy()
    for q in range(len(r_of)):
        if q in rounds.starving:
            out[q] = 4 * r_of[q]
        elif rounds.used[q] * 2 > len(pre.keys[q]) and pre.floors[q] != -math.inf:
            out[q] = 2 * r_of[q]
    return out


def propose_all(ds, centers: np.ndarray, r_of: np.ndarray, partitions: int, num_gpus: float = 0) -> pa.Table:
    """Every shard's proposals merged per centroid (at most k x R rows reach the caller)."""
    import ray

    use_gpu = num_gpus > 0
    extra = {"num_gpus": num_gpus} if use_gpu else {}
    props = ds.map_batches(lambda t: propose(t, centers, r_of, EMBEDDING, use_gpu), batch_format="pyarrow",
                           batch_size=None, **extra)
    merged = props.groupby("q", num_partitions=max(1, min(partitions, len(centers)))).map_groups(
        lambda g: merge_proposals(g, r_of), batch_format="pyarrow")
    parts = [t for t in ray.get(merged.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(parts) if parts else CAND_SCHEMA.empty_table()
