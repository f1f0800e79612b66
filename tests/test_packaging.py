"""Packaging checks that need no container engine.

The Dockerfile is linted with hadolint, compose.yaml is validated against the Compose specification and every
Kubernetes manifest against the API schemas. Then the files are read as data to check what a schema cannot:
that every command they start is a real subcommand, that the probes call the real health check, and that
the user id, secret keys, volumes and lock file agree across the Dockerfile, compose.yaml and the manifests.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "compose.yaml"
K8S_DIR = ROOT / "deploy" / "k8s"
#: Every Kubernetes object file (each kustomization.yaml is kustomize's, not the API's).
K8S_MANIFESTS = sorted(p for p in K8S_DIR.rglob("*.yaml") if p.name != "kustomization.yaml")
#: The variants an operator applies with `kubectl apply -k`, and what each must hold (and must not).
K8S_VARIANTS = {"cronjob": ("backup",), "deployment": ("run",)}
K8S_EXAMPLE_SECRET = K8S_DIR / "examples" / "secret.example.yaml"

# The operator contract's commands (SPEC "Commands") and the health check every probe must call.
SUBCOMMANDS = {"run", "backup", "list", "verify", "restore", "prune", "health", "config", "check", "fetch"}
CONSOLE_SCRIPT = "backup-sidecar"
HEALTHCHECK_CMD = ["python3", "-m", "healthcheck"]
HEALTH_PORT = 8080
# Oldest and newest Kubernetes the manifests are checked against (podFailurePolicy is GA from 1.31).
K8S_VERSIONS = ("1.31.0", "1.37.0")
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY")


# --- helpers ---------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """Path of a command-line checker; skip (fail under CI) when it is genuinely not installed."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    message = (
        f"{name} is not installed: it is pinned in pyproject's [test] extra (pip install -e '.[test]') "
        "and CI installs it, so this skip only happens on an incomplete local environment"
    )
    if os.environ.get("CI"):
        pytest.fail(message + "; under CI a missing checker is an error, not a skip")
    pytest.skip(message)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def _yaml_docs(path: Path) -> list[dict]:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate from the [test] extra")
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comment lines dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _only(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for kw, rest in stage if kw == keyword]
    assert len(found) == 1, f"the runtime stage should have exactly one {keyword}, has {found}"
    return found[0]


def _exec_form(text: str) -> list[str]:
    """A JSON-array (exec form) instruction argument; shell form would put /bin/sh -c in front of PID 1."""
    argv = json.loads(text)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), text
    return argv


def _image_uid() -> int:
    user = _only(_stages()[-1], "USER")
    return int(user.split(":")[0])


def _arg_defaults() -> dict[str, str]:
    defaults = {}
    for keyword, rest in _dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults.setdefault(name, value)
    return defaults


def _k8s_objects() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in K8S_MANIFESTS for doc in _yaml_docs(path)]


def _pod_spec(obj: dict) -> dict | None:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        return obj["spec"]["template"]["spec"]
    return None


def _workloads() -> list[tuple[str, dict, dict]]:
    """(name, workload object, pod spec) for every manifest that runs the image."""
    found = []
    for _, obj in _k8s_objects():
        spec = _pod_spec(obj)
        if spec is not None:
            found.append((f"{obj['kind']}/{obj['metadata']['name']}", obj, spec))
    assert found, f"no workloads in {K8S_DIR}"
    return found


def _all_containers(spec: dict) -> list[dict]:
    """The pod's init containers and containers that run the sidecar's image, each held to the same rules
    (the verify CronJob's drill server is a stock PostgreSQL beside them: see its own test)."""
    return [c for c in (*spec.get("initContainers", []), *spec["containers"]) if "backup-sidecar" in c["image"]]


def _by_kind(kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for _, obj in _k8s_objects() if obj["kind"] == kind}


def _cronjob_running(verb: str) -> dict:
    matches = [obj for obj in _by_kind("CronJob").values() if _pod_spec(obj)["containers"][0]["args"][0] == verb]
    assert len(matches) == 1, f"expected one CronJob running {verb!r}, found {len(matches)}"
    return matches[0]


def _compose_services() -> dict[str, dict]:
    (compose,) = _yaml_docs(COMPOSE)
    return compose["services"]


def _sidecar_services() -> dict[str, dict]:
    """Compose services built from this repository's Dockerfile."""
    services = {name: svc for name, svc in _compose_services().items() if "build" in svc}
    assert "backup-sidecar" in services, "compose.yaml has no backup-sidecar service built from the Dockerfile"
    return services


