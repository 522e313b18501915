#!/usr/bin/env bash
# Install what the two-node test cluster (tests/launch/testcluster.py, scripts/testcluster) needs beyond Slurm and
# munge (scripts/install_slurm.sh): sshd and pdsh (the DeepSpeed launcher's default way to reach hosts), plus
# iproute2 and util-linux (ip, unshare, nsenter). Idempotent and quiet; needs root or sudo; never fails the caller:
# as root the multi-node tests then fail naming what is missing, elsewhere they skip.
# The Debian package would start sshd on this machine's port 22; a policy-rc.d that refuses service starts is put
# in place for the install when none exists, so nothing listens outside the cluster's namespaces.
set -uo pipefail

packages=(openssh-server openssh-client pdsh iproute2 util-linux)
have() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]]; }

if have sshd && have ssh && have ssh-keygen && have pdsh && have ip && have unshare && have nsenter; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_testcluster.sh: apt-get not found; install ${packages[*]} yourself for the multi-node tests" >&2
  exit 0
fi
if [[ $EUID -eq 0 ]]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "install_testcluster.sh: not root and no passwordless sudo; skipping (the multi-node tests need root anyway)" >&2
  exit 0
fi

policy=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null && "${sudo[@]}" chmod 755 "$policy" && own_policy=1
fi
echo "install_testcluster.sh: installing ${packages[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { "${sudo[@]}" apt-get update -qq >/dev/null &&
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; }; then
  echo "install_testcluster.sh: apt-get install ${packages[*]} failed" >&2
fi
if [[ $own_policy -eq 1 ]]; then "${sudo[@]}" rm -f "$policy"; fi
exit 0
