"""``imgcurate index build|add|remove``, ``imgcurate search`` and ``imgcurate serve``: faiss indices
(operators/index.py) from the command line, and the HTTP search service over one (jobs/serve.py)."""

from __future__ import annotations

import argparse
import json
import sys

SEARCH_COLUMNS = ["url", "caption"]


def _storage(args):
    from operators.storage import StorageConfig

    return StorageConfig(endpoint_url=args.endpoint_url) if getattr(args, "endpoint_url", None) else None


def _index_config(args, base: dict | None = None):
    from operators.index import IndexConfig

    data = dict(base or {})
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        key = key.removeprefix("index.")
        try:
            data[key] = json.loads(value)
        except json.JSONDecodeError:
            data[key] = value
    return IndexConfig(**data)


def _expand(pattern: str, storage) -> list[str]:
    from operators.sources import SourceConfig, expand_paths

    return [f for f in expand_paths(SourceConfig(paths=[pattern]), storage) if f.lower().endswith(".parquet")]


def add_parsers(sub) -> None:
    idx = sub.add_parser("index", help="build, extend or prune kNN indices (faiss)")
    isub = idx.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="index a snapshot's embeddings (SNAPSHOT: a snapshot dir or a run output, whose "
                                      "latest snapshot is used), or any Parquet embeddings with --embeddings")
    b.add_argument("snapshot", nargs="?", help="snapshot dir or run output (omit with --embeddings)")
    b.add_argument("--embeddings", help="Parquet file, folder or glob (local or s3://)")
    b.add_argument("--column", help="embedding column (with --embeddings; default for a snapshot: index.columns)")
    b.add_argument("--id-column", default="sample_id", help="ids the results name (with --embeddings)")
    b.add_argument("--out", help="the index directory (with --embeddings)")
    a = isub.add_parser("add", help="add the vectors of more Parquet files to an index, without retraining")
    a.add_argument("index")
    a.add_argument("--embeddings", required=True)
    r = isub.add_parser("remove", help="remove ids from an index (takedowns), without retraining")
    r.add_argument("index")
    r.add_argument("--id", dest="ids", action="append", default=[], help="an id to remove (repeatable)")
    r.add_argument("--ids-file", help="a file of ids, one per line")
    for p in (b, a, r):
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="an index config key, e.g. --set max_memory_mb=2048 (repeatable)")
        p.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths")
        p.add_argument("-v", "--verbose", action="store_true")
    s = sub.add_parser("search", help="query an index (or a snapshot's image index) by text, image or vectors")
    s.add_argument("index", help="an index dir, a snapshot dir or a run output")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", action="append", help="a text query (repeatable)")
    q.add_argument("--image", action="append", help="an image file (repeatable)")
    q.add_argument("--vector-file", help=".npy of shape (n, dim) or (dim,)")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--json", action="store_true", help="one JSON object per query and line")
    s.add_argument("--column", default="clip_image_embedding", help="which of a snapshot's indices")
    s.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(overrides=[])
    v = sub.add_parser("serve", help="an HTTP search page and JSON API over a snapshot's kNN index (jobs/serve.py)")
    v.add_argument("snapshot", help="a snapshot dir, a run output (its latest snapshot) or an index dir")
    v.add_argument("--port", type=int, default=8080, help="TCP port (0: any free one)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless given)")
    v.add_argument("--column", default="clip_image_embedding", help="which of a snapshot's indices")
    v.add_argument("--k-max", type=int, default=100, help="the largest k a query may ask for")
    v.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths")
    v.add_argument("-v", "--verbose", action="store_true")
    v.set_defaults(overrides=[])


def _ray():
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)


