#!/usr/bin/env bash
# The GPU check, one command for a GPU machine: install what the GPU path needs, then run
# `python -m loadtest.gpu_check` (the cuda-marked tests, then the bench on the device) within a budget.
#
#   bash loadtest/gpu_check.sh [--device auto|cpu|cuda] [--quick|--full] [--budget-s S] [--no-install] [...]
#
# Other flags go to loadtest/gpu_check.py. Results: $OUT (or .tandem/gpu-check) gets gpu_check.json,
# gpu_check.md, and the logs gpu_check.log, install.log, install.json and pytest.log.
#
# What it installs, and only on a CUDA run whose ONNX Runtime cannot already open a CUDA session:
# onnxruntime-gpu in place of the CPU package, as deploy/docker/worker.Dockerfile does (same version),
# plus any of the project's requirements that are missing. From wheels carried in .whl/ (and
# .whl-ort-*/ for the parts of onnxruntime-gpu; loadtest/gpu_wheels.sh prepares both) when they are
# there, installed into a folder of their own put first on PYTHONPATH; else from the package index:
# `pip install '.[gpu]'`, then the CPU package swapped for the GPU one. The CUDA libraries that pip
# packages installed (nvidia-*) are put on LD_LIBRARY_PATH.
#
# On the CPU (no GPU, or --device cpu) it installs nothing and runs the same check as a dry run of a
# minute or two, which is what CI runs (--full: the large model's figures on the CPU instead).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT:-.tandem/gpu-check}
DEVICE=auto
QUICK=0
FULL=0
INSTALL=1
BUDGET=
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --device=*) DEVICE=${1#*=}; shift ;;
        --quick) QUICK=1; PASS+=(--quick); shift ;;
        --full) FULL=1; PASS+=(--full); shift ;;
        --budget-s) BUDGET=$2; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --out) OUT_DIR=$2; shift 2 ;;
        *) PASS+=("$1"); shift ;;
    esac
done
mkdir -p "$OUT_DIR"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS=${TANDEM_WHEELS:-.whl}
SITE=${TANDEM_SITE:-/tmp/tandem-site}
ORT_GPU_VERSION=${ORT_GPU_VERSION:-$(sed -n 's/^ARG ORT_GPU_VERSION=//p' deploy/docker/worker.Dockerfile)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "[gpu_check.sh ${SECONDS}s] $*"; }

has_gpu() { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; }

ort_has_cuda() {
    "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
        2>/dev/null
}

# Whether the project's requirements are there (found, not imported: importing them takes seconds).
deps_ok() {
    "$PY" - <<'EOF' 2>/dev/null
import importlib.util, sys
names = "mlflow fastapi uvicorn zmq msgpack orjson redis prometheus_client pydantic_settings typer yaml httpx pytest"
names += " pytest_timeout onnx onnxruntime torch"
sys.exit(any(importlib.util.find_spec(n) is None for n in names.split()))
EOF
}

