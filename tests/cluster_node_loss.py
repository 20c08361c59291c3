"""Node loss mid-wave: run by tests/test_cluster_run.py in a process of its own.

``python tests/cluster_node_loss.py --images DIR --work DIR`` starts a ``ray.cluster_utils.Cluster``
on 127.0.0.1 (a head with 0 CPUs, so every task and actor runs on one of two 1-CPU worker nodes),
serves DIR on a loopback SampleServer with a fixed per-request latency, and runs one wave of the
curate job (``jobs.curate.run`` with ``ray.address`` set to the cluster's) over distinct URLs. Once
a share of the URLs has been requested, a thread removes the worker node that holds the download
actor. It writes WORK/report.json: when the node went, what the job returned or raised, and the
rows per sample_id in the run's data files. The test judges the report; this script only records.

It is a separate process because pytest's process may already be a Ray driver (tests/conftest.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("cluster_node_loss")

DOWNLOAD_ACTOR = "HttpDownloader"  # in the class name of the download pool's actors (MapWorker(...HttpDownloader))


def write_urls(path: Path, base_url: str, names: list[str], n: int) -> str:
    path.write_text("url,caption\n" + "".join(f"{base_url}/img/{names[i % len(names)]}?copy={i},caption {i}\n"
                                             for i in range(n)))
    return str(path)


def download_actor_nodes() -> list[str]:
    """Node ids of the live download actors (the GCS actor table: no dashboard needed)."""
    import ray

    return [a["Address"]["NodeID"] for a in ray._private.state.actors().values()
            if DOWNLOAD_ACTOR in a["ActorClassName"] and a["State"] == "ALIVE"]


def remove_when(cluster, server, report: dict, after_hits: int, timeout_s: float) -> None:
    """Wait until ``after_hits`` image requests reached the server, then remove the worker node
    that holds a download actor (any worker if none is found)."""
    try:
        deadline = time.monotonic() + timeout_s
        while sum(server.hits.values()) < after_hits:
            if time.monotonic() > deadline:
                report["remove_error"] = f"fewer than {after_hits} requests in {timeout_s}s"
                return
            time.sleep(0.05)
        actor_nodes = download_actor_nodes()
        workers = sorted(cluster.worker_nodes, key=lambda n: n.node_id)
        victim = next((n for n in workers if n.node_id in actor_nodes), workers[0])
        report.update(hits_at_removal=sum(server.hits.values()), actor_nodes=actor_nodes,
                      removed_node=victim.node_id, removed_held_download_actor=victim.node_id in actor_nodes)
        t0 = time.monotonic()
        cluster.remove_node(victim, allow_graceful=False)  # as a crash: no draining
        report["remove_s"] = round(time.monotonic() - t0, 3)
        report["removed_at"] = time.time()
    except Exception:  # noqa: BLE001 - recorded for the test to show
        report["remove_error"] = traceback.format_exc()


def rows_per_sample(files: list[str]) -> dict[str, int]:
    """How many rows each sample_id has across the given Parquet files (also used by test_cluster_run)."""
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for f in files:
        for sid in pq.read_table(f, columns=["sample_id"]).column("sample_id").to_pylist():
            counts[sid] = counts.get(sid, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="folder of the sample's images (served under /img/)")
    parser.add_argument("--work", required=True, help="folder for the URL list, output and report.json")
    parser.add_argument("--n-good", type=int, required=True, help="good images in the sample (tests/conftest.py N_GOOD)")
    parser.add_argument("--samples", type=int, default=240)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=4, help="download.concurrency (open requests)")
    parser.add_argument("--remove-after", type=float, default=0.25, help="share of the URLs requested first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import pyarrow.parquet as pq
    import yaml
    from ray.cluster_utils import Cluster

    from jobs import curate
    from jobs.config import CONFIG_DIR, load_config
    from jobs.samples.data import good_image_names
    from jobs.samples.server import SampleServer

    work = Path(args.work)
    report: dict = {"samples": args.samples}
    names = good_image_names(args.n_good)
    cluster = None
    t_start = time.monotonic()
    with SampleServer(root_dir=args.images, latency_ms=args.latency_ms) as server:
        try:
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
                # A killed node is found by the GCS's health checks (default: every 3 s, dead after 5
                # misses); the lost actor restarts only then. Checked each second here, so a lost node
                # costs about 5 s of the test and not 15.
                "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                                   "health_check_failure_threshold": 5}})
            workers = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
            cluster.wait_for_nodes()
            report["cluster_up_s"] = round(time.monotonic() - t_start, 3)
            from ray._raylet import AuthenticationMode, get_authentication_mode

            report["token_auth"] = get_authentication_mode() == AuthenticationMode.TOKEN
            report["workers"] = [w.node_id for w in workers]

            data = yaml.safe_load((CONFIG_DIR / "dryrun.yaml").read_text())
            data["input"] = {"paths": [write_urls(work / "urls.csv", server.base_url, names, args.samples)],
                             "caption_columns": ["caption"]}
            data["output"] = {"path": str(work / "out")}
            for stage in ("clip", "safety", "recaption", "reward"):
                data[stage]["enabled"] = False
            data.pop("selection", None)
            data.pop("coreset", None)
            data["dedup"] = {"exact": False, "perceptual": {"enabled": False}, "semantic": {"enabled": False}}
            # Few open requests, rows passed on in fours: the wave lasts seconds and the writer has
            # taken rows from the download actor's calls by the time the node (and the actor) goes.
            data["download"].update({"concurrency": args.concurrency, "per_host_concurrency": args.concurrency,
                                     "yield_rows": 4})
            data["ray"]["address"] = cluster.address
            cfg = load_config(data=data)

            killer = threading.Thread(target=remove_when, daemon=True,
                                      args=(cluster, server, report, int(args.samples * args.remove_after), 180.0))
            killer.start()
            t0 = time.monotonic()
            try:
                manifest = curate.run(cfg)
                report["manifest"] = {k: manifest[k] for k in ("input_rows", "samples", "outcomes", "kept",
                                                               "data_files", "waves")}
            except Exception as exc:  # noqa: BLE001 - the test reports what failed
                report["error"] = f"{type(exc).__name__}: {exc}"
                report["traceback"] = traceback.format_exc()
            report["job_s"] = round(time.monotonic() - t0, 3)
            report["finished_at"] = time.time()
            killer.join(timeout=5)
            report["requests"] = sum(server.hits.values())
            files = sorted(str(p) for p in (work / "out" / "data").rglob("*.parquet")) \
                if (work / "out" / "data").exists() else []
            report["data_files"] = files
            report["rows_per_sample"] = rows_per_sample(files)
            report["statuses"] = {}
            for f in files:
                for s in pq.read_table(f, columns=["status"]).column("status").to_pylist():
                    report["statuses"][s] = report["statuses"].get(s, 0) + 1
        finally:
            import ray

            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
    (work / "report.json").write_text(json.dumps(report, indent=1))
    log.info("report: %s", {k: v for k, v in report.items() if k not in ("rows_per_sample", "data_files")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
