"""The job on real clusters (issue #16, items 4 and 5), each in processes of its own.

* ``ray job submit`` to a local head started by ``ray start --head`` with its job server, token
  authentication on: the job runs from the uploaded working dir and writes a complete manifest;
  a submission without the token (or with a wrong one) is refused.
* Node loss: a ``ray.cluster_utils.Cluster`` (head with 0 CPUs, two 1-CPU workers) in a
  subprocess (tests/cluster_node_loss.py, since this process may hold the tests' own Ray), one
  worker removed while the wave downloads; every sample comes out exactly once.

Both clusters bind 127.0.0.1 and keep their session dirs, address file and auth token in a temp
dir of their own (RAY_TMPDIR, HOME), so they neither clash with nor are found by any other Ray on
the machine. Nothing is stopped with ``ray stop`` (it would stop every Ray here): each cluster is
ended through the process that started it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from cluster_node_loss import rows_per_sample  # tests/: the node-loss script's counter

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.samples.data import good_image_names, images_dir
from jobs.samples.server import SampleServer
from tests.conftest import N_GOOD, ROOT, free_port

RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
START_TIMEOUT_S = 120  # head and job server up (the dashboard's modules start one by one on 2 busy cores)
JOB_TIMEOUT_S = 240  # a job that takes longer is a hang: it is stopped and the test fails
N_SUBMIT, N_MISSING = 40, 4  # the submitted job's input: good images and 404s on the tests' image server
# What the working-dir upload leaves out (git-ignored files are left out by Ray already).
UPLOAD_EXCLUDES = [".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache", "imgcurate-dryrun"]


def write_urls(path: Path, server: SampleServer, n: int, n_missing: int = 0) -> str:
    """``n`` distinct URLs cycling through the sample's good images, then ``n_missing`` 404s."""
    names = good_image_names(N_GOOD)
    lines = ["url,caption\n"]
    lines += [f"{server.url('/img/' + names[i % len(names)])}?copy={i},caption {i}\n" for i in range(n)]
    lines += [f"{server.url('/status/404')}?i={i},missing {i}\n" for i in range(n_missing)]
    path.write_text("".join(lines))
    return str(path)




def models_off_config(urls: str, out: Path) -> dict:
    """configs/dryrun.yaml with the model stages and phase 2 off: this file tests the cluster, not the
    models or phase 2 (tests/test_pipeline.py and the phase-2 tests run those)."""
    cfg = yaml.safe_load((ROOT / "configs" / "dryrun.yaml").read_text())
    cfg["input"]["paths"] = [urls]
    cfg["output"] = {"path": str(out)}
    for stage in ("clip", "safety", "recaption", "reward"):
        cfg[stage]["enabled"] = False
    cfg.pop("selection", None)  # the reward top fraction needs the reward stage
    cfg.pop("coreset", None)  # the coreset and semantic dedup need the CLIP embeddings
    cfg["dedup"] = {"exact": False, "perceptual": {"enabled": False}, "semantic": {"enabled": False}}
    return cfg


def isolated_env(base: Path, **extra: str) -> dict:
    """The environment of a Ray process of this file's: its own temp dir and HOME (where Ray keeps
    its auth token), no address or auth setting inherited from the tests' own Ray."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    (base / "home").mkdir(exist_ok=True)
    env.pop("PYTHONPATH", None)
    env.update(HOME=str(base / "home"), RAY_TMPDIR=str(base / "t"), RAY_USAGE_STATS_ENABLED="0",
               # `ray start` turns a loopback --node-ip-address into the machine's routable IP unless
               # it knows the cluster is single-node (ray._private.services.get_node_ip_address).
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.update(extra)
    return env


def short_tempdir() -> Path:
    """A short path: Ray's Unix sockets live under it and a socket path must fit in 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="imgc-", dir="/tmp"))


def kill_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the process (``ray start --block`` then ends every process it started), SIGKILL its
    process group if anything is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


def http_get(url: str, token: str | None, timeout: float = 5.0) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


