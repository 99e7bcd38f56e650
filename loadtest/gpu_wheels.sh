#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach the package index, fetched here (where pip can), for
# loadtest/gpu_check.sh to install there.
#
#   bash loadtest/gpu_wheels.sh [--have FILE] [--python 3.12] [--part-mib 61] [--list]
#
# Resolves the project's requirements (onnxruntime-gpu, at the worker image's version, instead of the
# CPU package; no torch) and the test tools for CPython --python on manylinux x86_64, leaves out every
# package FILE names (one name a line, or `pip freeze` output: what the target machine already has),
# and downloads the rest into .whl/. The onnxruntime-gpu wheel (about 250 MB) is too large to travel
# in one call of a tool that carries at most 64 MiB: it is cut into parts of --part-mib MiB, one folder
# each (.whl-ort-1/, .whl-ort-2/, ...), with its checksum. Carry each .whl-ort-N folder in a call of its
# own (they accumulate on a machine kept warm), then .whl with the call that runs the check.
# --list only prints what would be fetched.
set -euo pipefail
cd "$(dirname "$0")/.."

HAVE=
PYV=3.12
PART_MIB=61
LIST=0
while [ $# -gt 0 ]; do
    case "$1" in
        --have) HAVE=$2; shift 2 ;;
        --python) PYV=$2; shift 2 ;;
        --part-mib) PART_MIB=$2; shift 2 ;;
        --list) LIST=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
ORT_GPU_VERSION=${ORT_GPU_VERSION:-$(sed -n 's/^ARG ORT_GPU_VERSION=//p' deploy/docker/worker.Dockerfile)}
PLATFORM=(--only-binary=:all: --python-version "$PYV" --implementation cp)
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux1_x86_64; do
    PLATFORM+=(--platform "$p")
done
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The requirements: pyproject's, with the GPU runtime for the CPU one and without torch (a GPU machine
# brings its own CUDA build), plus what the cuda-marked tests need.
"$PY" - "$ORT_GPU_VERSION" >"$WORK/requirements.txt" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
keep = [r for r in project["dependencies"] if re.split(r"[<>=!~\[ ;]", r)[0].lower() not in ("onnxruntime", "torch")]
dev = [r for r in project["optional-dependencies"]["dev"] if r.split(">")[0] in ("pytest", "pytest-timeout", "pytest-asyncio", "httpx", "psutil")]
print("\n".join([*keep, f"onnxruntime-gpu=={sys.argv[1]}", *dev]))
EOF
"$PY" -m pip install -q --dry-run --ignore-installed --report "$WORK/report.json" --target "$WORK/none" \
    "${PLATFORM[@]}" -r "$WORK/requirements.txt"
"$PY" - "$WORK/report.json" "${HAVE:-/dev/null}" >"$WORK/pins.txt" <<'EOF'
import json, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(re.split(r"[=<> ]", line.strip())[0]) for line in open(sys.argv[2]) if line.strip() and not line.startswith("#")}
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if norm(meta["name"]) not in have:
        print(f"{meta['name']}=={meta['version']}")
EOF
echo "to fetch ($(wc -l <"$WORK/pins.txt") wheels, leaving out what ${HAVE:-nothing} names):"
sed 's/^/  /' "$WORK/pins.txt"
[ "$LIST" = 0 ] || exit 0

rm -rf .whl .whl-ort-*
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d .whl -r "$WORK/pins.txt"
ort=$(ls .whl/onnxruntime_gpu-*.whl 2>/dev/null || true)
if [ -n "$ort" ]; then
    name=$(basename "$ort")
    (cd .whl && sha256sum "$name") >"$WORK/$name.sha256"
    split -b "${PART_MIB}M" "$ort" "$WORK/$name.part-"
    n=0
    for part in "$WORK/$name".part-*; do
        n=$((n + 1))
        mkdir -p ".whl-ort-$n"
        mv "$part" ".whl-ort-$n/"
    done
    mv "$WORK/$name.sha256" .whl-ort-1/
    rm "$ort"
fi
echo
du -sh .whl .whl-ort-* 2>/dev/null
echo "Device calls, one after the other while the machine stays warm (each carries one folder):"
for d in .whl-ort-*; do
    [ -d "$d" ] && echo "  run(command='ls $d', carry=['$d'])"
done
echo "  run(command='bash loadtest/gpu_check.sh', carry=['.whl'], timeout_s=540)"
