"""kNN indices (operators/index.py): every type the chooser picks reaches recall@10 >= 0.95 against
exact search (numpy, here) on fresh queries of clustered random data; the id map round-trips; build
and search through the loopback S3 server; add and remove keep recall and the id map right; search
by text and by image with the tiny random CLIP finds planted neighbours (through the CLI)."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.index import (IndexConfig, add_to_index, build_index, choose, load_index, remove_from_index)

DIM = 32
CENTRES = 40


def centres(seed=0):
    c = np.random.default_rng(seed).normal(size=(CENTRES, DIM))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def clustered(n, seed, spread=0.35):
    rng = np.random.default_rng(seed)
    x = centres()[rng.integers(0, CENTRES, n)] + spread * rng.normal(size=(n, DIM)) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_files(folder, x, per_file, prefix="s", nulls=(), first=0):
    folder.mkdir(parents=True, exist_ok=True)
    files, ids = [], []
    for f, start in enumerate(range(0, len(x), per_file)):
        part = x[start:start + per_file]
        sid = [f"{prefix}{first + start + i}" for i in range(len(part))]
        mask = pa.array([start + i in nulls for i in range(len(part))])
        col = pa.FixedSizeListArray.from_arrays(pa.array(part.ravel(), pa.float32()), DIM, mask=mask)
        path = str(folder / f"part-{f:03d}.parquet")
        pq.write_table(pa.table({"sample_id": sid, "clip_image_embedding": col}), path)
        files.append(path)
        ids += sid
    return files, ids


def exact_top(x, q, k=10):
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


def recall(index, x, ids, q, k=10):
    """recall@k of the index on queries ``q`` against numpy's exact top k over ``x``."""
    truth = exact_top(x, q, k)
    got = index.search(q, k)
    hits = sum(len({ids[j] for j in t} & {h["id"] for h in g}) for t, g in zip(truth, got))
    return hits / truth.size


KINDS = {  # config that makes the chooser pick each type for 6,000 x 32 vectors
    "flat": dict(flat_max=10_000),
    "hnsw": dict(flat_max=100, hnsw_max=10_000),
    "ivf_flat": dict(flat_max=100, hnsw_max=100),
    "ivf_sq8": dict(flat_max=100, hnsw_max=100, max_memory_mb=1.2),
    "ivf_pq": dict(flat_max=100, hnsw_max=100, max_memory_mb=0.4),
}


def test_the_chooser_follows_size_and_memory():
    got = {kind: choose(6000, DIM, IndexConfig(**kw)).kind for kind, kw in KINDS.items()}
    assert got == {k: k for k in KINDS}
    big = choose(1_000_000, 512, IndexConfig())
    assert big.kind == "ivf_flat" and big.nlist == 4096  # 2 GB of floats fit the default 4 GB budget's half
    assert choose(1_000_000, 512, IndexConfig(max_memory_mb=1024)).kind == "ivf_sq8"
    pq_choice = choose(100_000_000, 512, IndexConfig())
    assert pq_choice.kind == "ivf_pq" and pq_choice.factory.startswith("OPQ")
    with pytest.raises(ValueError, match="max_memory_mb.*MB"):
        choose(10_000_000_000, 512, IndexConfig(max_memory_mb=100))
    with pytest.raises(ValueError, match="factory"):
        IndexConfig(index_type="NotAnIndex42")
    assert choose(6000, DIM, IndexConfig(index_type="IVF{nlist},Flat")).factory == "IVF128,Flat"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    x = clustered(6000, seed=1)
    files, ids = write_files(tmp_path_factory.mktemp("vectors"), x, 2000, nulls={5, 4000})
    return x, files, ids


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_type_reaches_the_recall_target(ray_session, tmp_path, data, kind):
    x, files, ids = data
    m = build_index(files, "clip_image_embedding", str(tmp_path / kind), IndexConfig(queries=200, **KINDS[kind]))
    assert m["type"] == kind and m["vectors"] == 5998  # the two null embeddings are not indexed
    assert m["tuning"]["recall_met"] and m["tuning"]["recall"] >= 0.95
    li = load_index(str(tmp_path / kind))
    keep = np.array([i not in (5, 4000) for i in range(len(x))])
    fresh = clustered(300, seed=99)  # not in the data, not used by the tuning
    assert recall(li, x[keep], [i for i, k in zip(ids, keep) if k], fresh) >= 0.95


