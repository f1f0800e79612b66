#!/usr/bin/env bash
# The whole test suite: set-up (scripts/setup.sh: Debian packages, the .venv virtualenv, pip install -e
# ".[test]"), then lint, then every test against the real servers the suite starts itself (throwaway
# PostgreSQL and MariaDB with password auth, an S3 server, SMTP and HTTP receivers, a headless browser).
#   scripts/test.sh                   everything (what CI runs)
#   scripts/test.sh -k restore -x     extra arguments go to pytest
#   scripts/test.sh --setup-only      only the set-up
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
bs_setup test
if [ "${1:-}" = "--setup-only" ]; then
  bs_say "ready: $BS_VENV ($("$BS_PYTHON" -c 'import platform; print(platform.python_version())'))"
  exit 0
fi
"$BS_PYTHON" -m ruff check .
exec "$BS_PYTHON" -m pytest "$@"