# The parts of a wheel too large to travel in one call (.whl-ort-1/NAME.part-aa, ...) joined again
# into $WHEELS, and checked against the NAME.sha256 that travelled with them.
join_parts() {
    local parts name sums
    parts=$(ls .whl-ort-*/*.whl.part-* 2>/dev/null | sort -t/ -k2) || true
    [ -n "$parts" ] || return 0
    name=$(basename "$(echo "$parts" | head -1)" | sed 's/\.part-.*//')
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2086
    cat $parts >"$WHEELS/$name"
    sums=$(ls .whl-ort-*/"$name.sha256" 2>/dev/null | head -1)
    if [ -n "$sums" ]; then
        (cd "$WHEELS" && sha256sum --quiet -c "$OLDPWD/$sums") || return 1
    fi
    log "joined $(echo "$parts" | wc -l) parts into $WHEELS/$name"
}

# Nvidia's CUDA libraries installed as pip packages (nvidia-cublas, nvidia-cudnn-*, ...), for
# onnxruntime-gpu to find: the worker image has them from its CUDA base, a Python environment does not.
cuda_lib_path() {
    "$PY" - <<'EOF'
import glob, os, site, sys
seen = []
for base in [*site.getsitepackages(), *sys.path]:
    for d in sorted(glob.glob(os.path.join(base, "nvidia", "**", "lib"), recursive=True)):
        if d not in seen and glob.glob(os.path.join(d, "*.so*")):
            seen.append(d)
print(":".join(seen))
EOF
}

install_gpu() {
    if ort_has_cuda && deps_ok; then
        INSTALL_SOURCE="already installed"
        return 0
    fi
    join_parts || { INSTALL_PROBLEM="the parts of the onnxruntime-gpu wheel do not match their checksum"; return 1; }
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        INSTALL_SOURCE="carried wheels ($(ls "$WHEELS"/*.whl | wc -l) in $WHEELS, into $SITE)"
        timeout 240 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHEELS"/*.whl || { INSTALL_PROBLEM="pip could not install the carried wheels"; return 1; }
        export PYTHONPATH="$PWD:$SITE${PYTHONPATH#"$PWD"}"
    else
        INSTALL_SOURCE="package index (.[gpu], onnxruntime-gpu==$ORT_GPU_VERSION for the CPU package)"
        timeout 300 "$PY" -m pip install -q --timeout 20 ".[gpu]" \
            && "$PY" -m pip uninstall -y -q onnxruntime onnxruntime-gpu \
            && timeout 300 "$PY" -m pip install -q --timeout 20 --no-deps "onnxruntime-gpu==$ORT_GPU_VERSION" \
            || { INSTALL_PROBLEM="pip could not install from the package index (no network? carry wheels)"; return 1; }
    fi
}

write_install_report() {
    INSTALL_SOURCE=${INSTALL_SOURCE:-} INSTALL_PROBLEM=${INSTALL_PROBLEM:-} INSTALL_S=$1 "$PY" - "$OUT_DIR/install.json" <<'EOF'
import json, os, sys
report = {"source": os.environ["INSTALL_SOURCE"] or None, "seconds": int(os.environ["INSTALL_S"])}
if os.environ["INSTALL_PROBLEM"]:
    report["problem"] = os.environ["INSTALL_PROBLEM"]
try:
    import onnxruntime as o
    report["onnxruntime"] = f"{o.__version__} from {os.path.dirname(o.__file__)}"
    report["providers"] = o.get_available_providers()
except Exception as exc:
    report["onnxruntime"] = f"cannot import: {exc}"
with open(sys.argv[1], "w") as f:
    json.dump(report, f, indent=2)
EOF
}

main() {
    log "device $DEVICE, python $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])'), out $OUT_DIR"
    if [ "$DEVICE" = auto ]; then
        if has_gpu; then DEVICE=cuda; else DEVICE=cpu; fi
        log "auto: $DEVICE"
    fi
    local t0=$SECONDS
    if [ "$DEVICE" = cuda ]; then
        nvidia-smi -L || true
        if [ "$INSTALL" = 1 ]; then
            install_gpu >"$OUT_DIR/install.log" 2>&1 || log "install failed: ${INSTALL_PROBLEM:-see install.log}"
            log "install: ${INSTALL_SOURCE:-nothing} (${INSTALL_PROBLEM:-ok})"
        fi
        local libs
        libs=$(cuda_lib_path)
        [ -z "$libs" ] || export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    elif ! deps_ok; then
        log "the project's requirements are not importable with $PY: make install, or PYTHON=..."
        return 2
    fi
    write_install_report $((SECONDS - t0))
    # The whole script: 7.5 minutes on a GPU (a device command may run 10, a lease is 15 in all); the
    # dry run takes a minute or two.
    local total=${BUDGET:-450}
    if [ -z "$BUDGET" ] && { [ "$QUICK" = 1 ] || { [ "$DEVICE" = cpu ] && [ "$FULL" = 0 ]; }; }; then total=240; fi
    local left=$((total - SECONDS - 10))
    log "checking, budget ${left}s"
    "$PY" -m loadtest.gpu_check --device "$DEVICE" --out "$OUT_DIR" --budget-s "$left" \
        --install-report "$OUT_DIR/install.json" "${PASS[@]}"
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
