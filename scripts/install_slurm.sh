#!/usr/bin/env bash
# Install Debian's Slurm daemons and munge for the single-node Slurm test (tests/launch), when missing.
# Idempotent and quiet; needs root or sudo; skips with a message where apt-get is absent. Never fails the caller:
# without Slurm the Slurm test reports what is missing.
set -uo pipefail

packages=(slurmctld slurmd slurm-client munge)
have() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]]; }

if have slurmctld && have slurmd && have sbatch && have munged; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm.sh: apt-get not found; install slurmctld, slurmd and munge yourself for the Slurm test" >&2
  exit 0
fi
if [[ $EUID -eq 0 ]]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "install_slurm.sh: not root and no passwordless sudo; skipping the Slurm install" >&2
  exit 0
fi

echo "install_slurm.sh: installing ${packages[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { "${sudo[@]}" apt-get update -qq >/dev/null &&
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; }; then
  echo "install_slurm.sh: apt-get install ${packages[*]} failed" >&2
fi
exit 0
