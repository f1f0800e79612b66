#!/usr/bin/env bash
# The whole test suite: lint, then every test against the real servers the suite starts itself
# (a throwaway PostgreSQL with password auth, an S3 server, SMTP and HTTP receivers).
# Extra arguments go to pytest, e.g. scripts/test.sh -k restore -x
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check .
python3 -m pytest "$@"
