"""Fitting a wave's operators to the cluster (jobs/sizing.py) and packing small shards, without Ray."""

from __future__ import annotations

import pytest

from jobs import curate
from jobs.plan import pack_shards, shard_rows_of
from jobs.sizing import CHECKPOINT_FILTER_CPUS, ResourceError, StageNeed, fit_pipeline


def _download(cpus=0.75, pool_min=1, pool_max=None):
    return StageNeed("download", cpus, 0.0, pool_min, pool_max, ("download.num_cpus", "images.num_cpus"))


def _fit(download, models=(), cpus=2.0, gpus=0.0, resuming=False, write_concurrency=None):
    return fit_pipeline(download, list(models), cpus, gpus, resuming=resuming, read_fused=not resuming,
                        write_cpus=0.125, write_concurrency=write_concurrency)


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 16, 64])
@pytest.mark.parametrize("resuming", [False, True])
def test_every_operator_fits_at_once(cpus, resuming):
    if resuming and cpus == 1:
        pytest.skip("the checkpoint filter alone takes the one CPU (refusal tested below)")
    plan = _fit(_download(), cpus=cpus, resuming=resuming)
    lo, hi = plan.pools["download"]
    assert 1 <= lo <= hi
    assert plan.cpus_at_once() <= cpus + 1e-9
    # Nothing is left idle that one more download actor could use.
    assert plan.cpus_at_once() + 0.75 > cpus - 0.125 * 2
    assert plan.read_fused is not resuming
    if resuming:
        assert plan.cpus_at_once() >= CHECKPOINT_FILTER_CPUS + 0.75


def test_default_config_on_two_cpus_fits_a_resume():
    from jobs.config import load_config

    cfg = load_config(data={"input": {"paths": ["x.csv"]}, "output": {"path": "/tmp/x"}})
    fresh = curate.size_wave(cfg, resuming=False, cluster={"CPU": 2.0})
    resumed = curate.size_wave(cfg, resuming=True, cluster={"CPU": 2.0})
    assert fresh.pools["download"][1] == 2 and fresh.read_fused
    assert resumed.pools["download"] == (1, 1) and not resumed.read_fused
    assert resumed.cpus_at_once() <= 2.0 + 1e-9


def test_pool_min_is_lowered_to_what_fits(caplog):
    plan = _fit(_download(cpus=1.0, pool_min=2, pool_max=2), cpus=3.0, resuming=True, write_concurrency=1)
    assert plan.pools["download"] == (1, 1)
    assert "download.pool_min 2 lowered to 1" in caplog.text


def test_refuses_with_the_keys_to_change():
    with pytest.raises(ResourceError) as info:
        _fit(_download(), cpus=1.0, resuming=True)
    msg = str(info.value)
    assert "checkpoint filter" in msg and "download.num_cpus" in msg and "ray.num_cpus" in msg
    gpu_stage = StageNeed("clip", 1.0, 1.0, 1, 1, ("clip.num_cpus", "clip.pool_min"), ("clip.num_gpus", "clip.device"))
    with pytest.raises(ResourceError, match="clip.num_gpus"):
        _fit(_download(), [gpu_stage], cpus=8.0, gpus=0.0)


def test_model_stages_grow_to_pool_max_before_downloads_take_the_rest():
    clip = StageNeed("clip", 1.0, 1.0, 1, 4, ("clip.num_cpus",), ("clip.num_gpus",))
    plan = _fit(_download(), [clip], cpus=16.0, gpus=4.0)
    assert plan.pools["clip"] == (1, 4)
    assert plan.pools["download"][1] == int((16 - 4 - plan.write_cpus * plan.write_concurrency) / 0.75)
    assert plan.cpus_at_once() <= 16.0


def test_dry_run_config_fits_the_tests_two_cpus_and_resumes_on_its_own_three():
    from jobs.config import CONFIG_DIR, load_config

    cfg = load_config(CONFIG_DIR / "dryrun.yaml")
    assert curate.size_wave(cfg, resuming=False, cluster={"CPU": 2.0}).cpus_at_once() <= 2.0
    assert curate.size_wave(cfg, resuming=True, cluster={"CPU": float(cfg.ray.num_cpus)}).cpus_at_once() <= 3.0
    with pytest.raises(ResourceError, match="clip.num_cpus"):
        curate.size_wave(cfg, resuming=True, cluster={"CPU": 2.0})


# --- packing small shards into download calls ---------------------------------------------------------
def _buckets(sizes, shard_rows):
    return [{"bucket": b, "samples": n, "files": [f"b{b}/part-{k}" for k in range(-(-n // shard_rows))]}
            for b, n in enumerate(sizes)]


def test_shard_rows_follow_merge_bucket_cuts():
    assert shard_rows_of({"samples": 10, "files": ["a", "b", "c"]}, 4) == [4, 4, 2]
    assert shard_rows_of({"samples": 0, "files": []}, 4) == []


def test_pack_shards_fills_calls_and_keeps_every_file_once():
    buckets = _buckets([16] * 250 + [0, 9000], shard_rows=4096)
    groups = pack_shards(buckets, 4096, target_rows=500)
    files = [f for g in groups for f in g]
    assert sorted(files) == sorted(f for b in buckets for f in b["files"])
    rows = {f: r for b in buckets for f, r in zip(b["files"], shard_rows_of(b, 4096))}
    sizes = [sum(rows[f] for f in g) for g in groups]
    assert all(s <= 500 for s in sizes[:-3])  # the 9000-sample bucket's shards are larger than a call
    assert max(sizes) == 4096
    # 250 shards of 16 rows, 31 to a call (496 rows), then the big bucket's 4096 + 4096 + 808.
    assert len(groups) == -(-250 // (500 // 16)) + 3


def test_wave_groups_give_every_download_actor_calls():
    from jobs.config import load_config

    cfg = load_config(data={"input": {"paths": ["x.csv"]}, "output": {"path": "/tmp/x"}})
    plan = curate.size_wave(cfg, resuming=False, cluster={"CPU": 2.0})
    buckets = _buckets([16] * 256, shard_rows=cfg.plan.shard_rows)
    groups = curate.wave_groups(cfg, buckets, plan)
    assert len(groups) == plan.pools["download"][1] * cfg.download.batches_in_flight
