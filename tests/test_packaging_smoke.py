"""Smoke test of the packaging: the exact commands the Dockerfile, compose.yaml and deploy/k8s/ start, run.

tests/test_packaging.py reads the files as data; this module runs what they name, as real processes, against
the local stack (the `pg` PostgreSQL server, a tmp NAS directory and, where the file configures S3, the `s3`
fixture's bucket), so a renamed setting, subcommand, flag or probe in a file fails here and not in production.

There is no container engine in CI, so every command runs on this host. What cannot be the same on a host
(service host names, volume paths, ports, TLS, the image's venv) is replaced through one small dict per test,
``{KEY: (value on this host, why)}``: ``replace`` may only name keys the file sets (so a renamed key fails the
test) and ``add`` only keys it does not set. Every other key is passed exactly as the file sets it, and must
be one the code reads (``_assert_the_code_reads``): `backup-sidecar config` validates values but accepts an
unknown name without a word, so a renamed setting would otherwise be silently ignored.

The image's ENTRYPOINT is the console script `backup-sidecar`; where it is not on PATH (no `pip install -e .`)
`python -m app`, the same program (SPEC "Commands"), stands in for it and test_console_script_is_installed
skips to say so. The probes (`python3 -m healthcheck`, the liveness `python3 -c ...`) run as the files spell
them, with PYTHONPATH at the checkout so the packages the image installs are importable.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath

import pytest
from conftest import PgServer, S3Server, free_port
from test_packaging import (
    COMPOSE,
    CONSOLE_SCRIPT,
    ROOT,
    _as_argv,
    _by_kind,
    _cronjob_running,
    _exec_form,
    _only,
    _pod_spec,
    _sidecar_services,
    _stages,
)

from app.durations import parse_duration

#: {KEY: (value on this host, why it differs from the file)}
Adaptation = dict[str, tuple[str, str]]

CONSOLE_PATH = shutil.which(CONSOLE_SCRIPT)
#: Read by the healthcheck/ probe only (the app's settings reader never sees it).
PROBE_ONLY_KEYS = {"HEALTH_URL"}
RUN_STOP_TIMEOUT_S = 10
READY_TIMEOUT_S = 30


# --- the image ---------------------------------------------------------------------------------------------


def _runtime_stage() -> list[tuple[str, str]]:
    return _stages()[-1]


def _image_entrypoint() -> list[str]:
    return _exec_form(_only(_runtime_stage(), "ENTRYPOINT"))


def _image_cmd() -> list[str]:
    return _exec_form(_only(_runtime_stage(), "CMD"))


def _image_healthcheck() -> tuple[list[str], float]:
    """The HEALTHCHECK's exec-form argv and its --timeout in seconds."""
    options, sep, command = _only(_runtime_stage(), "HEALTHCHECK").partition(" CMD ")
    assert sep, "HEALTHCHECK without CMD"
    timeout = next(o.split("=", 1)[1] for o in options.split() if o.startswith("--timeout="))
    return _exec_form(command), parse_duration(timeout)


def _image_env_as_set() -> dict[str, str]:
    """The runtime stage's ENV, as the Dockerfile writes it (``$PATH`` left unexpanded)."""
    env: dict[str, str] = {}
    for keyword, rest in _runtime_stage():
        if keyword != "ENV":
            continue
        words = shlex.split(rest)
        if "=" not in words[0]:  # legacy `ENV KEY value`
            env[words[0]] = rest.split(None, 1)[1]
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def _image_env() -> dict[str, str]:
    adaptation: Adaptation = {
        "PATH": (os.environ["PATH"], "/opt/venv/bin is the image's venv; this host's interpreter is on its PATH"),
    }
    return _adapt("Dockerfile ENV", _image_env_as_set(), replace=adaptation)


def _entrypoint(argv: list[str]) -> list[str]:
    """``argv`` as this host can start it: the console script, or `python -m app` where it is not installed."""
    if argv and argv[0] == CONSOLE_SCRIPT:
        if CONSOLE_PATH is None:
            return [sys.executable, "-m", "app", *argv[1:]]
        _assert_imports_this_checkout(_script_interpreter(CONSOLE_PATH))
    return list(argv)


