"""Download benchmark: imgcurate against img2dataset on the same URLs, cores and resize settings.

    python benchmarks/download_bench.py [--n 4000] [--repeat K (default 3)] [--skip-memory]
        [--web-latency-ms 60] [--web-seed 0] [--web-hosts 64] [--web-host-zipf 1.0]
        [--image-size PX] [--work-dir DIR] [--skip-img2dataset]
        [--photos | --sample [--latency-ms 50 --fault-rate 0.1]] [--memory-latency-ms MS]
        [--set KEY=VALUE ...] [--job-env NAME=VALUE ...]

Default: a realistic web (shared BENCHMARKS.md, "What a realistic web looks like"). A local sample
server (``python -m jobs.samples.server``, its own process, 127.0.0.1 only) serves N distinct URLs
``/web/NAME?i=K`` cycling through 64 photo-like JPEGs (``image_bench.make_jpegs``: long side uniform
in 200-1,400 px, mean ~800, aspect ratios 1:1 to 2:1 both ways, quality 75-92, ~6-320 KB). Each URL's
fate is fixed by the server's seed and the URL (``jobs.samples.server.WEB_FATES``): 89% images,
3% redirect chains of 1-3 hops to the image, and 8% that fail on the first attempt: 404 (2.5%),
500 once or twice then the image (2%), a truncated body then the image (1%), 429 with
``Retry-After: 1`` then the image (0.7%), 503 always (0.5%), HTML served as image/jpeg (0.5%),
``X-Robots-Tag: noai`` (0.5%), and 12 s before any answer on every attempt, past both tools' 10 s
timeout (0.3%). So ~3.7% need a retry to succeed and ~4.3% cannot be kept by any tool. Every
response but the slow ones first waits an exponential latency (mean 60 ms, capped at 2 s) drawn per
URL and attempt. A fresh server with the same seed serves each run, so both tools face the same web;
the fates and responses it saw are printed per run.

The realistic web has many hosts, as a real crawl does (LAION's URL lists span millions of domains, a
few CDNs holding many images): the server listens on ``--web-hosts`` K loopback addresses
(127.0.0.1 ... 127.0.0.K, one port; ``--hosts`` of ``jobs.samples.server``) and URL number k goes to
host ``jobs.samples.server.web_host(web seed, k, K)``: Zipf shares, host j (1-based) weighs 1/j^s
(``--web-host-zipf`` s, default 1). At K=64, s=1 the top host holds 21.1% of URLs (1/H_64), the top 5
48%, the last 0.33%; drawn per index, the N=4000 list gives the top host 21.05% (842 URLs), the
N=400 one 18.0% (72; 54 of the 64 hosts used). Both tools fetch the same list (only the port differs
from run to run). This matters because ours caps open requests per host
(``download.per_host_concurrency``, 16 by default, as a polite crawler must) and img2dataset does
not: on one host the benchmark would measure that cap, not the crawler. A URL's fate does not depend
on its host, so it is the same as on one host.

- img2dataset runs ``download(...)`` in a subprocess: 2 processes, 64 threads each, retries=2,
  timeout=10, one shard per process (its best case: a shard ends with its slowest URL, so smaller
  shards would each wait in turn), and imgcurate's default image settings (``operators.images.ImageConfig``: image_size,
  resize_mode, encode_format, encode_quality); it honours ``X-Robots-Tag: noai`` by its own default,
  as ours does.
- imgcurate runs ``python -m jobs.curate CONFIG`` in a subprocess with its DEFAULT config: the
  config holds only the input and output, ``download.allow_loopback: true`` (the server is on
  127.0.0.1) and ``ray.node_ip_address: 127.0.0.1`` (where its own local Ray binds), plus
  ``images.image_size`` if ``--image-size`` is given. Its download defaults are retries 2 (on 5xx,
  429, connection errors and truncated bodies; img2dataset retries every failure, 404s and timeouts
  included) and timeout 10 s, not retried (``download.retry_timeouts`` false; ``--set
  download.retry_timeouts=true`` measures ours retrying them as img2dataset does); its default reduced JPEG decode (``images.reduce_on_decode``) applies to the largest
  images (not img2dataset's exact pixels there). ``--set`` / ``--job-env`` are for experiments; the
  report lists any that were used.

The old modes stay as they were (one host, 127.0.0.1): ``--sample`` serves the dry run's sample (at most 400 px, where both
tools do the same image work) as ``/img/NAME?i=K`` with a fixed latency per request and a fraction
of faults (HTTP 500 or a dropped connection, drawn per request, so a retry can succeed); ``--photos``
serves 64 photo-like JPEGs of 500-3000 px (web and camera sizes) the same way, where imgcurate's
default reduced JPEG decode applies (PSNR ~43-47 dB against img2dataset's pixels). In those modes
ours takes the download, images and ray sections of configs/dryrun.yaml with the knobs in
``OURS_TUNING`` and ``OURS_JOB_ENV`` (measured for them on 2 cores), and img2dataset ignores
opt-out headers (as before).

Printed: images/s and successes of each and their ratio, on two bases:
- headline: the job's own time. img2dataset: the ``download()`` call. imgcurate: ``run()`` less
  the start of its local Ray cluster (in production Ray is a long-running cluster): Ray's processes
  and Ray Data's three detached service actors, which such a cluster keeps across jobs; plan
  (phase 0) and download+images (phase 1), with the start of every worker process they use, are
  included. Neither includes interpreter start and imports.
- all-inclusive: wall time of each whole command (interpreter, imports, Ray start, shutdown).
Also ours' reasons per row (manifest ``outcomes``) and its open-request occupancy (manifest
``download``: mean open requests / configured capacity; "n/a" where the job does not write it), and,
sampled every 0.2 s over the whole process tree of each command (the driver and every process it
started: raylet, GCS, Ray workers / img2dataset's pool): peak memory (RSS summed, and PSS, which
counts shared pages such as Ray's object store once) and CPU seconds per process title, so a run
says where its CPU went. Then (unless ``--skip-memory``) both tools again on 10N URLs: the ratio
once fixed start-up costs are spread thin, and the job's peak memory at N and 10N (streaming:
flat). The machine may be shared: ``--repeat K`` runs K pairs in alternating order and reports the
median ratio; CPU milliseconds per image are printed because they move less with other load.

Every figure is measured in this run; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import glob
import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    import psutil
except ImportError:  # ray vendors psutil; use its copy rather than add a dependency
    _spec = importlib.util.find_spec("ray")
    if _spec is None or not _spec.submodule_search_locations:
        raise
    sys.path.append(os.path.join(list(_spec.submodule_search_locations)[0], "thirdparty_files"))
    import psutil

N_IMAGES = 200            # distinct image files the URLs cycle through (--sample)
WEB_IMAGES = 64           # distinct web-like JPEGs the realistic web's URLs cycle through
WEB_SIDES = (200, 1400)   # their long side, uniform: mean 800 px
I2D_PROCESSES = 2         # img2dataset processes: one per core here
I2D_THREADS = 64          # threads per img2dataset process
RETRIES = 2
TIMEOUT_S = 10
ENCODE_FORMAT = "jpg"     # the old modes' image settings (the realistic web takes ours' defaults)
ENCODE_QUALITY = 95
RESIZE_MODE = "border"
MiB = 1024 * 1024
# imgcurate knobs for the old modes (--sample, --photos; config keys, as `--set` takes them; measured on
# 2 cores; the realistic web runs ours with its default config instead):
# - every URL is on one host, so the per-host cap is the global one: 64 open requests per download
#   actor, 2 actors = 128, as img2dataset's 2 x 64 threads;
# - two download actors, one per core: each holds download.num_cpus 0.25 + images.num_cpus 0.75 = 1
#   of ray.num_cpus 3 and resizes on one thread; a single actor was bound by its one GIL (~1.1 cores
#   busy, ~450 images/s at 20k URLs; two: ~570-620). The third logical CPU goes to write tasks: one
#   writer process keeps up (a write costs ~0.3 ms of CPU per row here), and a second one (ray.num_cpus
#   4) cost its start-up, ~1 s of CPU, inside a 2,000-URL run (waves of 5.7-6.0 s against 5.8-7.0 s,
#   three runs each, alternating); output.write_concurrency 1 says so to Ray Data, which otherwise
#   asks for a writer per CPU the download actors free at the end, and Ray starts a worker process
#   for each (~0.4 s of CPU apiece, never used);
# - download.batch_size stays null (the default): one call per plan shard, and Ray Data fuses the
#   shard's read into the download actor (same CPUs), so no read tasks are scheduled;
# - 8 MiB blocks: a write task per ~400 rows (64 MiB blocks did not lower the writers' CPU);
# - download.max_bytes 20 MB (the config default; the dry run caps at 2 MB): img2dataset has no cap;
# - images.reduce_on_decode null: img2dataset's exact decode and pixels. The served images are at most
#   400 px, so a reduced JPEG decode (2x the target after a 1/2 reduction: 1024 px here) would never
#   apply anyway; pinned so that both tools do the same image work by construction.
OURS_TUNING = [
    "download.concurrency=64", "download.per_host_concurrency=64", "download.pool_min=2", "download.pool_max=2",
    "download.num_cpus=0.25", "images.num_cpus=0.75", "ray.num_cpus=3", "ray.target_max_block_mb=8",
    "images.reduce_on_decode=null", "download.max_bytes=20000000", "output.write_concurrency=1",
]
# Environment of imgcurate's job in the old modes (not the realistic web). Ray runs its workers at niceness 15 by default (ray_config_def.h
# worker_niceness: "so that the OS prioritizes CPU for other processes over worker"), under `ray job
# submit` too (job_manager.py sets 0 only for the job's supervisor actor; the driver's tasks and
# actors get the default). On a dedicated node that only orders Ray's own processes; on this shared
# 2-core machine it also puts our workers below the sample server and below img2dataset's processes,
# which run at 0. So the headline runs our workers at 0, like img2dataset's; `--job-env
# RAY_worker_niceness=15` measures Ray's default (the closing note of issue #2 gives both).
OURS_JOB_ENV = ["RAY_worker_niceness=0"]


# ------------------------------------------------------------------------------ processes
_LIVE: list["Tracked"] = []


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # ours starts its own local Ray, never joins another
    env.update(NO_ALBUMENTATIONS_UPDATE="1", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT),
               RAY_DEDUP_LOGS="0", **extra)
    return env


class Tracked:
    """A subprocess in its own session; every descendant ever seen is remembered for cleanup."""

    def __init__(self, cmd: list[str], log_path: Path | None, **kw):
        self.log = open(log_path, "wb") if log_path else None
        out = kw.pop("stdout", self.log if self.log else subprocess.DEVNULL)
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT if self.log else None,
                                     start_new_session=True, **kw)
        self.seen: dict[int, float] = {}
        self._lock = threading.Lock()
        _LIVE.append(self)

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return []
        with self._lock:
            for p in procs:
                try:
                    self.seen.setdefault(p.pid, p.create_time())
                except psutil.Error:
                    pass
        return procs

    def stop(self) -> None:
        """Kill the process group, then any descendant that left it (Ray daemons) and is still alive."""
        self.tree()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        with self._lock:
            seen = dict(self.seen)
        for pid, created in seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:  # the same process, not a reused pid
                    p.kill()
            except psutil.Error:
                pass
        if self.log:
            self.log.close()
        if self in _LIVE:
            _LIVE.remove(self)


def _stop_all() -> None:
    for t in list(_LIVE):
        t.stop()


atexit.register(_stop_all)


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds through the finally blocks, then atexit


def _label(p: psutil.Process) -> str:
    """What a process is: Ray's title (ray::MapWorker(...), ray::IDLE), raylet, gcs_server, python -m ..."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    if not cmd:
        return p.name()
    if cmd[0].startswith("ray::"):
        return " ".join(c for c in cmd if c).strip()[:60]
    exe = os.path.basename(cmd[0])
    if exe.startswith("python"):
        rest = [c for c in cmd[1:] if not c.startswith("-") or c == "-m"]
        if "multiprocessing" in " ".join(rest):
            return "python (multiprocessing child)"
        if rest[:1] == ["-m"]:
            return "python -m " + rest[1] if len(rest) > 1 else "python"
        return "python " + os.path.basename(rest[0]) if rest else "python"
    return exe


