"""Shared fixtures: one local Ray per test run, a loopback image server, a loopback S3 server.

Nothing here talks to anything outside 127.0.0.0/8.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Fake credentials for the loopback S3 server, set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "imgcurate-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "imgcurate-test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

N_GOOD = 40  # good images in the test sample (the dry run uses 240)
RAY_TEST_CPUS = 2  # logical CPUs of the tests' one local Ray


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> str:
    from jobs.samples.data import generate_images, images_dir

    work = tmp_path_factory.mktemp("sample")
    generate_images(images_dir(str(work)), n_good=N_GOOD)
    return str(work)


@pytest.fixture(scope="session")
def image_server(sample_dir):
    from jobs.samples.data import images_dir
    from jobs.samples.server import SampleServer

    with SampleServer(root_dir=images_dir(sample_dir)) as server:
        yield server


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # Bind Ray to loopback: tests send traffic to 127.0.0.0/8 only. 2 logical CPUs, as the machine
    # has: the job must fit its operators (and a resume's checkpoint filter) in them (jobs/sizing.py).
    ray.init(num_cpus=RAY_TEST_CPUS, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode on loopback: a real S3 HTTP endpoint (as s3fs's own tests use)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    yield endpoint
    server.stop()


@pytest.fixture()
def s3fs_client(s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(anon=False, client_kwargs={"endpoint_url": s3_server}, use_listings_cache=False)
    return fs


# A headless Chromium for the browser tests (the run report, the search page): tests/report_helpers.py.
from tests.report_helpers import chromium  # noqa: E402,F401
