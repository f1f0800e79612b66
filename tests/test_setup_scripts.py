"""The two README commands on a fresh clone: their set-up, as a new user meets it, then a tiny run of each.

The clone gets a fresh virtualenv from the stock Debian Python (/usr/bin/python3, "externally managed",
PEP 668) with an environment as bare as `env -i PATH=/usr/bin:/bin HOME=...` gives: nothing from this
test run's own virtualenv leaks in. Only the package index is reached, through pip's cache.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO

SYSTEM_PYTHON = Path("/usr/bin/python3")
#: What a bare shell keeps: the proxy and certificate settings a machine needs to reach the package index.
PASS_THROUGH = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "PIP_INDEX_URL",
                "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT", "SSL_CERT_FILE", "SSL_CERT_DIR", "CI")


def _pip_cache() -> str:
    out = subprocess.run([SYSTEM_PYTHON, "-m", "pip", "cache", "dir"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else str(Path.home() / ".cache/pip")


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone of this repository, with this work tree's uncommitted changes laid over it."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 (the stock Debian Python this test sets up with)")
    dest = tmp_path_factory.mktemp("fresh") / "backup-sidecar"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(dest)], check=True, timeout=120)
    changed = subprocess.run(["git", "-C", str(REPO), "ls-files", "--modified", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout.split()
    for rel in changed:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def bare_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("home")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "PIP_CACHE_DIR": _pip_cache()}
    env.update({k: os.environ[k] for k in PASS_THROUGH if k in os.environ})
    return env


def _run(clone: Path, env: dict[str, str], *argv: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess,
                                                                                     float]:
    started = time.monotonic()
    result = subprocess.run(list(argv), cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stderr


def test_both_readme_commands_set_up_a_fresh_clone_with_the_stock_python_once(clone: Path,
                                                                              bare_env: dict[str, str]) -> None:
    cold_run, _ = _run(clone, bare_env, "scripts/run-local.sh", "--setup-only")
    said = _ok(cold_run)
    assert f"creating the virtualenv {clone}/.venv (with /usr/bin/python3)" in said
    assert 'pip install -e "."' in said
    cold_test, _ = _run(clone, bare_env, "scripts/test.sh", "--setup-only")
    assert 'pip install -e ".[test]"' in _ok(cold_test)
    venv_python = clone / ".venv" / "bin" / "python"
    probe = subprocess.run([venv_python, "-c", "import sys, app, pytest, ruff; print(sys.prefix, app.__file__)"],
                           capture_output=True, text=True, check=True, env=bare_env, cwd=clone.parent).stdout
    assert probe.startswith(f"{clone}/.venv ") and f"{clone}/app/__init__.py" in probe

    for script in ("scripts/run-local.sh", "scripts/test.sh"):  # warm: the venv and its install are reused
        warm, took = _run(clone, bare_env, script, "--setup-only")
        assert "pip install" not in _ok(warm) and "creating" not in warm.stderr
        assert took < 5, f"{script}'s second set-up took {took:.1f}s"

    pyproject = clone / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + "\n# changed\n")
    changed, _ = _run(clone, bare_env, "scripts/test.sh", "--setup-only")
    assert 'pip install -e ".[test]"' in _ok(changed), "a changed pyproject.toml must be installed again"


def test_run_local_serves_a_second_shell_then_cleans_up(clone: Path, bare_env: dict[str, str],
                                                        tmp_path: Path) -> None:
    envfile = clone / ".local" / "run-local.env"
    log = (tmp_path / "run-local.log").open("w")
    proc = subprocess.Popen(["scripts/run-local.sh"], cwd=clone, env=bare_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (envfile.exists() and list((clone / "backups").rglob("app-*.manifest.json"))):
            assert proc.poll() is None, (tmp_path / "run-local.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "run-local.log").read_text()
            time.sleep(0.3)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        second_shell = (
            f"set -e; source {envfile}; cd {elsewhere}; backup-sidecar list; "
            "backup-sidecar verify latest --restore-test; "
            "backup-sidecar restore latest --to-db app_copy --create --yes; "
            "psql -X -Atc 'SELECT count(*) FROM notes' app_copy"
        )
        second = subprocess.run(["bash", "-c", second_shell], env=bare_env, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 0, second.stdout + second.stderr
        assert " ok " in second.stdout and "restore-test" in second.stdout
        assert second.stdout.strip().splitlines()[-1] == "1000"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        log.close()
    text = (tmp_path / "run-local.log").read_text()
    assert code == 0, text
    assert "a throwaway PostgreSQL runs on 127.0.0.1:" in text and f"source {envfile}" in text
    assert not envfile.exists(), "the env file outlived the database it points at"
    assert "the throwaway PostgreSQL is stopped and removed" in text
    assert text.count("no notification channel is configured") == 1, "said once per `run`"


def test_the_test_command_runs_tests_in_the_fresh_clone(clone: Path, bare_env: dict[str, str]) -> None:
    result, _ = _run(clone, bare_env, "scripts/test.sh", "-q", "-p", "no:cacheprovider", "tests/test_dumpopts.py")
    _ok(result)
    assert " passed" in result.stdout and "failed" not in result.stdout