class TreeSampler(threading.Thread):
    """Every ``interval_s``: RSS and PSS summed over a process tree (peaks kept) and each process's CPU time.

    CPU seconds are kept per process (last reading) with the busiest title Ray gave it, so a run can
    say where its CPU went (image workers, download actor, driver, raylet, ...).
    """

    def __init__(self, tracked: Tracked, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.tracked, self.interval_s = tracked, interval_s
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.rss_at_peak: dict[str, int] = {}               # title -> RSS summed, at the peak
        self.peak_by_label: dict[str, int] = {}             # title -> its own peak of RSS summed
        self.cpu: dict[tuple[int, float], float] = {}      # (pid, create_time) -> user+sys seconds
        self.labels: dict[tuple[int, float], str] = {}
        self._stop_evt = threading.Event()

    def sample(self) -> None:
        rss = pss = 0
        per_label: dict[str, int] = {}
        procs = self.tracked.tree()
        for p in procs:
            try:
                m = p.memory_full_info()  # smaps_rollup: rss and pss in one read
                key = (p.pid, p.create_time())
                t = p.cpu_times()
                label = _label(p)
            except psutil.Error:
                continue
            rss += m.rss
            pss += getattr(m, "pss", m.rss)
            self.cpu[key] = t.user + t.system
            if key not in self.labels or (label.startswith("ray::") and label != "ray::IDLE"):
                self.labels[key] = label  # a Ray worker keeps the title of the last work it did
            per_label[self.labels[key]] = per_label.get(self.labels[key], 0) + m.rss
        if rss > self.peak_rss:
            self.peak_rss, self.rss_at_peak = rss, per_label
        for lab, v in per_label.items():
            self.peak_by_label[lab] = max(self.peak_by_label.get(lab, 0), v)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self.sample()
            self._stop_evt.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()

    def cpu_by_label(self) -> dict[str, tuple[int, float]]:
        out: dict[str, tuple[int, float]] = {}
        for key, sec in self.cpu.items():
            lab = self.labels.get(key, "?")
            n, tot = out.get(lab, (0, 0.0))
            out[lab] = (n + 1, tot + sec)
        return dict(sorted(out.items(), key=lambda kv: -kv[1][1]))


def run_measured(cmd: list[str], log_path: Path, timeout_s: float, env: dict | None = None) -> dict:
    t = Tracked(cmd, log_path, env=_env(**(env or {})))
    sampler = TreeSampler(t)
    t0 = time.monotonic()
    sampler.start()
    try:
        rc = t.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.monotonic() - t0
    sampler.stop()
    t.stop()
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{' '.join(cmd[:4])}... {'timed out' if rc is None else f'exited {rc}'}; "
                           f"log {log_path}:\n{tail}")
    by_label = sampler.cpu_by_label()
    return {"wall_s": wall, "peak_rss": sampler.peak_rss, "peak_pss": sampler.peak_pss,
            "peak_procs": sampler.peak_procs, "procs": len(sampler.cpu),
            "cpu_s": sum(v for _, v in by_label.values()), "cpu_by_label": by_label,
            "rss_at_peak": dict(sorted(sampler.rss_at_peak.items(), key=lambda kv: -kv[1])),
            "peak_by_label": dict(sorted(sampler.peak_by_label.items(), key=lambda kv: -kv[1]))}