def _script_interpreter(script: str) -> str:
    first = Path(script).read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("#!"), f"{script} is not a script with a #! line: {first!r}"
    return shlex.split(first[2:])[0]


@functools.cache
def _assert_imports_this_checkout(python: str) -> None:
    """``python`` (the console script's or a probe's interpreter) imports app/ and healthcheck/ from this checkout.

    An editable install of another clone puts its own finder on sys.path; the smoke tests must not test that.
    """
    code = "import app, healthcheck; print(app.__file__); print(healthcheck.__file__)"
    result = subprocess.run(
        [python, "-c", code], env=_host_env(), cwd=ROOT.parent, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, _explain([python, "-c", code], result)
    for module_file in result.stdout.split():
        assert Path(module_file).resolve().is_relative_to(ROOT), f"{python} imports {module_file}, not {ROOT}"


# --- environments and adaptations --------------------------------------------------------------------------


def _host_env() -> dict[str, str]:
    """What the container's process would inherit from no one: just enough of this host to run Python."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR") if k in os.environ}
    # The image installs app/ and healthcheck/ into its venv; here they come from the checkout.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["NAS_REQUIRE_MOUNT"] = "false"  # the volumes are tmp dirs on the root disk here, not mounts
    return env


def _adapt(
    where: str, file_env: Mapping[str, str], *, replace: Adaptation, add: Adaptation | None = None
) -> dict[str, str]:
    """The file's settings with ``replace`` (keys the file sets) and ``add`` (keys it does not) applied."""
    add = add or {}
    missing = sorted(set(replace) - set(file_env))
    assert not missing, f"{where} no longer sets {missing}, which this test adapts to the local stack (renamed?)"
    clash = sorted(set(add) & set(file_env))
    assert not clash, f"{where} now sets {clash} itself: adapt them under `replace`, not `add`"
    return {**file_env, **{key: value for key, (value, _why) in {**replace, **add}.items()}}


def _keys_the_code_reads(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every setting name load_settings() asks for (``_Reader.used``) while it reads ``env``."""
    from app import settings as settings_module

    readers: list[settings_module._Reader] = []

    class RecordingReader(settings_module._Reader):
        def __init__(self, environ: Mapping[str, str]) -> None:
            super().__init__(environ)
            readers.append(self)

    with monkeypatch.context() as patch:
        patch.setattr(settings_module, "_Reader", RecordingReader)
        settings_module.load_settings(dict(env))
    assert readers, "load_settings() no longer uses settings._Reader: update _keys_the_code_reads"
    return set().union(*(reader.used for reader in readers))


def _assert_the_code_reads(
    where: str,
    file_env: Mapping[str, str],
    env: Mapping[str, str],
    monkeypatch: pytest.MonkeyPatch,
    not_settings: Mapping[str, str] | None = None,
) -> None:
    """Every key ``where`` sets is a setting the code reads, except ``not_settings`` ({KEY: why})."""
    known = _keys_the_code_reads(env, monkeypatch) | PROBE_ONLY_KEYS
    unknown = sorted(set(file_env) - known - set(not_settings or {}))
    assert not unknown, (
        f"{where} sets {unknown}, which the code never reads: a renamed or misspelt setting "
        "(`backup-sidecar config` accepts unknown names, so nothing else would notice)"
    )


def _process_env(settings: Mapping[str, str]) -> dict[str, str]:
    return {**_host_env(), **_image_env(), **settings}


# --- processes ---------------------------------------------------------------------------------------------


def _run(argv: list[str], env: Mapping[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _explain(argv: list[str], result: subprocess.CompletedProcess) -> str:
    return f"`{shlex.join(argv)}` exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def _run_ok(argv: list[str], env: Mapping[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    result = _run(argv, env, cwd, timeout)
    assert result.returncode == 0, _explain(argv, result)
    return result


def _config_ok(where: str, entrypoint: list[str], env: Mapping[str, str], cwd: Path, targets: list[str]) -> None:
    """`backup-sidecar config` accepts the adapted settings and turns on exactly the targets the file means."""
    result = _run_ok(_entrypoint([*entrypoint, "config"]), env, cwd)
    line = next(line for line in result.stdout.splitlines() if line.startswith("targets "))
    shown = line.split(None, 1)[1]
    for target in targets:
        assert target in shown, f"{where}: config shows targets {shown!r}, expected {target!r} among them"


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Sidecar:
    """A long-running `run` process whose output goes to a file (a pipe could fill up and block it)."""

    def __init__(self, argv: list[str], env: Mapping[str, str], cwd: Path) -> None:
        self.argv = argv
        self.log_path = cwd / f"run-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, env=dict(env), cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def assert_running(self) -> None:
        assert self.proc.poll() is None, f"`{shlex.join(self.argv)}` exited {self.proc.returncode}:\n{self.log()}"

    def wait_until(self, probe: list[str], env: Mapping[str, str], cwd: Path, timeout_s: float) -> None:
        """Until the probe command exits 0 (each attempt bounded by the file's own probe timeout)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = None
        while time.monotonic() < deadline:
            self.assert_running()
            last = _run(probe, env, cwd, timeout=timeout_s)
            if last.returncode == 0:
                return
            time.sleep(0.2)
        pytest.fail(f"not healthy within {READY_TIMEOUT_S}s: {_explain(probe, last)}\nsidecar log:\n{self.log()}")

    def terminate(self) -> tuple[int, float]:
        """SIGTERM, as `docker stop` and the kubelet send it; (exit code, seconds it took)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(RUN_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"`run` ignored SIGTERM for {RUN_STOP_TIMEOUT_S}s (killed):\n{self.log()}")
        return code, time.monotonic() - started

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _stop_cleanly(sidecar: Sidecar) -> None:
    code, took = sidecar.terminate()
    assert code == 0, f"`run` exited {code} on SIGTERM:\n{sidecar.log()}"
    assert took < RUN_STOP_TIMEOUT_S, took


# --- what the targets hold ---------------------------------------------------------------------------------


def _nas_ok_manifests(root: Path, db: str) -> list[dict]:
    """ok manifests of ``db`` under the NAS directory, each checked against its artifact's size and sha256."""
    docs = [json.loads(p.read_bytes()) for p in sorted(root.rglob("*.manifest.json"))]
    ok = [d for d in docs if d["database"] == db and d["status"] == "ok"]
    for doc in ok:
        data = (root / doc["artifact"]).read_bytes()
        assert len(data) == doc["size_bytes"] and hashlib.sha256(data).hexdigest() == doc["sha256"], doc["id"]
    return ok


def _s3_ok_manifests(s3: S3Server, bucket: str, prefix: str, db: str) -> list[dict]:
    """ok manifests of ``db`` in the bucket under ``prefix``, each checked against its artifact."""
    prefix = prefix.strip("/")
    lead = f"{prefix}/" if prefix else ""
    keys = s3.keys(bucket)
    assert all(key.startswith(lead) for key in keys), f"objects outside S3_PREFIX {prefix!r}: {keys}"

    def read(name: str) -> bytes:
        response = s3.client.get_object(bucket, name)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    docs = [json.loads(read(key)) for key in keys if key.endswith(".manifest.json")]
    ok = [d for d in docs if d["database"] == db and d["status"] == "ok"]
    for doc in ok:
        data = read(lead + doc["artifact"])
        assert len(data) == doc["size_bytes"] and hashlib.sha256(data).hexdigest() == doc["sha256"], doc["id"]
    return ok


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture
def db(pg: PgServer) -> Iterator[str]:
    """A fresh database with a little data (the session server is shared, so never the files' `app`)."""
    name = pg.create_db()
    pg.psql(
        name,
        "CREATE TABLE smoke (id int PRIMARY KEY, note text);"
        "INSERT INTO smoke SELECT g, 'row ' || g FROM generate_series(1, 200) g;",
    )
    yield name
    pg.drop_db(name)


# --- the console script ------------------------------------------------------------------------------------


def test_console_script_is_installed():
    """Says (as a skip) when the tests below ran `python -m app` in place of the image's ENTRYPOINT."""
    if CONSOLE_PATH is None:
        pytest.skip(
            f"`{CONSOLE_SCRIPT}` is not on PATH (run `pip install -e .`): the smoke tests ran "
            f"`{Path(sys.executable).name} -m app`, the same program, in its place"
        )
    _assert_imports_this_checkout(_script_interpreter(CONSOLE_PATH))
    result = _run([CONSOLE_PATH, "--help"], _host_env(), ROOT)
    assert result.returncode == 0, _explain([CONSOLE_PATH, "--help"], result)


def test_probe_interpreter_imports_this_checkout():
    """`python3` as the probes name it runs this checkout's healthcheck/, not an installed copy."""
    _assert_imports_this_checkout(_image_healthcheck()[0][0])


# --- Dockerfile --------------------------------------------------------------------------------------------


def test_dockerfile_cmd_and_healthcheck(pg: PgServer, db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """ENTRYPOINT+CMD (`run`) backs up on start; the HEALTHCHECK command turns 0; SIGTERM exits 0 in 10 s."""
    nas = tmp_path / "nas"
    nas.mkdir()
    port = free_port()
    # The image sets no sidecar settings (no secrets inside, SPEC); `docker run -e ...` gives them all.
    add: Adaptation = {
        **{key: (value, "the local test server (docker run -e ...)") for key, value in pg.env().items()},
        "POSTGRES_DB": (db, "a fresh database on the shared test server"),
        "NAS_PATH": (str(nas), "a tmp dir; the image's /backups volume does not exist on the host"),
        "LOCK_FILE": (str(tmp_path / "locks" / "backup-sidecar.lock"), "the image's /locks volume -> tmp dir"),
        "HEALTH_PORT": (str(port), "a free port: EXPOSE 8080 is inside the container's network namespace"),
        "HEALTH_BIND": ("127.0.0.1", "listen on loopback only on a shared host"),
        "BACKUP_ON_START": ("true", "so a backup exists and the HEALTHCHECK can turn OK without waiting for 03:00"),
    }
    settings = _adapt("docker run", {}, replace={}, add=add)
    env = _process_env(settings)
    (tmp_path / "locks").mkdir()
    _assert_the_code_reads("docker run", settings, env, monkeypatch)
    _config_ok("Dockerfile", _image_entrypoint(), env, tmp_path, [str(nas)])

    probe, probe_timeout = _image_healthcheck()
    sidecar = Sidecar(_entrypoint([*_image_entrypoint(), *_image_cmd()]), env, tmp_path)
    try:
        sidecar.wait_until(probe, env, tmp_path, probe_timeout)
        assert len(_nas_ok_manifests(nas, db)) == 1, f"healthy, but no ok manifest on the NAS:\n{sidecar.log()}"
        _stop_cleanly(sidecar)
    finally:
        sidecar.close()


# --- compose.yaml ------------------------------------------------------------------------------------------


def _documented_dotenv() -> dict[str, str]:
    """The "Minimal content" .env that compose.yaml's header documents (.env itself is never committed)."""
    lines = COMPOSE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "Minimal content" in line) + 1
    env: dict[str, str] = {}
    for line in lines[start:]:
        text = line.removeprefix("#").strip()
        if not line.startswith("#") or "=" not in text or " " in text:
            break
        key, _, value = text.partition("=")
        env[key] = value
    assert env, "compose.yaml no longer documents the minimal .env under 'Minimal content'"
    return env


def _compose_probe(test: str | list[str]) -> list[str]:
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    kind, *rest = test
    if kind == "CMD-SHELL":
        return ["/bin/sh", "-c", rest[0]]
    assert kind == "CMD", f"unexpected healthcheck.test {test}"
    return rest


def _compose_entrypoint(service: dict) -> list[str]:
    return _as_argv(service["entrypoint"]) if "entrypoint" in service else _image_entrypoint()


def _compose_argv(service: dict) -> list[str]:
    command = _as_argv(service["command"]) if "command" in service else _image_cmd()
    return _entrypoint([*_compose_entrypoint(service), *command])


def test_compose_backup_once_then_sidecar_healthcheck(
    pg: PgServer, s3: S3Server, bucket: str, db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`backup-once` backs up to NAS and S3; then `backup-sidecar` runs, its healthcheck.test exits 0."""
    services = _sidecar_services()
    nas, locks = tmp_path / "nas", tmp_path / "locks"
    nas.mkdir()
    locks.mkdir()
    port = free_port()
    # .env, as compose.yaml's header documents it (env_file), with this stack's credentials and names.
    dotenv_replace: Adaptation = {
        "POSTGRES_USER": (pg.user, "the test server's role"),
        "POSTGRES_PASSWORD": (pg.password, "the test server's password"),
        "POSTGRES_DB": (db, "a fresh database on the shared test server"),
        "S3_BUCKET": (bucket, "a fresh bucket per test (minio-init creates it in the stack)"),
        "S3_ACCESS_KEY_ID": (s3.access_key, "the s3 fixture's credentials (minio-init creates the user)"),
        "S3_SECRET_ACCESS_KEY": (s3.secret_key, "the s3 fixture's credentials"),
    }
    not_settings = {
        "MINIO_ROOT_USER": "for the minio and minio-init services; the sidecar sees .env whole (compose.yaml says so)",
        "MINIO_ROOT_PASSWORD": "likewise",
    }
    dotenv = _adapt(".env (compose.yaml header)", _documented_dotenv(), replace=dotenv_replace)
    # Each sidecar service's `environment:` (it wins over .env), wired to the local stack.
    environment_replace: Adaptation = {
        "POSTGRES_HOST": (pg.host, "the `postgres` service -> the local test server"),
        "POSTGRES_PORT": (str(pg.port), "the local test server's port"),
        "S3_ENDPOINT": (s3.endpoint, "the `minio` service -> the s3 fixture (host:port, plain HTTP as in the file)"),
        "NAS_PATH": (str(nas), "the `nas` volume at /backups -> tmp dir"),
        "LOCK_FILE": (str(locks / "backup-sidecar.lock"), "the `locks` volume at /locks -> tmp dir"),
        "HEALTH_PORT": (str(port), "a free port: 8080 is inside the container's network namespace"),
    }
    environment_add: Adaptation = {
        "HEALTH_BIND": ("127.0.0.1", "listen on loopback only on a shared host (the file publishes 127.0.0.1)"),
    }
    envs: dict[str, dict[str, str]] = {}
    for name in ("backup-check", "backup-once", "backup-sidecar"):
        service = services[name]
        file_env = {**_documented_dotenv(), **{k: str(v) for k, v in service["environment"].items()}}
        settings = {
            **dotenv,
            **_adapt(
                f"compose {name} environment", service["environment"], replace=environment_replace, add=environment_add
            ),
        }
        envs[name] = _process_env(settings)
        _assert_the_code_reads(f"compose {name}", file_env, envs[name], monkeypatch, not_settings)
        _config_ok(f"compose {name}", _compose_entrypoint(service), envs[name], tmp_path, [str(nas), f"s3://{bucket}"])

    check = _compose_argv(services["backup-check"])  # `up` runs it to completion before backup-sidecar
    checked = _run_ok(check, envs["backup-check"], tmp_path)
    assert "FAIL" not in checked.stdout and f"s3://{bucket}" in checked.stdout, _explain(check, checked)
    backup_once = _compose_argv(services["backup-once"])
    result = _run_ok(backup_once, envs["backup-once"], tmp_path)
    assert len(_nas_ok_manifests(nas, db)) == 1, f"no ok manifest on the NAS: {_explain(backup_once, result)}"
    assert len(_s3_ok_manifests(s3, bucket, "", db)) == 1, f"no ok manifest in S3: {_explain(backup_once, result)}"

    sidecar_service = services["backup-sidecar"]
    check = sidecar_service["healthcheck"]
    sidecar = Sidecar(_compose_argv(sidecar_service), envs["backup-sidecar"], tmp_path)
    try:
        sidecar.wait_until(
            _compose_probe(check["test"]), envs["backup-sidecar"], tmp_path, parse_duration(str(check["timeout"]))
        )
        _stop_cleanly(sidecar)
    finally:
        sidecar.close()


# --- Kubernetes --------------------------------------------------------------------------------------------


def _secret_keys() -> set[str]:
    (secret,) = _by_kind("Secret").values()
    return set(secret.get("stringData", {})) | set(secret.get("data", {}))


def _container(obj: dict) -> dict:
    (container,) = _pod_spec(obj)["containers"]
    return container


def _init_containers(obj: dict) -> list[dict]:
    return list(_pod_spec(obj).get("initContainers", []))


def _container_argv(container: dict) -> list[str]:
    if "command" in container:
        return _entrypoint([*container["command"], *container.get("args", [])])
    return _entrypoint([*_image_entrypoint(), *container.get("args", _image_cmd())])


def _container_file_env(container: dict, secret: Mapping[str, str]) -> dict[str, str]:
    """The container's environment as the manifests set it: envFrom ConfigMaps, then env (secretKeyRefs resolved)."""
    config_maps = _by_kind("ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update({k: str(v) for k, v in config_maps[source["configMapRef"]["name"]]["data"].items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = secret[var["valueFrom"]["secretKeyRef"]["key"]]
    return env


class K8sStack:
    """The ConfigMap + Secret + volumes of deploy/k8s, materialised under tmp_path for one test."""

    def __init__(self, pg: PgServer, s3: S3Server, bucket: str, db: str, tmp_path: Path) -> None:
        self.s3, self.bucket, self.db, self.cwd = s3, bucket, db, tmp_path
        # The Secret (secret.example.yaml's keys) with this stack's credentials.
        self.secret = {
            "postgres-password": pg.password,
            "s3-access-key-id": s3.access_key,
            "s3-secret-access-key": s3.secret_key,
        }
        assert set(self.secret) == _secret_keys(), "secret.example.yaml's keys changed: update the smoke test"
        # Volumes by the name the pod specs give them -> host dirs.
        self.volumes = {name: tmp_path / name for name in ("secrets", "nas", "locks", "tmp")}
        for path in self.volumes.values():
            path.mkdir()
        for key, value in self.secret.items():
            (self.volumes["secrets"] / key).write_text(value)
        self.port = free_port()
        self.pg = pg

    def host_path(self, container: dict, path: str) -> str:
        """A path inside the pod -> the same file under the tmp dir standing in for the volume it is on."""
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        mount = max((m for m in mounts if PurePosixPath(path).is_relative_to(m)), key=len, default=None)
        assert mount is not None, f"{path} is on no volume of container {container['name']}"
        return str(self.volumes[mounts[mount]] / PurePosixPath(path).relative_to(mount))

    def env(self, where: str, container: dict, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
        file_env = _container_file_env(container, self.secret)
        here = self.host_path
        replace: Adaptation = {
            "POSTGRES_HOST": (self.pg.host, "the `postgres` Service -> the local test server"),
            "POSTGRES_PORT": (str(self.pg.port), "the local test server's port"),
            "POSTGRES_DB": (self.db, "a fresh database on the shared test server, not `app`"),
            "POSTGRES_USER": (
                self.pg.user,
                "the test server's role; a `backup` role is not created on the shared "
                "server (cluster-wide roles would leak into other tests' globals)",
            ),
            "POSTGRES_PASSWORD_FILE": (
                here(container, file_env["POSTGRES_PASSWORD_FILE"]),
                "the Secret volume -> a tmp dir holding the same keys",
            ),
            "S3_SECRET_ACCESS_KEY_FILE": (
                here(container, file_env["S3_SECRET_ACCESS_KEY_FILE"]),
                "the Secret volume -> a tmp dir holding the same keys",
            ),
            "S3_ACCESS_KEY_ID_FILE": (
                here(container, file_env["S3_ACCESS_KEY_ID_FILE"]),
                "the Secret volume -> a tmp dir holding the same keys",
            ),
            "S3_ENDPOINT": (f"http://{self.s3.endpoint}", "the in-cluster MinIO (plain HTTP) -> the s3 fixture"),
            "S3_BUCKET": (self.bucket, "a fresh bucket per test"),
            "NAS_PATH": (here(container, file_env["NAS_PATH"]), "the backup-sidecar-nas PVC -> tmp dir"),
            "LOCK_FILE": (here(container, file_env["LOCK_FILE"]), "the backup-sidecar-locks PVC -> tmp dir"),
            "HEALTH_PORT": (str(self.port), "a free port: 8080 is inside the pod's network namespace"),
        }
        add: Adaptation = {
            "HEALTH_BIND": ("127.0.0.1", "listen on loopback only on a shared host (a pod has its own network)"),
        }
        env = _process_env(_adapt(where, file_env, replace=replace, add=add))
        _assert_the_code_reads(where, file_env, env, monkeypatch)
        prefix = file_env.get("S3_PREFIX", "").strip("/")
        targets = [replace["NAS_PATH"][0], f"s3://{self.bucket}" + (f"/{prefix}" if prefix else "")]
        _config_ok(where, _image_entrypoint(), env, self.cwd, targets)
        return env

    def backup(self, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict[str, str]]:
        """The backup CronJob's container run to completion: (container, its env)."""
        container = _container(_cronjob_running("backup"))
        env = self.env("CronJob backup-sidecar-backup", container, monkeypatch)
        _run_ok(_container_argv(container), env, self.cwd)
        return container, env


def test_kubernetes_backup_cronjob_then_verify_cronjob(
    pg: PgServer, s3: S3Server, bucket: str, db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """cronjob-backup.yaml's args back up to NAS and S3 (with S3_PREFIX); cronjob-verify.yaml's args restore it."""
    stack = K8sStack(pg, s3, bucket, db, tmp_path)
    backup, env = stack.backup(monkeypatch)
    (nas_doc,) = _nas_ok_manifests(Path(env["NAS_PATH"]), db)
    (s3_doc,) = _s3_ok_manifests(s3, bucket, env["S3_PREFIX"], db)
    assert nas_doc["id"] == s3_doc["id"]

    verify = _container(_cronjob_running("verify"))
    verify_env = stack.env("CronJob backup-sidecar-verify", verify, monkeypatch)
    result = _run_ok(_container_argv(verify), verify_env, tmp_path)
    assert nas_doc["id"] in result.stdout + result.stderr, _explain(_container_argv(verify), result)
    databases = pg.psql("postgres", "SELECT string_agg(datname, ',') FROM pg_database")
    assert databases.count(db) == 1, f"--restore-test left a scratch database behind: {databases}"


def test_kubernetes_deployment_probes(
    pg: PgServer, s3: S3Server, bucket: str, db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """deployment.yaml's `run` after a CronJob backup: startup, readiness and the liveness exec probe pass."""
    stack = K8sStack(pg, s3, bucket, db, tmp_path)
    stack.backup(monkeypatch)
    (deployment,) = _by_kind("Deployment").values()
    container = _container(deployment)
    env = stack.env("Deployment backup-sidecar", container, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    configured_port = int(_container_file_env(container, stack.secret)["HEALTH_PORT"])

    def probe_port(probe: dict) -> int:
        """The pod port a probe targets, checked against HEALTH_PORT, then mapped to this host's port."""
        port = probe["port"]
        port = ports[port] if isinstance(port, str) else port
        assert port == configured_port, f"probe port {port} is not HEALTH_PORT {configured_port}"
        return stack.port

    for init in _init_containers(deployment):  # the kubelet runs them to completion before the sidecar starts
        init_env = stack.env(f"Deployment backup-sidecar init {init['name']}", init, monkeypatch)
        done = _run_ok(_container_argv(init), init_env, tmp_path)
        assert "FAIL" not in done.stdout and f"s3://{bucket}" in done.stdout, _explain(_container_argv(init), done)
    sidecar = Sidecar(_container_argv(container), env, tmp_path)
    try:
        startup_port = probe_port(container["startupProbe"]["tcpSocket"])
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _listening(startup_port):
            sidecar.assert_running()
            assert time.monotonic() < deadline, f"nothing listens on the startupProbe port:\n{sidecar.log()}"
            time.sleep(0.1)

        readiness = container["readinessProbe"]
        url = f"http://127.0.0.1:{probe_port(readiness['httpGet'])}{readiness['httpGet']['path']}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:  # /health reads the targets in the background: 200 once it has seen the CronJob's backup
            try:
                status = opener.open(url, timeout=readiness.get("timeoutSeconds", 1)).status
            except urllib.error.HTTPError as exc:
                status = exc.code
            if status == 200:
                break
            sidecar.assert_running()
            assert time.monotonic() < deadline, f"readinessProbe {url} answered {status}:\n{sidecar.log()}"
            time.sleep(0.2)

        liveness = container["livenessProbe"]
        command = liveness["exec"]["command"]
        result = _run(command, env, tmp_path, timeout=liveness.get("timeoutSeconds", 1))
        assert result.returncode == 0, _explain(command, result) + f"\nsidecar log:\n{sidecar.log()}"
        _stop_cleanly(sidecar)
    finally:
        sidecar.close()
