#!/usr/bin/env bash
# The test command: install, lint, type-check, then run the tests against a real sshd.
# Usage: bash tests/run.sh [pytest arguments...]   (PYTHON=/path/to/python3 to pick one)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"

step() { printf '\n== %s\n' "$*" >&2; }

# The SSH tests need a real OpenSSH server; CI machines may lack one.
if [[ ! -x /usr/sbin/sshd ]] || ! command -v ssh-keygen >/dev/null; then
  if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; then
    step "installing openssh-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq openssh-server openssh-client >/dev/null
  else
    echo "warning: /usr/sbin/sshd or ssh-keygen missing and cannot install it here;" \
      "SSH tests will be skipped (and fail when CI=true)" >&2
  fi
fi

step "installing tej with its test extra"
"$PYTHON" -m pip install -q -e '.[test]'

step "ruff check"
"$PYTHON" -m ruff check tej tests
step "ruff format --check"
"$PYTHON" -m ruff format --check tej tests
step "mypy"
"$PYTHON" -m mypy tej
step "pytest"
"$PYTHON" -m pytest "$@"