class ServerProc:
    """``python -m jobs.samples.server`` in its own process (not sharing a GIL with a client)."""

    def __init__(self, images: Path, latency_ms: float, fault_rate: float, seed: int = 0,
                 web_latency_ms: float = 60.0, web_seed: int = 0, hosts: int = 1):
        from jobs.samples.server import parse_listening_line

        cmd = [sys.executable, "-m", "jobs.samples.server", "--dir", str(images), "--host", "127.0.0.1",
               "--hosts", str(hosts), "--port", "0", "--latency-ms", str(latency_ms), "--fault-rate",
               str(fault_rate), "--seed", str(seed), "--web-latency-ms", str(web_latency_ms),
               "--web-seed", str(web_seed)]
        self.t = Tracked(cmd, None, stdout=subprocess.PIPE, env=_env())
        line = self._first_line(30.0)
        try:
            self.base_urls = parse_listening_line(line)
        except ValueError:
            self.t.stop()
            raise RuntimeError(f"sample server did not start: {line!r}") from None
        self.base_url = self.base_urls[0]
        port = self.base_url.rsplit(":", 1)[-1]
        expected = [f"http://127.0.0.{k + 1}:{port}" for k in range(hosts)]  # hosts <= 254 (argparse)
        if not self.base_url.startswith("http://127.0.0.1:") or self.base_urls != expected:
            self.t.stop()
            raise RuntimeError(f"sample server is not on the expected loopback hosts: {self.base_urls}")

    def _first_line(self, timeout_s: float) -> str:
        out = self.t.proc.stdout
        ready, _, _ = select.select([out], [], [], timeout_s)
        return out.readline().decode(errors="replace") if ready else ""

    def cpu_s(self) -> float:
        t = psutil.Process(self.t.proc.pid).cpu_times()
        return t.user + t.system

    def web_stats(self) -> dict:
        """What the realistic web saw: distinct URLs per fate, responses per kind (``/web-stats``)."""
        import urllib.request

        with urllib.request.urlopen(self.base_url + "/web-stats", timeout=10) as resp:
            return json.loads(resp.read())

    def __enter__(self) -> "ServerProc":
        return self

    def __exit__(self, *exc) -> None:
        self.t.stop()
        self.t.proc.stdout.close()


# ------------------------------------------------------------------------------ inputs
def prepare_images(work: Path, mode: str) -> tuple[Path, list[str]]:
    from jobs.samples.data import generate_images, good_image_names

    if mode == "photos":
        return prepare_photos(work)
    if mode == "web":
        return prepare_web(work)
    images = work / "images"
    marker = images / ".bench-generated"
    if not marker.exists():
        generate_images(str(images), n_good=N_IMAGES, seed=0)
        marker.write_text("ok\n")
    return images, good_image_names(N_IMAGES)


def prepare_photos(work: Path, n: int = 64) -> tuple[Path, list[str]]:
    """Photo-like JPEGs at web and camera sizes (benchmarks/image_bench.py's images)."""
    from benchmarks.image_bench import make_jpegs

    images = work / "photos"
    names = [f"photo-{i:03d}.jpg" for i in range(n)]
    marker = images / ".bench-generated"
    if not marker.exists():
        images.mkdir(parents=True, exist_ok=True)
        for name, data in zip(names, make_jpegs(n)):
            (images / name).write_bytes(data)
        marker.write_text("ok\n")
    return images, names


def prepare_web(work: Path, n: int = WEB_IMAGES) -> tuple[Path, list[str]]:
    """Web-like JPEGs (image_bench's make_jpegs with a side range): 200-1,400 px, mean ~800 px."""
    from benchmarks.image_bench import make_jpegs

    images = work / "web"
    names = [f"web-{i:03d}.jpg" for i in range(n)]
    marker = images / ".bench-generated"
    if not marker.exists():
        images.mkdir(parents=True, exist_ok=True)
        for name, data in zip(names, make_jpegs(n, sides=WEB_SIDES, seed=0)):
            (images / name).write_bytes(data)
        marker.write_text("ok\n")
    return images, names


