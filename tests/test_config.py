"""Job config: YAML + --set overrides, clear errors naming key and value, the CLI's exit codes (no Ray)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobs.config import CONFIG_DIR, ConfigError, JobConfig, apply_override, load_config

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
name: t
input:
  paths: [urls.csv]
  caption_columns: [caption, title]
output:
  path: out
download:
  timeout_s: 3
  allow_loopback: true
images:
  image_size: 64
"""


def _write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def _error(tmp_path: Path, text: str, overrides=None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, text), overrides)
    return str(exc.value)


def test_good_config_loads_with_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert isinstance(cfg, JobConfig)
    assert cfg.input.paths == ["urls.csv"] and cfg.input.caption_columns == ["caption", "title"]
    assert cfg.download.timeout_s == 3 and cfg.download.allow_loopback is True
    assert cfg.images.image_size == 64 and cfg.images.resize_mode == "border"  # default filled in
    assert cfg.plan.num_buckets == 256


# --- errors name the key and the value ---------------------------------------------------
def test_unknown_top_level_key(tmp_path):
    msg = _error(tmp_path, GOOD + "colour: blue\n")
    assert "colour" in msg and "blue" in msg and "unknown" in msg


def test_unknown_nested_key(tmp_path):
    msg = _error(tmp_path, GOOD.replace("timeout_s: 3", "timeout: 7"))
    assert "download.timeout" in msg and "7" in msg


@pytest.mark.parametrize("old,new,key,value", [
    ("timeout_s: 3", "timeout_s: -1", "download.timeout_s", "-1"),
    ("image_size: 64", "resize_mode: foo", "images.resize_mode", "foo"),
    ("image_size: 64", "image_size: big", "images.image_size", "big"),
    ("timeout_s: 3", "allow_networks: [not-a-net]", "download.allow_networks", "not-a-net"),
    ("paths: [urls.csv]", "paths: []", "input.paths", "[]"),
    ("paths: [urls.csv]", "paths: [urls.csv]\n  format: xlsx", "input.format", "xlsx"),
])
def test_bad_values(tmp_path, old, new, key, value):
    msg = _error(tmp_path, GOOD.replace(old, new))
    assert key in msg and value in msg, msg


def test_missing_required(tmp_path):
    msg = _error(tmp_path, GOOD.replace("  paths: [urls.csv]\n", ""))
    assert "input.paths" in msg and "missing" in msg
    msg = _error(tmp_path, GOOD.replace("output:\n  path: out\n", ""))
    assert "output" in msg and "missing" in msg


def test_every_error_is_reported_at_once(tmp_path):
    text = GOOD.replace("timeout_s: 3", "timeout_s: -1\n  timeout: 7") + "colour: blue\n"
    msg = _error(tmp_path, text)
    assert all(k in msg for k in ("download.timeout_s", "download.timeout", "colour"))


@pytest.mark.parametrize("text,what", [
    ("[a.csv, b.csv]\n", "list"),
    ("just a string\n", "str"),
    ("- a\n- b\n", "list"),
])
def test_non_mapping_file(tmp_path, text, what):
    msg = _error(tmp_path, text)
    assert "mapping" in msg and what in msg


def test_invalid_yaml(tmp_path):
    assert "not valid YAML" in _error(tmp_path, "input: [unclosed\n")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --- --set overrides ------------------------------------------------------------------------
def test_overrides_nested_lists_booleans_numbers(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD), [
        "input.paths=[a.csv, b.csv]",
        "download.allow_loopback=false",
        "ray.progress_bars=false",
        "download.timeout_s=2.5",
        "images.resize_mode=center_crop",
        "plan.num_buckets=16",
        "input.extra_columns=[a, b]",
        "download.user_agent_contact=mailto:x@example.org?subject=a=b",  # only the first '=' splits
    ])
    assert cfg.input.paths == ["a.csv", "b.csv"]
    assert cfg.download.allow_loopback is False and cfg.ray.progress_bars is False
    assert cfg.download.timeout_s == 2.5 and cfg.plan.num_buckets == 16
    assert cfg.images.resize_mode == "center_crop"
    assert cfg.input.extra_columns == ["a", "b"]
    assert cfg.download.user_agent_contact == "mailto:x@example.org?subject=a=b"
    # The file's other values stay.
    assert cfg.images.image_size == 64 and cfg.input.caption_columns == ["caption", "title"]


def test_overrides_create_sections_and_fill_required(tmp_path):
    cfg = load_config(_write(tmp_path, "output:\n  path: out\n"), ["input.paths=[x.parquet]", "storage.region=eu"])
    assert cfg.input.paths == ["x.parquet"] and cfg.storage.region == "eu"
    cfg = load_config(None, ["input.paths=[a.csv]", "output.path=o"])
    assert cfg.output.path == "o"


def test_override_into_an_empty_section(tmp_path):
    # `ray:` with every key commented out is null in YAML; --set still fills it.
    cfg = load_config(_write(tmp_path, GOOD + "ray:\n"), ["ray.num_cpus=2"])
    assert cfg.ray.num_cpus == 2


