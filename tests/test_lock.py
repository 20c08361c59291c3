"""The output lock (operators/lock.py): a conditional create on a local path and on the loopback S3
server (If-None-Match), refusal while held, takeover of a stale lock with a log line, release on
failure, and a job run refusing an output another run holds."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest

from operators.lock import LOCK_NAME, LockHeld, OutputLock


def _where(kind, tmp_path, s3fs_client, s3_server):
    from operators.storage import StorageConfig

    if kind == "local":
        return str(tmp_path / "out"), None
    bucket = f"lock-{int(time.time() * 1e6) % 10**9}"
    s3fs_client.mkdir(bucket)
    return f"s3://{bucket}/out", StorageConfig(endpoint_url=s3_server)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out"), None
    s3fs_client, s3_server = request.getfixturevalue("s3fs_client"), request.getfixturevalue("s3_server")
    return _where("s3", tmp_path, s3fs_client, s3_server)


def test_one_holder_at_a_time_and_release(where):
    out, storage = where
    a = OutputLock(out, storage, purpose="refresh")
    b = OutputLock(out, storage)
    with a:
        holder = a.read()
        assert holder["token"] == a.token and holder["purpose"] == "refresh"
        with pytest.raises(LockHeld, match="held by a refresh"):
            b.acquire()
    assert a.read() is None  # released
    with b:
        assert b.read()["token"] == b.token


def test_a_failing_run_releases_the_lock(where):
    out, storage = where
    lock = OutputLock(out, storage)
    with pytest.raises(RuntimeError, match="boom"):
        with lock:
            raise RuntimeError("boom")
    assert lock.read() is None
    OutputLock(out, storage).acquire().release()


def test_a_stale_lock_is_taken_over_with_a_log_line(where, caplog):
    from operators.storage import fsspec_fs, join

    out, storage = where
    fs, p = fsspec_fs(join(out, LOCK_NAME), storage)
    fs.makedirs(fs._parent(p), exist_ok=True)
    old = {"token": "dead", "purpose": "run", "host": "elsewhere", "pid": 1, "created": "2026-01-01",
           "heartbeat": "2026-01-01", "heartbeat_unix": time.time() - 3600, "stale_after_s": 900}
    with fs.open(p, "wb") as fh:
        fh.write(json.dumps(old).encode())
    with caplog.at_level(logging.WARNING, logger="operators.lock"):
        with OutputLock(out, storage) as lock:
            assert lock.read()["token"] == lock.token
    assert any("taking over" in r.getMessage() and "3600" in r.getMessage() for r in caplog.records)
    # a fresh heartbeat from another host is not stale
    with fs.open(p, "wb") as fh:
        fh.write(json.dumps({**old, "heartbeat_unix": time.time()}).encode())
    with pytest.raises(LockHeld, match="elsewhere"):
        OutputLock(out, storage).acquire()


def test_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    out = str(tmp_path / "out")
    # a holder that exits without releasing (as a killed driver does)
    code = ("import sys; sys.path.insert(0, '.'); from operators.lock import OutputLock; "
            f"OutputLock({out!r}, heartbeat_s=30).acquire(); import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    lock = OutputLock(out)
    assert lock.stale(lock.read()).endswith("is gone")
    lock.acquire().release()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = OutputLock(str(tmp_path / "out"), stale_after_s=2, heartbeat_s=0.2)
    with lock:
        first = lock.read()["heartbeat_unix"]
        time.sleep(0.7)
        assert lock.read()["heartbeat_unix"] > first and lock.stale(lock.read()) is None


def test_a_run_refuses_an_output_held_by_another(tmp_path):
    from jobs import curate
    from tests.pipeline_helpers import job_config

    cfg = job_config(str(tmp_path / "urls.csv"), str(tmp_path / "out"))
    with OutputLock(cfg.output.path, purpose="refresh"):
        with pytest.raises(LockHeld, match="two runs of one output never run at once"):
            curate.run(cfg)
