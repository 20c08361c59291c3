"""The whole job on a real local Ray against the local sample server: every sample once, with its reason."""

from __future__ import annotations

import io

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs import curate
from jobs.config import ConfigError
from jobs.samples.data import sample_cases, write_url_list
from tests.conftest import N_GOOD
from tests.pipeline_helpers import job_config


@pytest.fixture(scope="module")
def finished_run(ray_session, image_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline")
    urls = write_url_list(sample_cases(N_GOOD), image_server.base_url, str(work / "urls.csv"))
    cfg = job_config(urls, str(work / "out"))
    manifest = curate.run(cfg)
    table = pq.read_table(str(work / "out" / "data"))
    return cfg, manifest, table


def test_every_sample_exactly_once_with_expected_outcome(finished_run):
    cfg, manifest, table = finished_run
    ids = table.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == manifest["samples"]
    cases = sample_cases(N_GOOD)
    assert manifest["input_rows"] == len(cases)
    mismatched = []
    for row in table.select(["url_original", "expect", "status", "drop_reason"]).to_pylist():
        got = "kept" if row["status"] == "kept" else row["drop_reason"]
        if got != row["expect"]:
            mismatched.append(row)
    assert not mismatched, mismatched[:5]
    assert sum(manifest["outcomes"].values()) == manifest["samples"]


def test_kept_rows_have_resized_images_and_dropped_rows_none(finished_run):
    from PIL import Image

    _, _, table = finished_run
    size = 128  # configs/dryrun.yaml
    for row in table.select(["status", "image", "width", "height", "sha256"]).to_pylist():
        if row["status"] == "kept":
            im = Image.open(io.BytesIO(row["image"]))
            assert im.size == (size, size) == (row["width"], row["height"])
            assert len(row["sha256"]) == 64
        else:
            assert row["image"] is None


def test_duplicate_urls_merge_into_one_sample(finished_run):
    _, _, table = finished_run
    merged = table.filter(pc.greater(table.column("n_input_rows"), 1))
    assert merged.num_rows >= 10
    for row in merged.select(["captions", "caption_sources", "n_input_rows"]).to_pylist():
        assert len(row["captions"]) == len(row["caption_sources"]) >= 1
    # Every input row is accounted for by some sample.
    assert pc.sum(table.column("n_input_rows")).as_py() == len(sample_cases(N_GOOD))


def test_manifest_written_last_with_versions_and_counts(finished_run):
    cfg, manifest, _ = finished_run
    assert manifest["download"]["concurrency"] == cfg.download.concurrency
    assert 0 < manifest["download"]["mean_open_requests"] <= cfg.download.concurrency
    from operators.storage import read_json

    on_disk = read_json(cfg.output.path + "/_manifest.json")
    assert on_disk["samples"] == manifest["samples"]
    assert on_disk["versions"]["ray"] and on_disk["config"]["download"]["allow_loopback"] is True
    assert on_disk["outcomes"]["failed/download/http_404"] >= 10
    assert set(on_disk["data_files"]) and all(f.endswith(".parquet") for f in on_disk["data_files"])


def test_rerun_resumes_without_redoing_work(finished_run, image_server):
    cfg, manifest, table = finished_run
    image_server.reset_hits()
    again = curate.run(cfg)
    assert again["waves_resumed"] == len(again["waves"]) >= 1
    assert sum(image_server.hits.values()) == 0
    assert pq.read_table(cfg.output.path + "/data").num_rows == table.num_rows


def test_other_config_on_same_output_is_refused(finished_run):
    cfg, _, _ = finished_run
    other = cfg.model_copy(update={"images": cfg.images.model_copy(update={"image_size": 64})})
    with pytest.raises(ConfigError, match="another config"):
        curate.run(other)


def test_several_waves_and_input_formats(ray_session, image_server, tmp_path):
    cases = sample_cases(N_GOOD)
    half = len(cases) // 2
    a = write_url_list(cases[:half], image_server.base_url, str(tmp_path / "a.parquet"), fmt="parquet")
    b = write_url_list(cases[half:], image_server.base_url, str(tmp_path / "b.jsonl"), fmt="jsonl")
    cfg = job_config([a, b], str(tmp_path / "out"), plan={"wave_max_samples": 60, "num_buckets": 8},
                     output={"path": str(tmp_path / "out"), "write_concurrency": 1})
    manifest = curate.run(cfg)
    assert len(manifest["waves"]) >= 2
    table = pq.read_table(str(tmp_path / "out" / "data"))
    assert table.num_rows == manifest["samples"] == len(set(table.column("sample_id").to_pylist()))


def test_clip_top_fraction_over_the_whole_run(ray_session, image_server, tmp_path):
    cases = [c for c in sample_cases(N_GOOD) if c.expect == "kept"][:40]
    urls = write_url_list(cases, image_server.base_url, str(tmp_path / "urls.csv"))
    # dedup off: the sample web serves some images under several URLs (and near copies), and here the fraction is
    # checked over every scored sample (dedup's own run is tested in test_dedup_*.py)
    cfg = job_config(urls, str(tmp_path / "out"), selection={"clip_top_fraction": 0.3},
                     plan={"num_buckets": 4, "shard_rows": 8}, dedup={"exact": False, "perceptual": {"enabled": False}})
    manifest = curate.run(cfg)
    sel = manifest["phase2"]["selection.clip_top_fraction"]
    data = pq.read_table(str(tmp_path / "out" / "data"))
    side = pq.read_table(str(tmp_path / "out" / "final"))
    assert sorted(side.column("sample_id").to_pylist()) == sorted(data.column("sample_id").to_pylist())
    scores = [s for s, st in zip(data.column("clip_score").to_pylist(), data.column("status").to_pylist())
              if st == "kept" and s is not None]
    want = sorted(scores, reverse=True)[-(-3 * len(scores) // 10) - 1]  # k = ceil(3/10 * n), in integers
    assert sel["threshold"] == pytest.approx(want, abs=0)
    # The dry-run config behind job_config also keeps a reward top fraction: it applies second, to
    # what the CLIP cut kept, so the CLIP step's survivors are the kept rows plus the reward step's drops.
    reasons = side.column("drop_reason").to_pylist()
    passed_clip = sum(r is None or r.startswith("reward_not_top_") for r in reasons)
    assert passed_clip == sel["kept"] == sum(s >= want for s in scores)
    assert reasons.count(None) == manifest["final"]["kept"]
    assert manifest["final"]["kept"] < sel["kept"] == manifest["phase2"]["selection.reward_top_fraction"]["entering"]

    # `imgcurate phase2`: another fraction over the same phase-1 output, nothing run again in phase 1
    data_files = sorted(p.name for p in (tmp_path / "out" / "data").rglob("*.parquet"))
    cfg2 = job_config(urls, str(tmp_path / "out"), selection={"clip_top_fraction": 0.5},
                      plan={"num_buckets": 4, "shard_rows": 8}, dedup={"exact": False, "perceptual": {"enabled": False}})
    snap1 = tmp_path / "out" / "snapshots" / "v=0001"
    def files_of(d):
        return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file()}

    before = files_of(snap1)
    again = curate.run(cfg2, phase2_only=True)
    # a new snapshot version, chained to the first, which is left as it was
    assert (manifest["snapshot"]["version"], again["snapshot"]["version"], again["snapshot"]["parent"]) == (1, 2, 1)
    assert files_of(snap1) == before
    assert again["snapshot"]["kept"] == again["final"]["kept"] > manifest["final"]["kept"]
    assert again["waves_resumed"] == len(again["waves"])
    assert sorted(p.name for p in (tmp_path / "out" / "data").rglob("*.parquet")) == data_files
    sel2 = again["phase2"]["selection.clip_top_fraction"]
    assert sel2["kept"] == sum(s >= sorted(scores, reverse=True)[-(-len(scores) // 2) - 1] for s in scores)
    assert sel2["kept"] > sel["kept"]
    with pytest.raises(ConfigError, match="holds no run"):
        curate.run(job_config(urls, str(tmp_path / "empty")), phase2_only=True)
    assert manifest["models"]["clip"]["random_weights"] is True

    # the snapshot's kNN indices: every kept sample's embeddings, and a kept sample finds itself
    from operators.index import load_index, resolve

    idx = manifest["snapshot"]["indices"]
    assert {c: idx[c]["vectors"] for c in idx} == {"clip_image_embedding": manifest["final"]["kept"],
                                                   "clip_text_embedding": manifest["final"]["kept"]}
    kept = pq.read_table(str(snap1 / "part-00000.parquet"), columns=["sample_id", "clip_image_embedding"])
    li = load_index(resolve(str(tmp_path / "out" / "snapshots" / "v=0001"))[0])
    first = kept.slice(0, 1).to_pylist()[0]
    assert li.search([first["clip_image_embedding"]], 1)[0][0]["id"] == first["sample_id"]


def _plan_rows(out: str, storage=None) -> tuple[dict, list]:
    """The committed plan and its sample shards' rows (sorted by sample_id), shard by shard."""
    from jobs.plan import load_plan
    from operators.storage import arrow_fs

    plan = load_plan(job_config("unused.csv", out, storage=storage or {}))
    shards = []
    for b in plan["buckets"]:
        for f in b["files"]:
            fs, p = arrow_fs(f, job_config("unused.csv", out, storage=storage or {}).storage)
            with fs.open_input_file(p) as fh:
                t = pq.read_table(fh)
            shards.append(sorted(t.to_pylist(), key=lambda r: r["sample_id"]))
    return plan, sorted(shards, key=lambda rows: rows[0]["sample_id"] if rows else "")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_plan_in_the_driver_equals_plan_in_ray_tasks(ray_session, image_server, s3_server, s3fs_client, tmp_path,
                                                     where):
    """A small input is planned in the driver process (plan.local_max_bytes); the shards are the
    same as Ray tasks make: same samples, captions, reasons, shard boundaries and counts."""
    from jobs.plan import run_plan

    cases = sample_cases(N_GOOD)
    half = len(cases) // 2
    a = write_url_list(cases[:half] + cases[:5], image_server.base_url, str(tmp_path / "a.csv"))
    b = write_url_list(cases[half:], image_server.base_url, str(tmp_path / "b.jsonl"), fmt="jsonl")
    storage = {}
    inputs, outs = [a, b], [str(tmp_path / "driver"), str(tmp_path / "tasks")]
    if where == "s3":
        s3fs_client.mkdir("plan-in")
        s3fs_client.put(a, "plan-in/a.csv")
        s3fs_client.put(b, "plan-in/b.jsonl")
        storage = {"endpoint_url": s3_server}
        inputs, outs = ["s3://plan-in/a.csv", "s3://plan-in/b.jsonl"], ["s3://plan-out/driver", "s3://plan-out/tasks"]
        s3fs_client.mkdir("plan-out")
    plans = []
    for out, limit in zip(outs, [8 << 20, 0]):
        cfg = job_config(inputs, out, storage=storage, plan={"num_buckets": 4, "shard_rows": 16,
                                                             "local_max_bytes": limit})
        plans.append(run_plan(cfg))
    assert [p["where"] for p in plans] == ["driver", "ray tasks"]
    (p1, rows1), (p2, rows2) = _plan_rows(outs[0], storage), _plan_rows(outs[1], storage)
    assert rows1 == rows2 and sum(len(r) for r in rows1) == p1["samples"] > 0
    for k in ("input_rows", "samples", "invalid_urls", "extra_columns"):
        assert p1[k] == p2[k], k
    assert [b["samples"] for b in p1["buckets"]] == [b["samples"] for b in p2["buckets"]]


def test_small_input_threshold(tmp_path):
    from jobs.plan import is_small_input

    f = tmp_path / "u.csv"
    f.write_text("url\n" + "http://127.0.0.1/x.jpg\n" * 100)
    size = f.stat().st_size
    assert is_small_input([str(f)], job_config(str(f), str(tmp_path / "o"), plan={"local_max_bytes": size}))
    assert not is_small_input([str(f), str(f)], job_config(str(f), str(tmp_path / "o"),
                                                           plan={"local_max_bytes": size}))
    assert not is_small_input([str(f)], job_config(str(f), str(tmp_path / "o"), plan={"local_max_bytes": 0}))


def test_wave_reads_each_shard_inside_the_download_actor(ray_session, finished_run, capsys):
    """One read task and block per plan shard, exactly the shard's rows, and the read fused into the
    download actor: no read operator of its own and no sampling task before the first download."""
    import ray

    from jobs.plan import load_plan
    from operators.shards import SampleShards
    from operators.storage import arrow_fs

    cfg, _, _ = finished_run
    files = [f for b in load_plan(cfg)["buckets"] for f in b["files"]]
    fs, _ = arrow_fs(cfg.output.path, cfg.storage)
    tasks = SampleShards(files, fs).get_read_tasks(parallelism=1)
    assert len(tasks) == len(files) > 1
    blocks = [b for t in tasks for b in t()]
    assert [b.num_rows for b in blocks] == [pq.read_metadata(f).num_rows for f in files]
    assert sum(b.num_rows for b in blocks) == ray.data.read_datasource(
        SampleShards(files, fs), override_num_blocks=len(files)).count()

    curate.wave_dataset(cfg, [[f] for f in files], curate.size_wave(cfg, resuming=False)).explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "ActorPoolMapOperator[ReadSampleShards->MapBatches(HttpDownloader)]" in physical, physical
    assert "TaskPoolMapOperator[ReadSampleShards]" not in physical, physical


def test_ray_data_service_actors_start_with_the_cluster(ray_session):
    """init_ray starts Ray Data's detached service actors; this test fails if a Ray upgrade moves
    the internal helpers (start_data_services would only log a warning)."""
    import ray

    assert curate.start_data_services(timeout_s=60) == 3
    named = {(a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)}
    assert {("AutoscalingCoordinator", "AutoscalingCoordinator"),
            ("ActorLocationTracker", "ActorLocationTracker")} <= named, named
    assert any("stats" in name.lower() for _, name in named), named