def test_the_id_map_round_trips(ray_session, tmp_path, data):
    x, files, ids = data
    m = build_index(files, "clip_image_embedding", str(tmp_path / "flat"), IndexConfig(queries=50))
    li = load_index(str(tmp_path / "flat"))
    mapped = [li.id_of(i) for i in range(m["next_id"])]
    assert mapped == [None if i in (5, 4000) else s for i, s in enumerate(ids)]
    top = li.search(x[[0, 2500, 5999]], 1)
    assert [h[0]["id"] for h in top] == ["s0", "s2500", "s5999"]
    assert [p["source"] for p in m["id_parts"]] == files


def test_a_small_memory_budget_streams_files_and_shards_one_file(ray_session, tmp_path):
    """With a budget far below the vectors' size the build streams each file in batches and cuts
    a single file into several shards (the driver merges them one at a time), and stays exact."""
    from operators.index import iter_vectors, plan_memory

    x = clustered(6000, seed=3)
    files, ids = write_files(tmp_path / "one", x, 6000)  # one file, six times a shard
    cfg = IndexConfig(queries=200, flat_max=100, hnsw_max=100, max_memory_mb=4)
    m = build_index(files, "clip_image_embedding", str(tmp_path / "idx"), cfg)
    assert m["type"] == "ivf_flat" and m["vectors"] == 6000
    build = m["build"]
    assert build["shard_rows"] == plan_memory(DIM, 4 * DIM + 8, cfg)["shard_rows"] < 6000
    assert build["shards"] == -(-6000 // build["shard_rows"]) >= 2  # one file cut into shards
    assert build["shard_rows"] * (4 * DIM + 8) <= cfg.max_memory_mb * 2 ** 20 / 8
    assert build["task_bytes"] <= cfg.max_memory_mb * 2 ** 20  # what each add task asks Ray for
    assert not (tmp_path / "idx" / "_build").exists()  # the shard files are gone once merged
    batches = list(iter_vectors(files[0], "clip_image_embedding", "sample_id", None, build["batch_rows"]))
    assert len(batches) > 1 and sum(len(b[1]) for b in batches) == 6000
    li = load_index(str(tmp_path / "idx"))
    assert [li.id_of(i) for i in range(6000)] == ids
    assert m["tuning"]["recall_met"] and recall(li, x, ids, clustered(200, seed=97)) >= 0.95


def test_build_and_search_on_s3(ray_session, tmp_path, s3fs_client, s3_server, data):
    from operators.storage import StorageConfig

    x, files, ids = data
    s3fs_client.mkdir("index-test")
    for f in files:
        s3fs_client.put(f, "index-test/vectors/" + f.rsplit("/", 1)[1])
    storage = StorageConfig(endpoint_url=s3_server)
    remote = [f"s3://index-test/vectors/{f.rsplit('/', 1)[1]}" for f in files]
    m = build_index(remote, "clip_image_embedding", "s3://index-test/idx", IndexConfig(queries=100, **KINDS["ivf_pq"]),
                    storage=storage)
    assert m["type"] == "ivf_pq" and s3fs_client.exists("index-test/idx/_INDEX.json")
    assert s3fs_client.exists("index-test/idx/vectors/part-00000.f32")  # the re-rank vectors
    li = load_index("s3://index-test/idx", storage)
    assert li.search(x[[17]], 1)[0][0]["id"] == "s17"
    keep = np.array([i not in (5, 4000) for i in range(len(x))])
    assert recall(li, x[keep], [i for i, k in zip(ids, keep) if k], clustered(200, seed=98)) >= 0.95


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw"])
def test_add_and_remove_without_retraining(ray_session, tmp_path, kind):
    x = clustered(6000, seed=3)
    first, ids1 = write_files(tmp_path / "a", x[:4000], 2000)
    more, ids2 = write_files(tmp_path / "b", x[4000:], 2000, prefix="t", first=4000)
    out = str(tmp_path / "idx")
    m = build_index(first, "clip_image_embedding", out, IndexConfig(queries=100, **KINDS[kind]))
    trained = load_index(out).index
    m2 = add_to_index(out, more)
    assert m2["vectors"] == 6000 and m2["generation"] == 2 and m2["next_id"] == 6000
    li = load_index(out)
    if kind == "ivf_flat":  # the same coarse quantizer: nothing was retrained
        import faiss

        q1, q2 = faiss.extract_index_ivf(trained).quantizer, faiss.extract_index_ivf(li.index).quantizer
        np.testing.assert_array_equal(q1.reconstruct_n(0, q1.ntotal), q2.reconstruct_n(0, q2.ntotal))
    all_ids = ids1 + ids2
    assert [h[0]["id"] for h in li.search(x[[4001, 5999]], 1)] == ["t4001", "t5999"]
    assert recall(li, x, all_ids, clustered(200, seed=97)) >= 0.95

    gone = {"s10", "t4001", "t5999", "s3999"}  # from the first build and from the added files
    m3 = remove_from_index(out, sorted(gone) + ["not-there"])
    li = load_index(out)
    assert m3["history"][-1]["removed"] == 4
    assert (kind == "hnsw") == bool(m3["tombstones"])  # HNSW cannot delete: tombstones
    hits = li.search(x[[10, 4001, 5999, 3999]], 10)
    assert not gone & {h["id"] for row in hits for h in row}
    assert li.id_of(10) is None and li.id_of(4001) is None and li.id_of(11) == "s11"
    keep = np.array([s not in gone for s in all_ids])
    assert recall(li, x[keep], [s for s in all_ids if s not in gone], clustered(200, seed=96)) >= 0.95


def run_cli(argv):
    from jobs.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


def test_cli_build_from_embeddings_and_json_search(ray_session, tmp_path, data):
    x, files, ids = data
    out = str(tmp_path / "cli-idx")
    rc, text = run_cli(["index", "build", "--embeddings", files[0].rsplit("/", 1)[0],
                        "--column", "clip_image_embedding", "--out", out, "--set", "queries=50"])
    assert rc == 0 and json.loads(text)["vectors"] == 5998
    np.save(tmp_path / "q.npy", x[[1, 2]])
    rc, text = run_cli(["search", out, "--vector-file", str(tmp_path / "q.npy"), "-k", "3", "--json"])
    lines = [json.loads(line) for line in text.strip().splitlines()]
    assert rc == 0 and [r["query"] for r in lines] == [0, 1]
    assert [r["results"][0]["id"] for r in lines] == ["s1", "s2"] and len(lines[0]["results"]) == 3
    assert set(lines[0]["results"][0]) == {"id", "score"}
    rc, _ = run_cli(["search", out, "--text", "a cat"])  # no model recorded: a clear error, not a traceback
    assert rc == 2


def test_search_by_text_and_image_with_the_tiny_clip(ray_session, tmp_path):
    pytest.importorskip("open_clip")
    from operators.clip import ClipEmbedder
    from tests.helpers import image_batch, jpeg
    from tests.test_coreset import tiny_clip_config

    cfg = tiny_clip_config()
    images = [jpeg(s) for s in range(12)]
    emb = ClipEmbedder(cfg)(image_batch(images, [["x"]] * 12)).column("clip_image_embedding").to_pylist()
    emb = np.asarray(emb, np.float32)
    from operators.index import QueryEmbedder

    text = "a planted red bicycle"
    planted = QueryEmbedder({"embedding_model": cfg.model_dump(mode="json")}).text([text])[0]
    vectors = np.vstack([emb, planted[None, :]])
    sid = [f"img{i}" for i in range(12)] + ["planted"]
    folder = tmp_path / "snap"
    folder.mkdir()
    pq.write_table(pa.table({"sample_id": sid, "url": [f"http://127.0.0.1/{s}.jpg" for s in sid],
                             "caption": [f"caption {s}" for s in sid],
                             "clip_image_embedding": pa.FixedSizeListArray.from_arrays(
                                 pa.array(vectors.ravel(), pa.float32()), vectors.shape[1])}),
                   str(folder / "part-00000.parquet"))
    out = str(tmp_path / "idx")
    build_index([str(folder / "part-00000.parquet")], "clip_image_embedding", out, IndexConfig(queries=10),
                model=cfg.model_dump(mode="json"))
    rc, text_out = run_cli(["search", out, "--text", text, "-k", "3", "--json"])
    assert rc == 0 and json.loads(text_out)["results"][0]["id"] == "planted"
    (tmp_path / "q.jpg").write_bytes(images[7])
    rc, text_out = run_cli(["search", out, "--image", str(tmp_path / "q.jpg"), "-k", "3", "--json"])
    assert rc == 0 and json.loads(text_out)["results"][0]["id"] == "img7"
    rc, table = run_cli(["search", out, "--image", str(tmp_path / "q.jpg"), "-k", "2"])
    assert rc == 0 and "http://127.0.0.1/img7.jpg" in table and "caption img7" in table