def describe_images(images: Path, names: list[str]) -> str:
    from PIL import Image

    sizes, kb = [], []
    for name in names:
        with Image.open(images / name) as im:
            sizes.append(im.size)
        kb.append((images / name).stat().st_size / 1024)
    longs = [max(wh) for wh in sizes]
    return (f"{len(names)} JPEGs, sides {min(min(wh) for wh in sizes)}-{max(longs)} px (long side mean "
            f"{sum(longs) / len(longs):.0f} px), {min(kb):.0f}-{max(kb):.0f} KB (mean {sum(kb) / len(kb):.0f} KB)")


def url_hosts(n: int, hosts: int, exponent: float, seed: int) -> list[int]:
    """The host (0-based) of each of the N URLs: Zipf shares, drawn per index (``web_host``)."""
    from jobs.samples.server import web_host

    return [web_host(seed, k, hosts, exponent) for k in range(n)]


def host_spread(hosts_of: list[int], hosts: int, exponent: float) -> dict:
    """How a URL list spreads over its hosts: the top host's share, expected and drawn, and more."""
    from jobs.samples.server import web_host_weights

    counts = sorted((hosts_of.count(h) for h in range(hosts)), reverse=True)
    n = max(len(hosts_of), 1)
    return {"hosts": hosts, "exponent": exponent, "expected_top": web_host_weights(hosts, exponent)[0],
            "top": counts[0] / n, "top_urls": counts[0], "top5": sum(counts[:5]) / n,
            "used": sum(1 for c in counts if c), "least": counts[-1]}


def write_urls(path: Path, base_urls: list[str], n: int, names: list[str], route: str = "img",
               hosts_of: list[int] | None = None) -> Path:
    """N URLs ``BASE/ROUTE/NAME?i=K``; URL K on ``base_urls[hosts_of[K]]`` (all on the first without)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for k in range(n):
            base = base_urls[hosts_of[k]] if hosts_of else base_urls[0]
            w.writerow([f"{base}/{route}/{names[k % len(names)]}?i={k}", f"benchmark image {k}"])
    return path


# ------------------------------------------------------------------------------ img2dataset
def img2dataset_child(spec_json: str) -> int:
    """Runs in the subprocess: times the ``download()`` call alone and prints it."""
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    from img2dataset import download

    spec = json.loads(spec_json)
    t0 = time.time()
    download(**spec)
    print("BENCH_RESULT " + json.dumps({"download_s": time.time() - t0}), flush=True)
    return 0


def run_img2dataset(work: Path, urls: Path, n: int, image: dict, honour_optout: bool) -> dict:
    out = work / "img2dataset-out"
    shutil.rmtree(out, ignore_errors=True)
    spec = dict(
        url_list=str(urls), input_format="csv", url_col="url", caption_col="caption",
        output_format="parquet", output_folder=str(out),
        processes_count=I2D_PROCESSES, thread_count=I2D_THREADS, distributor="multiprocessing",
        image_size=image["image_size"], resize_mode=image["resize_mode"], encode_format=image["encode_format"],
        encode_quality=image["encode_quality"],
        # One shard per process: img2dataset finishes a shard only when its slowest URL is done
        # (a 12 s response retried twice holds it ~35 s), so more, smaller shards would each pay
        # that barrier in turn; this is img2dataset's best case on these URLs.
        retries=RETRIES, timeout=TIMEOUT_S, number_sample_per_shard=max(1, -(-n // I2D_PROCESSES)),
        enable_wandb=False,
        # None: img2dataset's default (drop noai, noimageai, noindex, noimageindex), as ours does;
        # []: ignore opt-outs (the old modes, as before).
        disallowed_header_directives=None if honour_optout else [],
    )
    log = work / "img2dataset.log"
    m = run_measured([sys.executable, str(Path(__file__).resolve()), "_img2dataset", json.dumps(spec)], log,
                     timeout_s=1800)
    result = None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line.split(" ", 1)[1])
    if result is None:
        raise RuntimeError(f"img2dataset printed no result; see {log}")
    successes = sum(json.loads(Path(p).read_text()).get("successes", 0) for p in glob.glob(str(out / "*_stats.json")))
    import pyarrow.dataset as pads

    files = sorted(glob.glob(str(out / "*.parquet")))
    status = pads.dataset(files, format="parquet").to_table(columns=["status"]).column("status").to_pylist()
    rows_ok = sum(1 for s in status if s == "success")
    if rows_ok != successes:
        raise RuntimeError(f"img2dataset: stats say {successes} successes, Parquet has {rows_ok}")
    return {**m, "job_s": result["download_s"], "successes": successes, "rows": len(status)}


# ------------------------------------------------------------------------------ imgcurate
def ours_config(urls: Path, out: Path, image_size: int, shard_rows: int | None, overrides: list[str],
                mode: str = "web", image_size_given: bool = False) -> dict:
    """The realistic web: ours' default config (input, output, loopback allowed, Ray on 127.0.0.1, the
    image size only if given). Old modes: the download, images and ray sections of configs/dryrun.yaml
    with img2dataset's image and retry settings and ``OURS_TUNING``. Every other section (model
    stages, selection) at its default: off. ``overrides`` (``--set``) last, in every mode."""
    import yaml

    from jobs.config import apply_override, load_config

    if mode == "web":
        data = {
            "name": "download-bench",
            "input": {"paths": [str(urls)], "url_column": "url", "caption_columns": ["caption"]},
            "output": {"path": str(out)},
            "download": {"allow_loopback": True},   # the sample server is on 127.0.0.1
            "ray": {"node_ip_address": "127.0.0.1"},  # where our local Ray binds: loopback only
        }
        if image_size_given:
            data["images"] = {"image_size": image_size}
        for o in overrides:
            apply_override(data, o)
        load_config(data=data)
        return data
    dry = yaml.safe_load((ROOT / "configs" / "dryrun.yaml").read_text())
    images = {k: v for k, v in dry["images"].items() if k not in ("min_image_size", "max_aspect_ratio")}
    images.update({"image_size": image_size, "resize_mode": RESIZE_MODE, "encode_format": ENCODE_FORMAT,
                   "encode_quality": ENCODE_QUALITY})
    data = {
        "name": "download-bench",
        "input": {"paths": [str(urls)], "url_column": "url", "caption_columns": ["caption"]},
        "output": {"path": str(out)},
        "plan": {"num_buckets": 8, "shard_rows": shard_rows},
        "download": {**dry["download"], "timeout_s": TIMEOUT_S, "connect_timeout_s": TIMEOUT_S, "retries": RETRIES},
        "images": images,
        "ray": dict(dry["ray"]),
    }
    for o in [*OURS_TUNING, *overrides]:  # (--photos adds images.reduce_on_decode=2.0 to overrides)
        apply_override(data, o)
    load_config(data=data)  # fail here, not in the subprocess, on a bad key
    return data


def run_ours(work: Path, urls: Path, tag: str, image_size: int, shard_rows: int | None, overrides: list[str],
             job_env: dict, mode: str = "web", image_size_given: bool = False) -> dict:
    import yaml

    out = work / f"imgcurate-out-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    cfg_path = work / f"imgcurate-{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(ours_config(urls, out, image_size, shard_rows, overrides, mode,
                                                   image_size_given)))
    m = run_measured([sys.executable, "-m", "jobs.curate", str(cfg_path)], work / f"imgcurate-{tag}.log",
                     timeout_s=3600, env=job_env)
    manifest = json.loads((out / "_manifest.json").read_text())
    plan = json.loads((out / "plan" / "_PLAN.json").read_text())
    t = manifest["timings"]
    # init_ray (local Ray + Ray Data's service actors) and the output identity check
    ray_start_s = max(0.0, t["plan_s"] - plan["seconds"])
    return {**m, "job_s": t["total_s"] - ray_start_s, "ray_start_s": ray_start_s, "plan_s": plan["seconds"],
            "phase1_s": t["phase1_s"], "successes": manifest["kept"], "samples": manifest["samples"],
            "outcomes": manifest["outcomes"], "occupancy": manifest.get("download")}


def precompile() -> None:
    """Bytecode for our packages, as pip wrote it for img2dataset at install. An editable install
    under PYTHONDONTWRITEBYTECODE=1 (set on some machines, this one included) would otherwise
    compile operators/ and jobs/ from source in every Ray worker (~0.25 s of CPU each)."""
    import compileall

    for pkg in ("operators", "jobs"):
        compileall.compile_dir(str(ROOT / pkg), quiet=1)


# ------------------------------------------------------------------------------ ceiling
def image_work_ms(images: Path, names: list[str], image: dict, reduce_on_decode: float | None | str,
                  reps: int = 3) -> float:
    """CPU milliseconds per image of imgcurate's image work alone, as this run configures it (header,
    decode, resize, encode, sha256), in this process, over the served images. ``reduce_on_decode``
    "default": ours' default."""
    from benchmarks.image_bench import cpu_ms
    from operators.images import ImageConfig, ImageProcessor

    extra = {} if reduce_on_decode == "default" else {"reduce_on_decode": reduce_on_decode}
    proc = ImageProcessor(ImageConfig(**image, **extra))
    return cpu_ms(proc._one, [(images / name).read_bytes() for name in names], reps)