# --- 1. ray job submit to a token-authenticated head ------------------------------------------------
@pytest.fixture()
def ray_head():
    """``ray start --head --block`` with its job server, token auth on; yields (dashboard URL, token
    file, base dir). The token is made first with ``ray get-auth-token --generate``: ``ray start``
    turns token auth on when it finds one (or with RAY_AUTH_MODE=token) but does not write one."""
    if RAY is None:
        pytest.skip("the `ray` CLI is not installed")
    base = short_tempdir()
    # No drain on SIGTERM: Ray Data's detached actors stay after the job, so the node never goes idle
    # and `ray start --block` would wait out the 30 s drain timeout before shutting down.
    env = isolated_env(base, RAY_AUTH_MODE="token", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    token_file = base / "home" / ".ray" / "auth_token"
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    assert token_file.is_file(), "ray get-auth-token --generate wrote no token where expected"
    token = token_file.read_text().strip()
    gcs, dash = free_port(), free_port()
    ports = {flag: str(free_port()) for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                                  "--metrics-export-port", "--runtime-env-agent-port",
                                                  "--node-manager-port", "--object-manager-port",
                                                  "--ray-client-server-port")}
    cmd = [RAY, "start", "--head", "--block", "--port", str(gcs), "--dashboard-port", str(dash),
           "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
           "--include-dashboard", "true", "--temp-dir", str(base / "t"), "--disable-usage-stats"]
    for flag, port in ports.items():
        cmd += [flag, port]
    with open(base / "ray_start.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{(base / 'ray_start.log').read_text()}"
            try:
                if http_get(url + "/api/jobs/", token)[0] == 200:  # the job server answers
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no job server at {url} in {START_TIMEOUT_S}s"
            time.sleep(1.0)
        print(f"ray head and job server up in {time.monotonic() - deadline + START_TIMEOUT_S:.1f}s")
        yield url, token_file, gcs
    finally:
        kill_group(proc)
        shutil.rmtree(base, ignore_errors=True)


def ray_job(command: str, url: str, env: dict, args: list[str], timeout: float = JOB_TIMEOUT_S):
    """``ray job COMMAND --address URL ARGS...`` (submit, stop, ...), its output captured."""
    return subprocess.run([RAY, "job", command, "--address", url, *args], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_job_submit_to_token_auth_head(ray_head, image_server, tmp_path):
    url, token_file, gcs = ray_head
    urls = write_urls(tmp_path / "urls.csv", image_server, n=N_SUBMIT, n_missing=N_MISSING)
    out = tmp_path / "out"
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(models_off_config(urls, out)))
    # The entrypoint first says where `jobs` is imported from: the uploaded working dir, not this
    # checkout (imgcurate is also installed editable here, so a missed upload would still run).
    py = sys.executable
    entry = ["--", "sh", "-c", (f"{py} -c 'import jobs; print(\"JOBS_FROM:\" + jobs.__file__)' && "
                                f"exec {py} -m jobs.curate {cfg_path}")]
    upload = ["--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES})]

    # Auth stays on: no token, or a wrong one, is refused before anything runs.
    (tmp_path / "nohome").mkdir()
    no_token = isolated_env(tmp_path, HOME=str(tmp_path / "nohome"))  # no RAY_AUTH_*, no ~/.ray/auth_token
    refused = ray_job("submit", url, no_token, ["--no-wait", *entry], timeout=120)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert "missing authentication token" in (refused.stdout + refused.stderr).lower(), refused.stderr[-3000:]
    wrong = isolated_env(tmp_path, HOME=str(tmp_path / "nohome"), RAY_AUTH_MODE="token",
                         RAY_AUTH_TOKEN="0" * 32)
    refused = ray_job("submit", url, wrong, ["--no-wait", *entry], timeout=120)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert "invalid authentication token" in (refused.stdout + refused.stderr).lower(), refused.stderr[-3000:]
    assert not out.exists()

    # With the cluster's token: the job runs to the end (`ray job submit` waits and exits 0 only then).
    with_token = isolated_env(tmp_path, HOME=str(tmp_path / "nohome"), RAY_AUTH_MODE="token",
                              RAY_AUTH_TOKEN_PATH=str(token_file))
    t0 = time.monotonic()
    try:
        done = ray_job("submit", url, with_token, [*upload, "--submission-id", "curate-1", *entry])
    except subprocess.TimeoutExpired:
        ray_job("stop", url, with_token, ["curate-1"], timeout=60)  # its driver runs in a session of its own
        raise
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs[-6000:]
    assert "succeeded" in logs.lower(), logs[-3000:]
    print(f"job submit: {time.monotonic() - t0:.1f}s")
    print("\n".join(l for l in logs.splitlines() if "JOBS_FROM" in l or "Ray cluster" in l or "local Ray" in l))
    # The driver joined this head (RAY_ADDRESS from the job server), not a local Ray of its own.
    assert f"Connecting to existing Ray cluster at address: 127.0.0.1:{gcs}" in logs, logs[-4000:]
    assert "Started a local Ray instance" not in logs
    found = re.search(r"JOBS_FROM:(/\S+)", logs)  # (the echoed entrypoint has `JOBS_FROM:" + ...`)
    assert found, logs[-4000:]
    jobs_from = found.group(1)
    assert "working_dir_files" in jobs_from and not jobs_from.startswith(str(ROOT)), jobs_from

    # Every sample accounted for, once, in the manifest and in the data files it names.
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["input_rows"] == manifest["samples"] == N_SUBMIT + N_MISSING
    assert manifest["outcomes"] == {"kept": N_SUBMIT, "failed/download/http_404": N_MISSING}
    assert sum(w["samples"] for w in manifest["waves"]) == manifest["samples"]
    counts = rows_per_sample(manifest["data_files"])
    assert len(counts) == manifest["samples"] and set(counts.values()) == {1}
    assert set(counts) == set(pq.read_table(str(out / "data")).column("sample_id").to_pylist())


# --- 2. node loss mid-wave ---------------------------------------------------------------------------
NODE_LOSS_SAMPLES = 160  # at 4 open requests of 100 ms: a wave of ~4 s before the node goes
NODE_LOSS_TIMEOUT_S = 240


def test_worker_node_lost_mid_wave_every_sample_once(sample_dir, tmp_path):
    """The worker node holding the download actor is killed a quarter of the way into the wave: Ray
    Data restarts the actor on the other node and retries its calls (its actor pools default to
    max_restarts=-1, max_task_retries=-1), and the wave's rows come out once each."""
    if RAY is None:
        pytest.skip("the `ray` CLI is not installed")
    base = short_tempdir()
    try:
        env = isolated_env(base, RAY_AUTH_MODE="token", PYTHONPATH=str(ROOT))  # auth on here too
        subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
        work = tmp_path / "work"
        work.mkdir()
        cmd = [sys.executable, str(ROOT / "tests" / "cluster_node_loss.py"), "--images", images_dir(sample_dir),
               "--work", str(work), "--n-good", str(N_GOOD), "--samples", str(NODE_LOSS_SAMPLES),
               "--latency-ms", "100", "--concurrency", "4", "--remove-after", "0.25"]
        with open(base / "node_loss.log", "w") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            proc.wait(timeout=NODE_LOSS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            kill_group(proc, grace_s=5)  # its Cluster's nodes are in its process group
        output = (base / "node_loss.log").read_text()
        assert proc.returncode == 0 and (work / "report.json").exists(), output[-6000:]
        report = json.loads((work / "report.json").read_text())
        shown = {k: v for k, v in report.items() if k not in ("rows_per_sample", "data_files", "traceback", "manifest")}
        print(f"node loss: {shown}")
        assert "remove_error" not in report, report["remove_error"]
        assert "error" not in report, report["error"] + "\n" + report.get("traceback", "") + output[-4000:]
        assert report["token_auth"] is True
        # The node went while the wave still had downloads to do, and held the download actor whose
        # calls were then redone elsewhere (more requests than samples).
        assert report["removed_held_download_actor"], report
        assert report["hits_at_removal"] < NODE_LOSS_SAMPLES and report["removed_at"] < report["finished_at"]
        assert report["requests"] > NODE_LOSS_SAMPLES, report
        # Every sample exactly once, in the data files and in the manifest.
        manifest = report["manifest"]
        assert manifest["samples"] == manifest["input_rows"] == NODE_LOSS_SAMPLES
        assert manifest["outcomes"] == {"kept": NODE_LOSS_SAMPLES}
        counts = report["rows_per_sample"]
        assert len(counts) == NODE_LOSS_SAMPLES, len(counts)
        assert {sid: n for sid, n in counts.items() if n != 1} == {}
        assert sorted(manifest["data_files"]) == report["data_files"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
