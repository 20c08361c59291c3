"""One atomic write for every file the job commits (markers, manifests, checkpoints, cache entries)."""

from __future__ import annotations

import threading

import pytest

from operators.storage import write_bytes_atomic, write_json_atomic, read_json


def test_concurrent_writers_of_one_path_never_tear_it_and_leave_no_temp_files(tmp_path):
    path = str(tmp_path / "sub" / "marker.bin")
    blobs = [bytes([k]) * (256 * 1024 + k) for k in range(4)]  # each writer its own size and byte
    errors = []

    def writer(k):
        try:
            for _ in range(40):
                write_bytes_atomic(path, blobs[k])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        try:
            data = open(path, "rb").read()
        except FileNotFoundError:
            continue
        assert data in blobs, "a reader saw a torn or mixed file"
        seen.add(data[0])
    for t in threads:
        t.join()
    assert not errors
    assert open(path, "rb").read() in blobs
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["marker.bin"]  # no temp file left


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = str(tmp_path / "m.json")
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_bytes_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_write_to_s3(s3_server, s3fs_client):
    from operators.storage import StorageConfig

    s3fs_client.mkdir("imgcurate-atomic")
    storage = StorageConfig(endpoint_url=s3_server)
    write_json_atomic("s3://imgcurate-atomic/deep/x.json", {"k": [1, 2]}, storage)
    assert read_json("s3://imgcurate-atomic/deep/x.json", storage) == {"k": [1, 2]}
    assert s3fs_client.ls("imgcurate-atomic/deep") == ["imgcurate-atomic/deep/x.json"]