# ------------------------------------------------------------------------------ main
def _rate(n: int, s: float) -> float:
    return n / s if s > 0 else float("nan")


def _server(images: Path, args, latency_ms: float) -> ServerProc:
    """A fresh server with the same seeds: the realistic web (``latency_ms`` its mean), or the old
    modes' fixed latency and faults."""
    if args.mode == "web":
        return ServerProc(images, 0.0, 0.0, web_latency_ms=latency_ms, web_seed=args.web_seed,
                          hosts=args.web_hosts)
    return ServerProc(images, latency_ms, args.fault_rate)


def _write_urls(srv: ServerProc, path: Path, n: int, names: list[str], args) -> Path:
    """The same list for both tools: the realistic web's URLs over its hosts; one host otherwise."""
    if args.mode != "web":
        return write_urls(path, srv.base_urls, n, names, "img")
    return write_urls(path, srv.base_urls, n, names, "web",
                      url_hosts(n, args.web_hosts, args.web_host_zipf, args.web_seed))


def _web_stats(srv: ServerProc, args) -> dict | None:
    return srv.web_stats() if args.mode == "web" else None


def _measure_i2d(images: Path, names: list[str], work: Path, args, n: int, latency_ms: float) -> dict:
    with _server(images, args, latency_ms) as srv:
        urls = _write_urls(srv, work / "urls-i2d.csv", n, names, args)
        print(f"[bench] img2dataset on {n} URLs ...", file=sys.stderr, flush=True)
        c0 = srv.cpu_s()
        r = run_img2dataset(work, urls, n, args.image, honour_optout=args.mode == "web")
        r["server_cpu_s"] = srv.cpu_s() - c0
        r["web"] = _web_stats(srv, args)
    return r


