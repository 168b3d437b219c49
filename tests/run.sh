#!/usr/bin/env bash
# The test command (README): the Debian packages the SLURM tests need, installed when missing
# (apt-get, as root), then pytest with the arguments given. Collecting no test is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(slurmctld slurmd slurm-client munge)
missing=()
for tool in munged mungekey slurmctld slurmd sbatch scontrol; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "tests/run.sh: the SLURM tests need ${missing[*]}, from the Debian packages ${packages[*]}." >&2
    echo "Run this script as root once (it installs them with apt-get), or install them as root." >&2
    exit 1
  fi
  echo "== installing ${packages[*]} (apt-get) =="
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi

set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
