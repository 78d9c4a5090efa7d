#!/usr/bin/env bash
# Install the serving peers that benchmarks/bench_peers.py runs beside modelkiln.
#
# Usage: bash benchmarks/peers/setup_peers.sh [llamacpp|ctranslate2|infinity|hf ...]
#   (no argument: all of them, llama.cpp first because its build takes minutes)
#
# Everything goes under $MODELKILN_PEERS_DIR (default /work/peers), outside the repo.
# Each peer gets its own venv: infinity-emb pins an older transformers than modelkiln's.
# torch is pinned to torch==2.13.0 wherever a peer needs it: other specs pull
# multi-GB CUDA builds from PyPI, while 2.13.0 resolves to the local CPU wheel.
# Idempotent: a peer whose marker file exists is skipped (delete <peer>/.ok to redo it).
# A peer that fails is recorded with its exact error in status.tsv and the script goes
# on with the others; the exit code is 1 if any peer failed.
set -u

PEERS_DIR="${MODELKILN_PEERS_DIR:-/work/peers}"
PYTHON="${PEERS_PYTHON:-python3}"
JOBS="${PEERS_BUILD_JOBS:-2}"
TORCH_SPEC="torch==2.13.0"
# transformers for the GGUF converter and the HF-generate baseline venv; the converter
# shipped in the sdist imports transformers only for tokenizer/config reading.
mkdir -p "$PEERS_DIR"
STATUS="$PEERS_DIR/status.tsv"
touch "$STATUS"

log() { printf '[setup_peers %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

record() {  # record PEER ok|failed MESSAGE: one line per peer, the latest wins
    local peer="$1" state="$2" msg="$3"
    grep -v -P "^${peer}\t" "$STATUS" >"$STATUS.tmp" || true
    printf '%s\t%s\t%s\n' "$peer" "$state" "$msg" >>"$STATUS.tmp"
    mv "$STATUS.tmp" "$STATUS"
}

make_venv() {  # make_venv DIR: a venv with an up-to-date pip, reused when present
    [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"
}

install_llamacpp() {
    # llama-server from the llama.cpp sources vendored in the llama-cpp-python sdist
    # (PyPI ships no llama-server binary); plus a venv for convert_hf_to_gguf.py.
    local d="$PEERS_DIR/llamacpp"
    mkdir -p "$d"
    if [ ! -d "$d/src/vendor/llama.cpp" ]; then
        rm -rf "$d/sdist" "$d/src"
        mkdir -p "$d/sdist"
        "$PYTHON" -m pip download --no-binary llama-cpp-python --no-deps -d "$d/sdist" llama-cpp-python
        tar -xzf "$d"/sdist/llama_cpp_python-*.tar.gz -C "$d"
        mv "$d"/llama_cpp_python-*/ "$d/src"
    fi
    local src="$d/src/vendor/llama.cpp"
    if [ ! -x "$d/bin/llama-server" ]; then
        cmake -S "$src" -B "$d/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
            -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
        cmake --build "$d/build" --target llama-server -j"$JOBS"
        mkdir -p "$d/bin"
        cp "$d/build/bin/llama-server" "$d/bin/llama-server"
    fi
    make_venv "$d/venv"
    "$d/venv/bin/pip" install -q "$TORCH_SPEC" transformers sentencepiece numpy
    "$d/venv/bin/pip" install -q -e "$src/gguf-py"
    "$d/bin/llama-server" --version
}

install_ctranslate2() {
    local d="$PEERS_DIR/ctranslate2"
    make_venv "$d/venv"
    "$d/venv/bin/pip" install -q ctranslate2 "$TORCH_SPEC" transformers
    "$d/venv/bin/python" -c "import ctranslate2; print('ctranslate2', ctranslate2.__version__)"
}

install_infinity() {
    local d="$PEERS_DIR/infinity"
    make_venv "$d/venv"
    "$d/venv/bin/pip" install -q "$TORCH_SPEC" "infinity-emb[server,torch]"
    "$d/venv/bin/python" -c "import infinity_emb; print('infinity_emb', infinity_emb.__version__)"
    "$d/venv/bin/infinity_emb" v2 --help >/dev/null
}

run_peer() {  # run_peer NAME: install once, log to NAME/setup.log, record the result
    local peer="$1" d="$PEERS_DIR/$1"
    mkdir -p "$d"
    if [ -f "$d/.ok" ]; then
        log "$peer: already installed ($d/.ok)"
        return 0
    fi
    log "$peer: installing (log: $d/setup.log)"
    if (set -eo pipefail; "install_$peer") >"$d/setup.log" 2>&1; then
        date -u +%FT%TZ >"$d/.ok"
        record "$peer" ok "$(tail -n 1 "$d/setup.log")"
        log "$peer: ok"
        return 0
    fi
    # The exact error: the last error-looking line, else the last line of the log.
    local err
    err="$(grep -E -i 'error|fatal|failed|not found|no matching' "$d/setup.log" | tail -n 1)"
    [ -n "$err" ] || err="$(tail -n 1 "$d/setup.log")"
    record "$peer" failed "$err"
    log "$peer: FAILED: $err (full log: $d/setup.log)"
    return 1
}

peers=("$@")
[ ${#peers[@]} -gt 0 ] || peers=(llamacpp ctranslate2 infinity)
rc=0
for p in "${peers[@]}"; do
    case "$p" in
        llamacpp | ctranslate2 | infinity) run_peer "$p" || rc=1 ;;
        *) log "unknown peer '$p' (known: llamacpp ctranslate2 infinity)"; rc=2 ;;
    esac
done
log "status ($STATUS):"
cat "$STATUS"
exit $rc
