#!/usr/bin/env bash
# Fill the wheelhouse that travels to a lent GPU machine: wheels of exactly what llm needs
# that the machine's image lacks, for its Python (CPython 3.12, manylinux2014 x86-64).
#
#   scripts/gpu_wheelhouse.sh            # into .whl/ (git-ignored; the device call carries it)
#   scripts/gpu_wheelhouse.sh DIR        # into DIR (or set LLM_WHEELHOUSE=DIR)
#
# The list (what the image holds, what is carried, pinned, one version each) is
# scripts/gpu_wheelhouse.txt; tests/test_gpu_wheelhouse.py checks it against llm's imports.
# Binary and pure wheels come from PyPI (`pip download --only-binary=:all:` for the target
# Python); deepspeed is an sdist, built here into a pure-Python wheel with DS_BUILD_OPS=0
# (no prebuilt ops; on the GPU machine DeepSpeed JIT-builds any op it needs). The wheels are
# assembled in a scratch folder and replace DIR/*.whl only when all of them are there, so DIR
# never holds two versions of a package. Prints the total size last (at most 40 MiB).
#
# Needs pip and PyPI here (not torch: deepspeed builds in pip's isolated environment).
# On the GPU machine: benchmarks/gpu_suite.sh installs DIR/*.whl with
#   pip install --no-index --no-deps --target TARGET DIR/*.whl
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LIST="$ROOT/scripts/gpu_wheelhouse.txt"
case "${1:-}" in
  -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
esac
[[ $# -le 1 ]] || { echo "usage: $0 [DIR]" >&2; exit 2; }
DEST="${1:-${LLM_WHEELHOUSE:-$ROOT/.whl}}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
PY_VERSION="${GPU_PY_VERSION:-3.12}"
PLATFORM="${GPU_PLATFORM:-manylinux2014_x86_64}"
MAX_MIB=40

wheels=() sdists=()
while read -r kind names; do
  case "$kind" in
    wheel | override) read -ra more <<<"$names"; wheels+=("${more[@]}") ;;
    sdist) read -ra more <<<"$names"; sdists+=("${more[@]}") ;;
  esac
done < <(sed -e 's/#.*//' "$LIST")
for req in "${wheels[@]}" "${sdists[@]}"; do
  [[ $req == *==* ]] || { echo "gpu_wheelhouse: $LIST: '$req' has no pinned version (NAME==VERSION)" >&2; exit 1; }
done

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/llm-wheelhouse.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT

echo "gpu_wheelhouse: ${#wheels[@]} wheels for CPython $PY_VERSION $PLATFORM from PyPI" >&2
"$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
  --python-version "$PY_VERSION" --platform "$PLATFORM" -d "$SCRATCH" "${wheels[@]}"

for req in "${sdists[@]}"; do
  echo "gpu_wheelhouse: building $req from its sdist (DS_BUILD_OPS=0: no prebuilt ops)" >&2
  # --no-cache-dir: pip's wheel cache keys on the sdist alone and could hand back a wheel
  # built elsewhere with ops compiled in.
  env -u DS_ACCELERATOR DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-cache-dir \
    --no-binary "${req%%==*}" -w "$SCRATCH" "$req"
done

# Exactly one wheel per entry, each installable on the target, deepspeed without compiled code.
shopt -s nullglob
built=("$SCRATCH"/*.whl)
if ((${#built[@]} != ${#wheels[@]} + ${#sdists[@]})); then
  echo "gpu_wheelhouse: expected $((${#wheels[@]} + ${#sdists[@]})) wheels, got ${#built[@]}: ${built[*]##*/}" >&2
  exit 1
fi
for req in "${sdists[@]}"; do
  name="${req%%==*}"
  whl=("$SCRATCH/${name//-/_}-${req##*==}-py3-none-any.whl")
  [[ -f ${whl[0]} ]] || { echo "gpu_wheelhouse: $req did not build into a pure-Python wheel" >&2; exit 1; }
  if "$PY" -m zipfile -l "${whl[0]}" | grep -qE '\.(so|pyd)\b'; then
    echo "gpu_wheelhouse: ${whl[0]##*/} holds compiled code; it must be built with DS_BUILD_OPS=0" >&2
    exit 1
  fi
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
mv "$SCRATCH"/*.whl "$DEST"/
for w in "$DEST"/*.whl; do
  awk -v b="$(stat -c %s "$w")" -v n="${w##*/}" 'BEGIN { printf "  %6.2f MiB  %s\n", b / 1048576, n }'
done
bytes=$(cat "$DEST"/*.whl | wc -c)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
if ((bytes > MAX_MIB * 1048576)); then
  echo "gpu_wheelhouse: $mib MiB is over the $MAX_MIB MiB allowed (the device call carries at most 64 MiB)" >&2
  exit 1
fi
echo "wheelhouse: ${#built[@]} wheels, $mib MiB in $DEST"