def _measure_ours(images: Path, names: list[str], work: Path, args, n: int, tag: str, latency_ms: float,
                  shard_rows: int | None, job_env: dict) -> dict:
    with _server(images, args, latency_ms) as srv:
        urls = _write_urls(srv, work / f"urls-ours-{tag}.csv", n, names, args)
        print(f"[bench] imgcurate on {n} URLs ...", file=sys.stderr, flush=True)
        c0 = srv.cpu_s()
        r = run_ours(work, urls, tag, args.image["image_size"], shard_rows, args.overrides, job_env, args.mode,
                     args.image_size is not None)
        r["server_cpu_s"] = srv.cpu_s() - c0
        r["web"] = _web_stats(srv, args)
    return r


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    k = len(xs) // 2
    return xs[k] if len(xs) % 2 else (xs[k - 1] + xs[k]) / 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None,
                   help="URLs (distinct samples); default 4000 (the realistic web), 2000 (--sample, --photos)")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--sample", action="store_true",
                       help="the old default: the dry-run sample's images (<= 400 px) under a fixed --latency-ms "
                            "and --fault-rate, ours tuned with OURS_TUNING and OURS_JOB_ENV")
    modes.add_argument("--photos", action="store_true",
                       help="as --sample, but serve 64 photo-like JPEGs of 500-3000 px (image_bench.py's mix) and "
                            "let imgcurate use its default reduced JPEG decode (images.reduce_on_decode 2: not "
                            "img2dataset's exact pixels, PSNR ~43-47 dB against them)")
    p.add_argument("--web-latency-ms", type=float, default=60.0,
                   help="the realistic web: mean of its exponential latency (capped at 2 s)")
    p.add_argument("--web-seed", type=int, default=0, help="the realistic web: seed of the URLs' fates and hosts")
    p.add_argument("--web-hosts", type=int, default=64,
                   help="the realistic web: loopback hosts the URLs spread over (127.0.0.1 ... 127.0.0.K)")
    p.add_argument("--web-host-zipf", type=float, default=1.0,
                   help="the realistic web: Zipf exponent of the hosts' shares (host j weighs 1/j^s; 0: even)")
    p.add_argument("--latency-ms", type=float, default=50.0, help="--sample/--photos: fixed latency per request")
    p.add_argument("--fault-rate", type=float, default=0.1, help="--sample/--photos: share of requests that fail")
    p.add_argument("--image-size", type=int, default=None,
                   help="default: ours' default (images.image_size) on the realistic web; 256 otherwise")
    p.add_argument("--repeat", type=int, default=3,
                   help="pairs of runs (order alternates); the median ratio is the headline (one pair is noisy)")
    p.add_argument("--skip-memory", action="store_true", help="skip the 10N runs (memory, and throughput at 10N)")
    p.add_argument("--memory-latency-ms", type=float, default=None,
                   help="server latency for the 10N runs (the realistic web: its mean; default: the N runs')")
    p.add_argument("--work-dir", default=None, help="kept afterwards; default: a temporary folder, removed")
    p.add_argument("--skip-img2dataset", action="store_true", help="run ours only (tuning)")
    p.add_argument("--job-env", dest="job_env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for imgcurate's job process (and so its local Ray), e.g. a Ray Data "
                        "knob; experiments only: the realistic web's headline uses none")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of imgcurate's job config (after the benchmark's own settings); "
                        "experiments only: the realistic web's headline uses none")
    args = p.parse_args(argv)
    args.mode = "photos" if args.photos else "sample" if args.sample else "web"
    if args.n is None:
        args.n = 4000 if args.mode == "web" else 2000
    if args.n < 1 or args.repeat < 1:
        p.error("--n and --repeat must be >= 1")
    if not 1 <= args.web_hosts <= 254:  # 127.0.0.1 ... 127.0.0.254
        p.error(f"--web-hosts must be in [1, 254], got {args.web_hosts}")
    if args.web_host_zipf < 0:
        p.error(f"--web-host-zipf must be >= 0, got {args.web_host_zipf}")
    if args.photos:
        args.overrides = ["images.reduce_on_decode=2.0", *args.overrides]
    bad_env = [kv for kv in args.job_env if "=" not in kv]
    if bad_env:
        p.error(f"--job-env expects NAME=VALUE, got {bad_env}")
    if args.mode == "web":
        from operators.images import ImageConfig

        d = ImageConfig()  # ours' defaults, which img2dataset is given too
        args.image = {"image_size": args.image_size or d.image_size, "resize_mode": d.resize_mode,
                      "encode_format": d.encode_format, "encode_quality": d.encode_quality}
        for o in args.overrides:  # an experiment that sets ours' image settings: img2dataset follows
            key, _, value = o.partition("=")
            if key.startswith("images.") and key[7:] in args.image:
                args.image[key[7:]] = type(args.image[key[7:]])(value)
    else:
        args.image = {"image_size": args.image_size or 256, "resize_mode": RESIZE_MODE,
                      "encode_format": ENCODE_FORMAT, "encode_quality": ENCODE_QUALITY}

    signal.signal(signal.SIGTERM, _on_signal)
    precompile()
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="download-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # fixed from N (the 10N run keeps the same config); the realistic web: ours' default plan
    shard_rows = None if args.mode == "web" else max(1, -(-args.n // 8))
    cores = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()[0]
    job_env = dict(kv.split("=", 1) for kv in [*([] if args.mode == "web" else OURS_JOB_ENV), *args.job_env])
    latency = args.web_latency_ms if args.mode == "web" else args.latency_ms
    mem_latency = latency if args.memory_latency_ms is None else args.memory_latency_ms
    pairs: list[tuple[dict | None, dict]] = []
    big = big_i2d = None
    img_ms = None
    try:
        images, names = prepare_images(work, args.mode)
        args.images_desc = describe_images(images, names)
        for rep in range(args.repeat):
            i2d = ours = None
            for tool in (("i2d", "ours") if rep % 2 == 0 else ("ours", "i2d")):
                if tool == "i2d" and not args.skip_img2dataset:
                    i2d = _measure_i2d(images, names, work, args, args.n, latency)
                elif tool == "ours":
                    ours = _measure_ours(images, names, work, args, args.n, "n", latency, shard_rows, job_env)
            pairs.append((i2d, ours))
        reduce = {"web": "default", "photos": 2.0, "sample": None}[args.mode]
        img_ms = image_work_ms(images, names, args.image, reduce)
        if not args.skip_memory:
            if not args.skip_img2dataset:
                big_i2d = _measure_i2d(images, names, work, args, 10 * args.n, mem_latency)
            big = _measure_ours(images, names, work, args, 10 * args.n, "10n", mem_latency, shard_rows, job_env)
    finally:
        _stop_all()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()[0]
    print(report(args, pairs, big, big_i2d, shard_rows, cores, load_before, load_after, mem_latency, img_ms,
                 job_env))
    return 0


def _occupancy(r: dict) -> str:
    occ = r.get("occupancy")
    if not isinstance(occ, dict) or "occupancy" not in occ:
        return "occupancy n/a"
    return (f"occupancy {occ['occupancy']:.0%} (mean {occ.get('mean_open_requests', float('nan')):.1f} open requests "
            f"of {occ.get('concurrency', '?')})")


def _web_line(r: dict) -> str:
    w = r.get("web")
    if not w:
        return ""
    return (f"server saw: URLs per fate {json.dumps(w['urls'])}; responses {json.dumps(w['responses'])} "
            f"({w['attempts']} requests)")


def _header(args, shard_rows, cores, load_before, load_after, job_env) -> list[str]:
    im = args.image
    img = f"image_size {im['image_size']} {im['resize_mode']} {im['encode_format']} q{im['encode_quality']}"
    load = f"{cores} cores (1-min load average {load_before:.1f} before, {load_after:.1f} after)"
    i2d = (f"  img2dataset {_version('img2dataset')}: {I2D_PROCESSES} processes x {I2D_THREADS} threads, "
           f"retries {RETRIES}, timeout {TIMEOUT_S}s, output parquet")
    env = f"; job environment {' '.join(f'{k}={v}' for k, v in job_env.items())}" if job_env else ""
    if args.mode == "web":
        from jobs.samples.server import WEB_FATES, WEB_OK_SHARE
        from operators.download import DownloadConfig

        fates = ", ".join(f"{k} {v:.1%}" for k, v in [("ok", WEB_OK_SHARE), *WEB_FATES])
        k = args.web_hosts
        sp = host_spread(url_hosts(args.n, k, args.web_host_zipf, args.web_seed), k, args.web_host_zipf)
        hosts = (f"  hosts: {k} (127.0.0.1-127.0.0.{k}, one port), Zipf s={args.web_host_zipf:g} (host j weighs "
                 f"1/j^s): top host {sp['top']:.1%} of these {args.n} URLs ({sp['top_urls']}; expected "
                 f"{sp['expected_top']:.1%}), top 5 {sp['top5']:.1%}, {sp['used']} hosts used, the least "
                 f"{sp['least']} URLs; ours caps open requests per host (download.per_host_concurrency "
                 f"{DownloadConfig().per_host_concurrency} per actor), img2dataset does not")
        extra = (f"; EXPERIMENT, not the headline: --set {' '.join(args.overrides)}" if args.overrides else "")
        return [
            f"download benchmark, realistic web: N={args.n} URLs, exponential latency mean {args.web_latency_ms:g} ms "
            f"(cap 2 s), web seed {args.web_seed}, {img} (imgcurate's defaults, given to both), {load}",
            f"  fates of the URLs: {fates} (slow: 12 s on every attempt; 404/503/html/optout/slow cannot be kept)",
            hosts,
            f"  images served: {args.images_desc}",
            i2d + ", honours X-Robots-Tag noai (its default)",
            f"  imgcurate (ray {_version('ray')}): default config (input, output, download.allow_loopback true, "
            f"ray.node_ip_address 127.0.0.1{', images.image_size' if args.image_size else ''}){extra}{env}",
        ]
    served = ("64 photo-like JPEGs, 500-3000 px (--photos); imgcurate decodes big JPEGs at reduced scale "
              "(images.reduce_on_decode 2.0)" if args.mode == "photos" else
              f"the dry-run sample's {N_IMAGES} images (<= 400 px); both tools do the same image work")
    return [
        f"download benchmark (--{args.mode}): N={args.n} URLs, latency {args.latency_ms:g} ms, faults "
        f"{args.fault_rate:.0%}, {img}, {load}",
        "  images served: " + served,
        i2d + ", ignores opt-out headers",
        f"  imgcurate (ray {_version('ray')}): download/images/ray of configs/dryrun.yaml, no model stages, "
        f"plan.shard_rows={shard_rows} {' '.join([*OURS_TUNING, *args.overrides])}, retries {RETRIES}, "
        f"timeout {TIMEOUT_S}s{env}",
    ]


def report(args, pairs, big, big_i2d, shard_rows, cores, load_before, load_after, mem_latency, img_ms,
           job_env) -> str:
    n = args.n
    lines = _header(args, shard_rows, cores, load_before, load_after, job_env) + [
        "",
        f"{'tool':<14} {'job_s':>6} {'images/s':>9} {'wall_s':>7} {'images/s':>9} {'successes':>11} "
        f"{'peak RSS':>9} {'peak PSS':>9} {'CPU s':>6} {'CPU ms/img':>10}",
        f"{'':<14} {'headline basis':>16} {'whole command':>17}",
    ]

    def row(name: str, r: dict) -> str:
        return (f"{name:<14} {r['job_s']:>6.1f} {_rate(r['successes'], r['job_s']):>9.1f} {r['wall_s']:>7.1f} "
                f"{_rate(r['successes'], r['wall_s']):>9.1f} {r['successes']:>6}/{r['n']:<4} "
                f"{r['peak_rss'] / MiB:>7.0f}Mi {r['peak_pss'] / MiB:>7.0f}Mi {r['cpu_s']:>6.1f} "
                f"{1000 * r['cpu_s'] / max(r['successes'], 1):>10.1f}")

    ratios, ratios_all, enough = [], [], []
    for k, (i2d, ours) in enumerate(pairs):
        tag = f" #{k + 1}" if len(pairs) > 1 else ""
        for r in (i2d, ours):
            if r:
                r["n"] = n
        if i2d:
            lines.append(row("img2dataset" + tag, i2d))
            if i2d.get("web"):
                lines.append(f"{'':<14} img2dataset: {_web_line(i2d)}")
        lines.append(row("imgcurate" + tag, ours))
        lines.append(f"{'':<14} imgcurate: Ray start {ours['ray_start_s']:.1f}s (with Ray Data's service actors; not in job_s), plan "
                     f"{ours['plan_s']:.1f}s, phase 1 {ours['phase1_s']:.1f}s = "
                     f"{_rate(ours['successes'], ours['phase1_s']):.1f} images/s (phase 1 only); {_occupancy(ours)}")
        lines.append(f"{'':<14} imgcurate: reasons {json.dumps(ours['outcomes'])}")
        if ours.get("web"):
            lines.append(f"{'':<14} imgcurate: {_web_line(ours)}")
        if i2d:
            ratios.append(_rate(ours["successes"], ours["job_s"]) / _rate(i2d["successes"], i2d["job_s"]))
            ratios_all.append(_rate(ours["successes"], ours["wall_s"]) / _rate(i2d["successes"], i2d["wall_s"]))
            enough.append(ours["successes"] >= i2d["successes"])
    i2d, ours = pairs[-1]
    lines.append("")
    lines.append("where the CPU went (last pair; CPU seconds per process title, xK = K processes):")
    for name, r in (("img2dataset", i2d), ("imgcurate", ours)):
        if r:
            top = ", ".join(f"{lab} x{k} {sec:.1f}" for lab, (k, sec) in list(r["cpu_by_label"].items())[:8])
            lines.append(f"  {name}: {r['cpu_s']:.1f}s in {r['procs']} processes (+ sample server "
                         f"{r['server_cpu_s']:.1f}s): {top}")
    lines.append("")
    lines.append("images/s = successes / seconds. job_s: img2dataset's download() call; imgcurate's run() less the start "
                 "of its local Ray cluster and Ray Data's detached service actors (a long-running cluster in production "
                 "has both). Neither counts interpreter start and imports; wall_s counts everything.")
    lines.append("")
    lines.append(f"summary ({len(pairs)} pair{'s' if len(pairs) > 1 else ''}, alternating order; medians):")
    ours_rates = [_rate(b["successes"], b["job_s"]) for _, b in pairs]
    lines.append(f"  imgcurate:   {_median(ours_rates):.1f} images/s (each: {', '.join(f'{x:.1f}' for x in ours_rates)}); "
                 f"successes {', '.join(str(b['successes']) for _, b in pairs)} of {n}")
    if ratios:
        i2d_rates = [_rate(a["successes"], a["job_s"]) for a, _ in pairs]
        lines.append(f"  img2dataset: {_median(i2d_rates):.1f} images/s (each: {', '.join(f'{x:.1f}' for x in i2d_rates)}); "
                     f"successes {', '.join(str(a['successes']) for a, _ in pairs)} of {n}")
    occs = [b["occupancy"]["occupancy"] for _, b in pairs if isinstance(b.get("occupancy"), dict)
            and "occupancy" in b["occupancy"]]
    lines.append(f"  imgcurate open-request occupancy: "
                 + (f"{_median(occs):.0%} (each: {', '.join(f'{x:.0%}' for x in occs)})" if occs else "n/a"))
    if ratios:
        ratio, ratio_all = _median(ratios), _median(ratios_all)
        ok = ratio >= 1.5 and all(enough) and len(ratios) >= 3
        each = f" (each pair: {', '.join(f'{x:.2f}' for x in ratios)})" if len(ratios) > 1 else ""
        lines.append(f"  ratio (imgcurate / img2dataset, images/s, job_s basis): {ratio:.2f}{each}   target >= 1.5 "
                     f"with at least as many successes: {'MET' if ok else 'NOT MET'}"
                     + (f" (from {len(ratios)} pair{'s' if len(ratios) > 1 else ''}; the target asks for the median of at "
                        "least three)" if len(ratios) < 3 else ""))
        lines.append(f"  ratio on whole-command wall time (incl. Ray start and imports): {ratio_all:.2f}")
        cpu_ratio = _median([(a["cpu_s"] / max(a["successes"], 1)) / (b["cpu_s"] / max(b["successes"], 1))
                             for a, b in pairs if a])
        lines.append(f"  CPU per image, img2dataset / imgcurate: {cpu_ratio:.2f} (above 1: ours spends less CPU per image)")
        lines.append("  successes: " + "; ".join(f"imgcurate {b['successes']} vs img2dataset {a['successes']} of {n}"
                                                 for a, b in pairs if a))
    if img_ms:
        lines.append(ceiling_line(img_ms, cores, [(f"N={n}", i2d, ours)] + ([(f"10N={10 * n}", big_i2d, big)] if big else [])))
    if big:
        n10 = 10 * n
        base_latency = args.web_latency_ms if args.mode == "web" else args.latency_ms
        note = "" if mem_latency == base_latency else f" (server latency {mem_latency:g} ms; config otherwise the same)"
        lines.append("")
        lines.append(f"at 10N = {n10} URLs{note}:")
        big["n"] = n10
        if big_i2d:
            big_i2d["n"] = n10
            lines.append(row("img2dataset", big_i2d))
        lines.append(row("imgcurate", big))
        lines.append(f"{'':<14} imgcurate: Ray start {big['ray_start_s']:.1f}s (not in job_s), plan "
                     f"{big['plan_s']:.1f}s, phase 1 {big['phase1_s']:.1f}s = "
                     f"{_rate(big['successes'], big['phase1_s']):.1f} images/s (phase 1 only); {_occupancy(big)}")
        for name, r in (("img2dataset", big_i2d), ("imgcurate", big)):
            if r:
                top = ", ".join(f"{lab} x{k} {sec:.1f}" for lab, (k, sec) in list(r["cpu_by_label"].items())[:8])
                lines.append(f"  CPU of {name}: {r['cpu_s']:.1f}s in {r['procs']} processes (+ sample server "
                             f"{r['server_cpu_s']:.1f}s): {top}")
        if big_i2d:
            r10 = _rate(big["successes"], big["job_s"]) / _rate(big_i2d["successes"], big_i2d["job_s"])
            lines.append(f"ratio at 10N (job_s basis): {r10:.2f}; whole command: "
                         f"{_rate(big['successes'], big['wall_s']) / _rate(big_i2d['successes'], big_i2d['wall_s']):.2f}")
        base = pairs[0][1]
        lines.append(f"peak RSS of the job (whole process tree): N={n} -> {base['peak_rss'] / MiB:.0f} MiB, N={n10} -> "
                     f"{big['peak_rss'] / MiB:.0f} MiB (ratio {big['peak_rss'] / base['peak_rss']:.2f}); "
                     f"PSS {base['peak_pss'] / MiB:.0f} -> {big['peak_pss'] / MiB:.0f} MiB "
                     f"(ratio {big['peak_pss'] / base['peak_pss']:.2f}); at most {base['peak_procs']} -> "
                     f"{big['peak_procs']} processes at once")
        for tag, r in ((f"N={n}", base), (f"N={n10}", big)):
            top = ", ".join(f"{lab} {v / MiB:.0f}" for lab, v in list(r["rss_at_peak"].items())[:6])
            lines.append(f"  RSS at the peak, MiB per process title ({tag}): {top}")
        for tag, r in ((f"N={n}", base), (f"N={n10}", big)):
            top = ", ".join(f"{lab} {v / MiB:.0f}" for lab, v in list(r["peak_by_label"].items())[:6])
            lines.append(f"  each title's own peak, MiB ({tag}): {top}")
        if big_i2d and pairs[0][0]:
            a = pairs[0][0]
            lines.append(f"  img2dataset for reference: N={n} -> {a['peak_rss'] / MiB:.0f} MiB, N={n10} -> "
                         f"{big_i2d['peak_rss'] / MiB:.0f} MiB (PSS {a['peak_pss'] / MiB:.0f} -> "
                         f"{big_i2d['peak_pss'] / MiB:.0f} MiB)")
    return "\n".join(lines)


def ceiling_line(img_ms: float, cores: int, runs: list) -> str:
    """The most this machine could do if the image work and the sample server were all there was."""
    out = []
    for tag, i2d, ours in runs:
        server_ms = 1000 * ours["server_cpu_s"] / max(ours["successes"], 1)
        ceiling = 1000 * cores / (img_ms + server_ms)
        part = f"{tag}: ceiling {ceiling:.0f} images/s, imgcurate at {_rate(ours['successes'], ours['job_s']) / ceiling:.0%}"
        if i2d:
            part += f", img2dataset at {_rate(i2d['successes'], i2d['job_s']) / ceiling:.0%}"
        out.append(part + f" (sample server {server_ms:.2f} ms/img for ours)")
    return (f"CPU ceiling: imgcurate's image work alone costs {img_ms:.2f} ms of CPU per image here (header, "
            f"decode, resize, encode, sha256, measured in this process); with the sample server's share, {cores} "
            "cores allow at most: " + "; ".join(out))


def _version(pkg: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_img2dataset":
        sys.exit(img2dataset_child(sys.argv[2]))
    sys.exit(main())