def test_override_errors(tmp_path):
    path = _write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["download.timeout_s"])
    with pytest.raises(ConfigError, match="empty key"):
        load_config(path, ["=3"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(path, ["name.x=1"])
    with pytest.raises(ConfigError) as exc:
        load_config(path, ["download.timeout_s=-5"])
    assert "download.timeout_s" in str(exc.value) and "-5" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(path, ["download.timeoutt=5"])
    assert "download.timeoutt" in str(exc.value)


def test_overrides_do_not_mutate_the_given_dict():
    data = {"input": {"paths": ["a.csv"]}, "output": {"path": "o"}}
    cfg = load_config(data=data, overrides=["input.paths=[b.csv]", "download.timeout_s=1"])
    assert cfg.input.paths == ["b.csv"]
    assert data == {"input": {"paths": ["a.csv"]}, "output": {"path": "o"}}


def test_apply_override_parses_yaml_scalars():
    d: dict = {}
    for a in ["a.b=1", "a.c=true", "a.d=x y", "a.e=", "a.f={k: v}", "a.g='007'"]:
        apply_override(d, a)
    assert d == {"a": {"b": 1, "c": True, "d": "x y", "e": None, "f": {"k": "v"}, "g": "007"}}


def test_fingerprint_follows_the_sections(tmp_path):
    path = _write(tmp_path, GOOD)
    a = load_config(path)
    b = load_config(path, ["download.timeout_s=9"])
    c = load_config(path, ["input.paths=[other.csv]"])
    assert a.fingerprint("input", "plan") == b.fingerprint("input", "plan")
    assert a.fingerprint("input", "plan") != c.fingerprint("input", "plan")
    assert a.fingerprint() != b.fingerprint()


def test_fingerprint_ignores_resource_keys(tmp_path):
    """A resume may scale pools or change batch sizes; what is written must still match."""
    path = _write(tmp_path, GOOD)
    a = load_config(path)
    sections = ("input", "plan", "download", "images", "clip", "reward")
    for o in ["download.pool_max=9", "download.num_cpus=2", "download.batch_size=100", "images.num_cpus=3",
              "clip.batch_size=7", "reward.micro_batch=5", "plan.local_max_bytes=0", "plan.scatter_flush_rows=10",
              "download.batches_in_flight=9", "download.yield_rows=3"]:
        assert load_config(path, [o]).fingerprint(*sections) == a.fingerprint(*sections), o
    for o in ["images.image_size=97", "images.reduce_on_decode=null", "download.retries=5", "plan.shard_rows=7",
              "plan.num_buckets=3", "clip.min_score=0.2"]:
        assert load_config(path, [o]).fingerprint(*sections) != a.fingerprint(*sections), o


# --- bundled configs ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dryrun.yaml", "laion-style.yaml"])
def test_bundled_configs_validate(name):
    cfg = load_config(CONFIG_DIR / name)
    assert cfg.input.paths and cfg.output.path


def test_laion_style_reads_s3_and_its_columns():
    cfg = load_config(CONFIG_DIR / "laion-style.yaml")
    assert cfg.input.paths[0].startswith("s3://") and cfg.output.path.startswith("s3://")
    assert cfg.input.url_column == "URL" and cfg.input.caption_columns == ["TEXT"]
    assert cfg.download.allow_loopback is False and cfg.download.allow_private is False


# --- the CLI ---------------------------------------------------------------------------------
def _cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_validate_good(tmp_path):
    r = _cli("validate", str(_write(tmp_path, GOOD)), "--set", "images.image_size=96")
    assert r.returncode == 0, r.stderr
    assert '"image_size": 96' in r.stdout and "config OK" in r.stderr


def test_cli_validate_bundled():
    r = _cli("validate", "configs/dryrun.yaml")
    assert r.returncode == 0, r.stderr


def test_cli_validate_bad(tmp_path):
    r = _cli("validate", str(_write(tmp_path, GOOD.replace("timeout_s: 3", "timeout_s: -1"))))
    assert r.returncode == 2
    assert "download.timeout_s" in r.stderr and "-1" in r.stderr
    r = _cli("validate", str(_write(tmp_path, GOOD)), "--set", "images.resize_mode=stretch")
    assert r.returncode == 2 and "images.resize_mode" in r.stderr and "stretch" in r.stderr
    r = _cli("validate", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "missing.yaml" in r.stderr


def test_cli_validate_check_inputs(tmp_path):
    (tmp_path / "urls.csv").write_text("url\nhttp://e.com/1.jpg\n")
    good = _write(tmp_path, GOOD.replace("[urls.csv]", f"[{tmp_path / 'urls.csv'}]"))
    r = _cli("validate", str(good), "--check-inputs")
    assert r.returncode == 0 and "1 input file(s)" in r.stderr
    r = _cli("validate", str(good), "--check-inputs", "--set", f"input.paths=[{tmp_path / 'none*.csv'}]")
    assert r.returncode == 2 and "none*.csv" in r.stderr


def test_cli_run_bad_config_fails_before_ray(tmp_path):
    bad = _write(tmp_path, GOOD.replace("image_size: 64", "resize_mode: foo"), name="bad.yaml")
    out = tmp_path / "out"
    r = _cli("run", str(bad), "--set", f"output.path={out}")
    assert r.returncode == 2
    assert "images.resize_mode" in r.stderr and "foo" in r.stderr
    both = r.stdout + r.stderr
    assert "Started a local Ray instance" not in both and "ray.init" not in both
    assert not out.exists()  # no work started


def test_cli_usage_error():
    r = _cli("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr
