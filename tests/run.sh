#!/usr/bin/env bash
# The test command: install, lint, type-check, then run the tests against a real sshd.
# Usage: bash tests/run.sh [pytest arguments...]   (PYTHON=/path/to/python3 to pick one)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"

step() { printf '\n== %s\n' "$*" >&2; }

can_apt() { [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; }

# apt-get install, with one `apt-get update` first per run of this script.
APT_UPDATED=0
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [[ "$APT_UPDATED" -eq 0 ]]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  apt-get install -y -qq "$@" >/dev/null
}

# The SSH tests need a real OpenSSH server; CI machines may lack one.
if [[ ! -x /usr/sbin/sshd ]] || ! command -v ssh-keygen >/dev/null; then
  if can_apt; then
    step "installing openssh-server"
    apt_install openssh-server openssh-client
  else
    echo "warning: /usr/sbin/sshd or ssh-keygen missing and cannot install it here;" \
      "SSH tests will be skipped (and fail when CI=true)" >&2
  fi
fi

# The Slurm tests need a real one-node Slurm (slurmctld, slurmd) and munge.
missing_slurm() {
  local tool
  for tool in sbatch slurmctld slurmd munged; do
    command -v "$tool" >/dev/null || [[ -x "/usr/sbin/$tool" ]] || return 0
  done
  return 1
}
if missing_slurm; then
  if can_apt; then
    step "installing slurm-wlm and munge"
    apt_install slurm-wlm munge
  else
    echo "warning: sbatch, slurmctld, slurmd or munged missing and cannot install them here;" \
      "Slurm tests will be skipped (and fail when CI=true)" >&2
  fi
fi

step "installing tej with its test extra"
"$PYTHON" -m pip install -q -e '.[test]'

step "ruff check"
"$PYTHON" -m ruff check tej tests bench
step "ruff format --check"
"$PYTHON" -m ruff format --check tej tests bench
step "mypy"
"$PYTHON" -m mypy tej
step "pytest"
"$PYTHON" -m pytest -n 2 --dist loadgroup "$@"  # two workers: see SHARED in tests/conftest.py
