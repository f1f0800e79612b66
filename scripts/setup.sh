# The set-up behind scripts/run-local.sh and scripts/test.sh (sourced by them, not run on its own):
#
#   source scripts/setup.sh && bs_setup run|test
#
# On a fresh Debian/Ubuntu machine with python3 and git it
#   1. installs the Debian packages of scripts/apt-packages.txt that are missing (as root; otherwise it names
#      them with the exact command and stops; BACKUP_SIDECAR_SKIP_APT=1 goes on without them),
#   2. creates the project virtualenv .venv (python3 -m venv, so it works with "externally managed" PEP 668
#      Pythons such as Debian's /usr/bin/python3; Debian needs python3-venv for it, installed like step 1),
#   3. installs the project into it (pip install -e . or -e ".[test]"), skipped while pyproject.toml has not
#      changed since (a stamp in the venv holds its hash), so a second run takes well under a second.
# Then .venv/bin leads PATH and BS_PYTHON names its interpreter.
#
# Knobs: PYTHON (the interpreter to build the venv from, default python3), BACKUP_SIDECAR_VENV (another venv
# directory; an activated venv, VIRTUAL_ENV, is used as it is), BACKUP_SIDECAR_SKIP_APT=1.

BS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BS_MIN_PYTHON="3.11"

bs_say() { echo "setup: $*" >&2; }

bs_packages() {  # the packages of a scope: run -> run; test -> run and test
  local scope="$1"
  awk -v scope="$scope" '!/^[[:space:]]*(#|$)/ { if ($2 == "run" || scope == "test") print $1 }' \
    "$BS_ROOT/scripts/apt-packages.txt"
}

bs_missing() {  # the packages among "$@" that dpkg does not show as installed
  local installed
  installed="$(dpkg-query -W -f='${db:Status-Status} ${Package}\n' "$@" 2>/dev/null | awk '$1 == "installed" { print $2 }')"
  local p
  for p in "$@"; do
    grep -qxF "$p" <<<"$installed" || echo "$p"
  done
}

bs_apt_install() {  # install "$@" as root; `apt-get update` first only when apt does not know a package
  local p need_update=false available=() unknown=()
  for p in "$@"; do
    apt-cache show "$p" >/dev/null 2>&1 || need_update=true
  done
  export DEBIAN_FRONTEND=noninteractive
  if $need_update; then
    bs_say "apt-get update (the package lists do not know all of: $*)"
    apt-get update -qq
  fi
  for p in "$@"; do
    if apt-cache show "$p" >/dev/null 2>&1; then available+=("$p"); else unknown+=("$p"); fi
  done
  if [ "${#unknown[@]}" -gt 0 ]; then  # e.g. a distribution that names it differently: what needs it skips
    bs_say "not to be had from this system's package sources: ${unknown[*]} (what needs it skips, saying so)"
  fi
  [ "${#available[@]}" -gt 0 ] || return 0
  bs_say "apt-get install ${available[*]}"
  if ! apt-get install -y -qq --no-install-recommends "${available[@]}" >/dev/null; then
    bs_say "install failed; refreshing the package lists and trying once more"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${available[@]}" >/dev/null
  fi
}

bs_ensure_packages() {  # $@: packages that must be installed
  [ "$#" -gt 0 ] || return 0
  if ! command -v dpkg-query >/dev/null 2>&1; then
    bs_say "not a Debian/Ubuntu system: make sure the equivalents of these are installed: $*"
    return 0
  fi
  local missing
  missing="$(bs_missing "$@" | tr '\n' ' ')"
  missing="${missing% }"
  [ -n "$missing" ] || return 0
  if [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2086  # one word per package
    bs_apt_install $missing
  elif [ "${BACKUP_SIDECAR_SKIP_APT:-}" = 1 ]; then
    bs_say "going on without: $missing (BACKUP_SIDECAR_SKIP_APT=1; what needs them fails or skips, saying so)"
  else
    bs_say "these Debian packages are missing: $missing"
    bs_say "install them, then run this again:"
    echo "    sudo apt-get install -y --no-install-recommends $missing" >&2
    bs_say "(or set BACKUP_SIDECAR_SKIP_APT=1 to go on without them)"
    exit 1
  fi
}

bs_python() {  # the interpreter to build the venv from, checked for its version
  local py="${PYTHON:-python3}"
  if ! command -v "$py" >/dev/null 2>&1; then
    bs_say "$py not found (hint: install python3 >= $BS_MIN_PYTHON, or set PYTHON=/path/to/python3)"
    exit 1
  fi
  if ! "$py" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$BS_MIN_PYTHON'.split('.'))))"; then
    bs_say "$py is Python $("$py" -c 'import platform; print(platform.python_version())'), backup-sidecar needs" \
           ">= $BS_MIN_PYTHON (hint: set PYTHON=/path/to/python3.11)"
    exit 1
  fi
  command -v "$py"
}

bs_venv() {  # create (or repair) the venv; prints its directory
  local py="$1" venv="${BACKUP_SIDECAR_VENV:-${VIRTUAL_ENV:-$BS_ROOT/.venv}}"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import sys" 2>/dev/null; then
    echo "$venv"
    return 0
  fi
  if ! "$py" -c "import ensurepip, venv" 2>/dev/null; then  # Debian ships venv's pip seed separately
    local pkg
    pkg="python$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv"
    if [ "${py#/usr/bin/}" != "$py" ]; then
      bs_ensure_packages "$pkg"
    else
      bs_say "$py cannot create a virtualenv (no ensurepip) (hint: install its venv support, or set PYTHON)"
      exit 1
    fi
  fi
  if [ -n "${VIRTUAL_ENV:-}" ] && [ "$venv" = "$VIRTUAL_ENV" ] && [ -e "$venv" ]; then
    bs_say "the activated virtualenv $venv does not run (hint: deactivate it, or recreate it)"
    exit 1
  fi
  bs_say "creating the virtualenv $venv (with $py)"
  rm -rf "$venv"
  "$py" -m venv "$venv" >&2
  echo "$venv"
}

bs_install() {  # $1 venv, $2 scope: pip install unless the stamp says this pyproject.toml is installed
  local venv="$1" scope="$2" hash stamp="$1/.backup-sidecar-setup" spec="."
  hash="$(sha256sum "$BS_ROOT/pyproject.toml" | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cut -d' ' -f1 "$stamp")" = "$hash" ] \
     && { [ "$scope" = run ] || grep -q " test$" "$stamp"; } \
     && "$venv/bin/python" -c "import app" 2>/dev/null; then
    return 0
  fi
  [ "$scope" = test ] && spec=".[test]"
  bs_say "pip install -e \"$spec\" into $venv"
  (cd "$BS_ROOT" && PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install -q -e "$spec")
  echo "$hash $( [ "$scope" = test ] && echo test || echo run)" >"$stamp"
}

bs_setup() {  # $1: run | test
  local scope="$1" py venv
  # shellcheck disable=SC2046  # one word per package
  bs_ensure_packages $(bs_packages "$scope")
  # every listed package is there: a test that misses its tool then fails instead of skipping (tests/conftest.py)
  # shellcheck disable=SC2046
  if command -v dpkg-query >/dev/null 2>&1 && [ -z "$(bs_missing $(bs_packages "$scope"))" ]; then
    export BACKUP_SIDECAR_TOOLS=installed
  fi
  py="$(bs_python)"
  venv="$(bs_venv "$py")"
  bs_install "$venv" "$scope"
  export PATH="$venv/bin:$PATH"
  BS_VENV="$venv"
  BS_PYTHON="$venv/bin/python"
  export BS_VENV BS_PYTHON
}