def _as_argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def _is_secret_file_setting(name: str) -> bool:
    """POSTGRES_PASSWORD_FILE and friends, not LOCK_FILE."""
    return name.endswith("_FILE") and any(word in name.removesuffix("_FILE") for word in SECRET_WORDS)


def _parent_is_mounted(path: str, mount_paths: set[str]) -> bool:
    return any(PurePosixPath(path).is_relative_to(mount) for mount in mount_paths)


# --- the external checkers -------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    result = _run([_tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_matches_the_compose_spec():
    result = _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("manifest", K8S_MANIFESTS, ids=lambda p: str(p.relative_to(K8S_DIR)))
def test_kubernetes_manifest_matches_the_api_schema(manifest: Path):
    versions = [arg for version in K8S_VERSIONS for arg in ("-k", version)]
    result = _run([_tool("kubernetes-validate"), "--strict", "--quiet", *versions, str(manifest)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfile ------------------------------------------------------------------------------------------


def test_image_entrypoint_is_the_console_script_in_exec_form():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert CONSOLE_SCRIPT in scripts
    runtime = _stages()[-1]
    assert _exec_form(_only(runtime, "ENTRYPOINT")) == [CONSOLE_SCRIPT]
    cmd = _exec_form(_only(runtime, "CMD"))
    assert cmd[0] in SUBCOMMANDS, f"CMD {cmd} does not start with a subcommand"
    assert cmd == ["run"], "the image's default is the long-running sidecar"


def test_image_healthcheck_runs_the_healthcheck_module():
    healthcheck = _only(_stages()[-1], "HEALTHCHECK")
    options, sep, command = healthcheck.partition(" CMD ")
    assert sep, f"HEALTHCHECK without CMD: {healthcheck}"
    assert _exec_form(command) == HEALTHCHECK_CMD
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in options, f"HEALTHCHECK should set {option.rstrip('=')}"
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "healthcheck" in packages, "the healthcheck package must be installed into the image's venv"


def test_image_is_multi_stage_non_root_and_based_on_a_build_arg():
    stages = _stages()
    assert len(stages) >= 2, "build the venv in a builder stage, copy it into the runtime stage"
    runtime = stages[-1]
    assert runtime[0][1].startswith("${BASE_IMAGE}"), runtime[0]
    assert any(kw == "COPY" and rest.startswith("--from=") for kw, rest in runtime)
    assert _image_uid() > 0, "the runtime stage must run as a fixed non-root uid"
    defaults = _arg_defaults()
    assert defaults["BASE_IMAGE"] == "debian:trixie-slim"
    assert defaults["PG_CLIENT_SOURCE"] == "pgdg"
    assert defaults["PG_MAJOR"].isdigit()


def test_no_secret_is_baked_into_the_image():
    for keyword, rest in _dockerfile_instructions():
        if keyword in {"ENV", "ARG"}:
            assert not any(word in rest.upper() for word in SECRET_WORDS), f"{keyword} {rest}"
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    assert patterns[0] == "*", ".dockerignore should be an allow-list so .env and .git never enter the context"
    assert not any(p.startswith("!") and (".env" in p or ".git" in p) for p in patterns), patterns


# --- compose.yaml ----------------------------------------------------------------------------------------


def test_compose_sidecar_services_run_real_subcommands():
    for name, service in _sidecar_services().items():
        argv = _as_argv(service["command"])
        assert argv[0] in SUBCOMMANDS, f"{name}: {argv}"
        assert "entrypoint" not in service, f"{name}: keep the image's ENTRYPOINT"
    assert _as_argv(_sidecar_services()["backup-sidecar"]["command"]) == ["run"]


def test_compose_sidecar_healthcheck_runs_the_healthcheck_module():
    sidecar = _sidecar_services()["backup-sidecar"]
    check = sidecar["healthcheck"]
    assert check["test"] == ["CMD", *HEALTHCHECK_CMD]
    assert {"interval", "timeout", "retries", "start_period"} <= check.keys()
    assert sidecar["restart"] in {"unless-stopped", "always", "on-failure"}
    assert "stop_grace_period" in sidecar


def test_compose_sidecars_share_lock_and_nas_volumes_and_wait_for_their_dependencies():
    (compose,) = _yaml_docs(COMPOSE)
    services = compose["services"]
    declared_volumes = set(compose["volumes"])
    mounts_seen = set()
    for name, service in _sidecar_services().items():
        assert ".env" in service["env_file"], f"{name}: settings come from .env"
        env = service["environment"]
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
        lock_dir = str(PurePosixPath(env["LOCK_FILE"]).parent)
        assert lock_dir in mounts, f"{name}: LOCK_FILE must be on a shared volume"
        assert env["NAS_PATH"] in mounts, f"{name}: NAS_PATH must be a volume"
        mounts_seen.add((mounts[lock_dir], mounts[env["NAS_PATH"]]))
        assert {mounts[lock_dir], mounts[env["NAS_PATH"]]} <= declared_volumes, f"{name}: undeclared volume"
        for dependency, condition in service["depends_on"].items():
            assert dependency in services
            assert condition["condition"] in {"service_healthy", "service_completed_successfully"}
    assert len(mounts_seen) == 1, f"every sidecar service must use the same lock and NAS volumes: {mounts_seen}"
    assert "healthcheck" in services["postgres"]


# --- all of them against the real CLI --------------------------------------------------------------------


def _packaged_command_lines() -> dict[str, list[str]]:
    """Every argv the packaging hands to the ENTRYPOINT, by where it comes from."""
    lines = {"Dockerfile CMD": _exec_form(_only(_stages()[-1], "CMD"))}
    for name, service in _sidecar_services().items():
        lines[f"compose {name}"] = _as_argv(service["command"])
    for name, _, spec in _workloads():
        for container in _all_containers(spec):
            lines[f"{name} {container['name']}"] = list(container["args"])
    return lines


def test_packaged_command_lines_parse_with_the_real_cli():
    from app.cli import build_parser

    for where, argv in _packaged_command_lines().items():
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{where}: `{CONSOLE_SCRIPT} {shlex.join(argv)}` is rejected by the CLI (exit {exc.code})")
        assert args.command in SUBCOMMANDS, where


# --- Kubernetes ------------------------------------------------------------------------------------------


def test_kubernetes_workloads_run_real_subcommands_through_the_entrypoint():
    for name, _, spec in _workloads():
        for container in _all_containers(spec):
            assert "command" not in container, f"{name}: keep the image's ENTRYPOINT, pass the subcommand as args"
            assert container["args"][0] in SUBCOMMANDS, f"{name}: {container['args']}"
    assert _pod_spec(_cronjob_running("backup"))["containers"][0]["args"] == ["backup", "--scheduled"]
    verify = _cronjob_running("verify")
    assert _pod_spec(verify)["containers"][0]["args"] == ["verify", "latest", "--restore-test"]
    deployments = _by_kind("Deployment")
    assert [_pod_spec(d)["containers"][0]["args"] for d in deployments.values()] == [["run"]]


def test_the_verify_cronjob_drills_on_its_own_ephemeral_server():
    spec = _pod_spec(_cronjob_running("verify"))
    (server,) = [c for c in spec.get("initContainers", []) if c["name"] == "drill-server"]
    assert server["restartPolicy"] == "Always", "a native sidecar: up before the drill, stopped with the Job"
    assert "listen_addresses=127.0.0.1" in server["args"], "reachable from the pod's loopback only"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert all("emptyDir" in volumes[m["name"]] for m in server["volumeMounts"]), "nothing of it outlives the Job"
    env = {e["name"]: e.get("value", "") for e in spec["containers"][0].get("env", [])}
    assert env["DRILL_DATABASE_URL"].startswith("postgresql://postgres@127.0.0.1:"), "never a drill on production"


def test_kubernetes_cronjobs_never_overlap_and_always_end():
    for name, cronjob in _by_kind("CronJob").items():
        spec = cronjob["spec"]
        job = spec["jobTemplate"]["spec"]
        assert spec["concurrencyPolicy"] == "Forbid", name
        assert "startingDeadlineSeconds" in spec, name
        assert "backoffLimit" in job and "activeDeadlineSeconds" in job, name


def test_kubernetes_pods_are_non_root_read_only_and_bounded():
    uid = _image_uid()
    for name, _, spec in _workloads():
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["runAsUser"] == uid, f"{name}: runAsUser should be the image's uid {uid}"
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in _all_containers(spec):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in empty_dirs, f"{name}: /tmp must be a writable emptyDir"
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys(), name
            assert "memory" in resources["limits"], name


def test_kubernetes_references_resolve_to_the_example_objects():
    (secret,) = _by_kind("Secret").values()
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    config_maps = _by_kind("ConfigMap")
    claims = set(_by_kind("PersistentVolumeClaim"))
    lock_claims = set()
    for name, _, spec in _workloads():
        volumes = {v["name"]: v for v in spec["volumes"]}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{name}: {volume}"
            if "secret" in volume:
                assert volume["secret"]["secretName"] == secret["metadata"]["name"], name
        for container in _all_containers(spec):
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            secret_dirs = {path for path, volume in mounts.items() if "secret" in volume}
            settings: dict[str, str] = {}
            for source in container.get("envFrom", []):
                settings.update(config_maps[source["configMapRef"]["name"]]["data"])
            for var in container.get("env", []):
                if "value" in var:
                    settings[var["name"]] = var["value"]
                    secret_like = any(word in var["name"] for word in SECRET_WORDS)
                    assert not secret_like or _is_secret_file_setting(var["name"]), (
                        f"{name}: {var['name']} holds a secret in plain text; use a secretKeyRef or *_FILE"
                    )
                else:
                    ref = var["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_keys, name
            for key, value in settings.items():
                if _is_secret_file_setting(key):
                    assert _parent_is_mounted(value, secret_dirs), f"{name}: {key}={value} is not in a secret"
                    assert PurePosixPath(value).name in secret_keys, f"{name}: {key} names no Secret key"
            lock_dir = str(PurePosixPath(settings["LOCK_FILE"]).parent)
            assert lock_dir in mounts, f"{name}: LOCK_FILE {settings['LOCK_FILE']} is not on a mounted volume"
            lock_claims.add(mounts[lock_dir]["persistentVolumeClaim"]["claimName"])
            assert settings["NAS_PATH"] in mounts, f"{name}: NAS_PATH is not a mounted volume"
    assert len(lock_claims) == 1, f"all workloads must share one lock volume, not {lock_claims}"


def test_deployment_probes_do_not_restart_the_pod_for_a_failed_backup():
    (deployment,) = _by_kind("Deployment").values()
    container = _pod_spec(deployment)["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    readiness = container["readinessProbe"]["httpGet"]
    assert readiness["path"] == "/health"
    assert ports.get(readiness["port"], readiness["port"]) == HEALTH_PORT
    liveness = container["livenessProbe"]
    # /health answers 503 whenever the last backup failed: as a liveness probe that would crash-loop the pod.
    assert liveness.get("httpGet", {}).get("path") != "/health"
    if "exec" in liveness:
        assert liveness["exec"]["command"] != HEALTHCHECK_CMD, "healthcheck exits 2 when a backup failed"


def test_deployment_liveness_watches_a_check_that_the_health_module_reports():
    (deployment,) = _by_kind("Deployment").values()
    script = " ".join(_pod_spec(deployment)["containers"][0]["livenessProbe"]["exec"]["command"])
    names = re.findall(r'c\.get\("name"\) == "([a-z_]+)"', script)
    assert names, "the liveness probe should restart the pod only for a named /health check"
    health_source = (ROOT / "app" / "health.py").read_text()
    for name in names:
        assert f'Check("{name}"' in health_source, f"app/health.py no longer reports a {name!r} check"


# --- Kubernetes: the variants as kustomize builds them ------------------------------------------------------


def _kustomization_files(directory: Path, seen: tuple[Path, ...] = ()) -> list[Path]:
    """The manifest files `kubectl apply -k directory` applies, following `resources` into other directories."""
    (doc,) = _yaml_docs(directory / "kustomization.yaml")
    assert doc["kind"] == "Kustomization" and doc["apiVersion"].startswith("kustomize.config.k8s.io/"), directory
    files: list[Path] = []
    for resource in doc.get("resources", []):
        path = (directory / resource).resolve()
        assert path.exists(), f"{directory}/kustomization.yaml names {resource}, which does not exist"
        if path.is_dir():
            assert path not in seen, f"{directory}: a cycle through {path}"
            files += _kustomization_files(path, (*seen, directory))
        else:
            files.append(path)
    return files


def _objects_of(files: list[Path]) -> list[tuple[str, str]]:
    return [(doc["kind"], doc["metadata"]["name"]) for path in files for doc in _yaml_docs(path)]


def test_each_kubernetes_variant_applies_itself_and_the_base_only():
    variants = {name: _kustomization_files(K8S_DIR / name) for name in K8S_VARIANTS}
    base = set(_kustomization_files(K8S_DIR / "base"))
    for name, files in variants.items():
        assert len(files) == len(set(files)), f"{name} applies a file twice"
        assert base <= set(files), f"{name} must include ../base"
        assert K8S_EXAMPLE_SECRET.resolve() not in files, f"{name} would apply the example Secret"
        verbs = sorted(_pod_spec(doc)["containers"][0]["args"][0] for path in files for doc in _yaml_docs(path)
                       if _pod_spec(doc) is not None and doc["metadata"]["name"] != "backup-sidecar-verify")
        assert tuple(verbs) == K8S_VARIANTS[name], f"{name} runs {verbs}: one variant must not apply the other"
        kinds = _objects_of(files)
        assert len(kinds) == len(set(kinds)), f"{name} defines an object twice: {kinds}"
    every = {p.resolve() for p in K8S_MANIFESTS}
    reached = set().union(*map(set, variants.values())) | {K8S_EXAMPLE_SECRET.resolve()}
    assert every == reached, f"manifests no variant applies: {sorted(every - reached)}"
    assert not list(K8S_DIR.glob("*.yaml")), "no manifest at the top of deploy/k8s: `kubectl apply -f` would take it"


def test_kubectl_kustomize_builds_each_variant():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed and no Debian package provides it; the variants' "
                    "files are still checked one by one above")
    for name in K8S_VARIANTS:
        result = _run([kubectl, "kustomize", str(K8S_DIR / name)])
        assert result.returncode == 0, result.stderr
        built = [(doc["kind"], doc["metadata"]["name"]) for doc in
                 __import__("yaml").safe_load_all(result.stdout) if doc]
        assert sorted(built) == sorted(_objects_of(_kustomization_files(K8S_DIR / name))), name
        assert "registry.example.com/backup-sidecar:0.1.0" in result.stdout, "the images transformer took"


def test_the_secret_holds_every_credential_and_no_pod_gets_one_as_an_environment_variable():
    """Every credential is a *_FILE pointing into the mounted Secret; none is an env var (not even via a ref)."""
    from app.settings import FILE_VARS

    (config,) = _by_kind("ConfigMap").values()
    for name, _, spec in _workloads():
        for container in _all_containers(spec):
            for var in container.get("env", []):
                assert "valueFrom" not in var, f"{name}: {var['name']} comes from a Secret as an env var"
                carries_password = urlsplit(var.get("value", "")).password is not None
                if var["name"] == "DRILL_DATABASE_URL" and not carries_password:
                    continue  # the pod's own ephemeral drill server on loopback: a URL with no credential
                assert var["name"] not in FILE_VARS, f"{name}: {var['name']} set in plain text"
    data = config["data"]
    assert {"POSTGRES_PASSWORD_FILE", "S3_ACCESS_KEY_ID_FILE", "S3_SECRET_ACCESS_KEY_FILE"} <= set(data)
    assert not set(data) & set(FILE_VARS), "a credential in the ConfigMap"
    (secret,) = _by_kind("Secret").values()
    text = K8S_EXAMPLE_SECRET.read_text()
    assert "no credential is an environment variable" in text and "secretKeyRef" not in text
    assert set(secret["stringData"]) == {Path(v).name for k, v in data.items() if k.removesuffix("_FILE") in FILE_VARS}


def test_the_configmap_settings_fit_the_example_topology(tmp_path: Path):
    """The in-cluster MinIO on 9000 speaks plain HTTP: the settings must say so and load as they stand."""
    from app.settings import FILE_VARS, load_settings

    (config,) = _by_kind("ConfigMap").values()
    env = dict(config["data"], LOCK_FILE=str(tmp_path / "lock"))
    for key, value in list(env.items()):
        if key.removesuffix("_FILE") in FILE_VARS:  # the Secret's files, here with placeholder content
            (tmp_path / Path(value).name).write_text("placeholder")
            env[key] = str(tmp_path / Path(value).name)
    env["NAS_PATH"] = str(tmp_path)
    settings = load_settings(env)
    assert settings.s3 is not None and settings.s3.secure is False and settings.s3.endpoint.endswith(":9000")
    assert "S3_SECURE" not in config["data"], "the endpoint's scheme says it; a second setting can contradict it"


def test_compose_builds_with_the_client_source_from_env_and_checks_before_the_sidecar_starts():
    services = _compose_services()
    args = _sidecar_services()["backup-sidecar"]["build"]["args"]
    assert args["PG_CLIENT_SOURCE"] == "${PG_CLIENT_SOURCE:-pgdg}" and args["PG_MAJOR"] == "${PG_MAJOR:-19}"
    check = services["backup-check"]
    assert _as_argv(check["command"]) == ["check", "--notify-optional"] and check["restart"] == "no"
    depends = services["backup-sidecar"]["depends_on"]
    assert depends["backup-check"]["condition"] == "service_completed_successfully"
    assert {"postgres", "minio-init"} <= set(depends), "overriding depends_on must keep the stack's own"


def test_the_deployment_checks_in_an_init_container_without_failing_over_a_channel():
    (deployment,) = _by_kind("Deployment").values()
    spec = _pod_spec(deployment)
    (init,) = spec["initContainers"]
    (main,) = spec["containers"]
    assert init["args"] == ["check", "--notify-optional"]
    assert init["image"] == main["image"] and init["envFrom"] == main["envFrom"]
    assert init["volumeMounts"] == main["volumeMounts"], "the check must see the volumes the sidecar uses"
