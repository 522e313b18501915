#!/usr/bin/env bash
# Install the system tools the launch tests need, when missing: Slurm and munge (the single-node Slurm fixture,
# tests/launch/slurm_cluster.py) and, for the two-node test cluster (tests/launch/testcluster.py,
# scripts/testcluster), sshd and pdsh (the DeepSpeed launcher's default way to reach hosts), iproute2 and
# util-linux (ip, unshare, nsenter). Idempotent and quiet; needs root or sudo; never fails the caller: as root the
# tests then fail naming what is missing, elsewhere they skip.
# Debian's packages would start sshd, munged, slurmctld and slurmd on this machine: a policy-rc.d that refuses
# service starts is put in place for the install when none exists, so nothing runs outside the tests' own daemons.
set -uo pipefail

packages=(slurmctld slurmd slurm-client munge openssh-server openssh-client pdsh iproute2 util-linux)
tools=(slurmctld slurmd sbatch scontrol scancel munged sshd ssh ssh-keygen pdsh ip unshare nsenter)
have() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]]; }

missing=()
for t in "${tools[@]}"; do have "$t" || missing+=("$t"); done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_testcluster.sh: apt-get not found; install ${packages[*]} yourself (missing: ${missing[*]})" >&2
  exit 0
fi
if [[ $EUID -eq 0 ]]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "install_testcluster.sh: not root and no passwordless sudo; skipping (the Slurm and multi-node tests need root)" >&2
  exit 0
fi

policy=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null && "${sudo[@]}" chmod 755 "$policy" && own_policy=1
fi
echo "install_testcluster.sh: installing ${packages[*]} with apt-get (missing: ${missing[*]})" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { "${sudo[@]}" apt-get update -qq >/dev/null &&
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; }; then
  echo "install_testcluster.sh: apt-get install ${packages[*]} failed" >&2
fi
if [[ $own_policy -eq 1 ]]; then "${sudo[@]}" rm -f "$policy"; fi
exit 0