def run_index(args) -> int:
    from operators import index as ix
    from operators.storage import read_json

    storage = _storage(args)
    if args.index_command == "build":
        _ray()
        if args.embeddings:
            if not (args.column and args.out):
                raise ValueError("index build --embeddings needs --column and --out")
            files = _expand(args.embeddings, storage)
            if not files:
                raise FileNotFoundError(f"no .parquet files in {args.embeddings}")
            m = ix.build_index(files, args.column, args.out, _index_config(args), args.id_column, storage)
            print(json.dumps(_summary(m), indent=2))
            return 0
        if not args.snapshot:
            raise ValueError("index build needs a SNAPSHOT or --embeddings")
        from operators.snapshot import MANIFEST, latest_committed, snapshot_dir
        from operators.storage import join

        snap = read_json(join(args.snapshot, MANIFEST), storage)
        if snap is None:
            v = latest_committed(args.snapshot, storage)
            if v is None:
                raise FileNotFoundError(f"{args.snapshot}: no committed snapshot")
            snap = read_json(join(snapshot_dir(args.snapshot, v), MANIFEST), storage)
        base = ((snap.get("config") or {}).get("index") or {})
        cfg = _index_config(args, base)
        if args.column:
            cfg = cfg.model_copy(update={"columns": [args.column]})
        print(json.dumps(ix.build_snapshot_indices(snap, cfg, storage), indent=2))
        return 0
    if args.index_command == "add":
        _ray()
        files = _expand(args.embeddings, storage)
        print(json.dumps(_summary(ix.add_to_index(args.index, files, storage)), indent=2))
        return 0
    ids = list(args.ids)
    if args.ids_file:
        with open(args.ids_file) as fh:
            ids += [line.strip() for line in fh if line.strip()]
    if not ids:
        raise ValueError("index remove needs --id or --ids-file")
    print(json.dumps(_summary(ix.remove_from_index(args.index, ids, storage)), indent=2))
    return 0


def _summary(m: dict) -> dict:
    keep = ("type", "factory", "vectors", "rows", "dim", "column", "search_params", "generation", "index_bytes")
    out = {k: m.get(k) for k in keep}
    out.update({k: m["tuning"][k] for k in ("recall", "recall_met", "query_ms_p50", "latency_met")})
    return out


def run_search(args) -> int:
    import numpy as np

    from operators import index as ix

    storage = _storage(args)
    path, snap = ix.resolve(args.index, storage, args.column)
    li = ix.load_index(path, storage)
    if args.vector_file:
        q = ix.read_query_vectors(args.vector_file)
    else:
        emb = ix.QueryEmbedder(li.manifest, storage)
        if args.text:
            q = emb.text(args.text)
        else:
            blobs = []
            for p in args.image:
                with open(p, "rb") as fh:
                    blobs.append(fh.read())
            q = emb.images(blobs)
    if q.shape[1] != li.manifest["dim"]:
        raise ValueError(f"query vectors have {q.shape[1]} dims, the index {li.manifest['dim']}")
    results = li.search(np.asarray(q, np.float32), args.k)
    if args.json:
        print(ix.dumps_results(results))
        return 0
    labels = args.text or args.image or [f"vector {i}" for i in range(len(q))]
    for i, hits in enumerate(results):
        print(f"query {i}: {labels[i]}")
        rows = ix.rows_of_hits(li, hits, SEARCH_COLUMNS)
        print(f"  {'rank':>4}  {'score':>7}  {'id':<34} url / caption")
        for r, (h, row) in enumerate(zip(hits, rows), 1):
            url = row.get("url") or ""
            cap = (row.get("caption") or "").replace("\n", " ")[:80]
            print(f"  {r:>4}  {h['score']:7.4f}  {h['id']:<34} {url}" + (f"\n{'':53}{cap}" if cap else ""))
    return 0


def run_serve(args) -> int:
    from jobs.serve import serve

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: not a TCP port")
    serve(args.snapshot, host=args.host, port=args.port, storage=_storage(args), column=args.column,
          k_max=args.k_max)
    return 0


def run(args) -> int:
    """Dispatch ``index``, ``search`` or ``serve``."""
    return {"index": run_index, "search": run_search, "serve": run_serve}[args.command](args)


def main(argv=None) -> int:  # python -m jobs.index_cli (the imgcurate command dispatches here too)
    p = argparse.ArgumentParser(prog="imgcurate")
    add_parsers(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
