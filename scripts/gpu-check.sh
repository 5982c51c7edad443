#!/usr/bin/env bash
# GPU checks from binaries built elsewhere (the GPU machine may have no Rust toolchain).
#
#   scripts/gpu-check.sh build   # on a machine with Rust: builds the CUDA test binaries into gpu-bin/
#   scripts/gpu-check.sh run     # on the GPU machine, from the repository root (gpu-bin/ copied
#                                # there): runs them and writes gpu-results/results.txt
#
# What runs: NVRTC compilation of every .cu for sm_80/sm_90 plus ptxas register/spill report
# (cuda_ptx); the CUDA LoRA linear, element-wise, row and attention kernels against the f64
# oracle / CPU twins with NaN-poisoned outputs (cuda_parity); and the LoRA linear benchmark,
# fused CUDA layer vs cuBLAS base layer alone, at the four reference shapes plus two
# Llama-7B-like ones (`lora bench linear --device cuda --suite --json`). Not here yet: a GPU
# training step (the training path does not run on CUDA yet).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
build)
    rm -rf gpu-bin && mkdir -p gpu-bin
    for t in cuda_parity cuda_ptx; do
        path=$(cargo test --release -p lora-kernels --test "$t" --no-run --message-format=json 2>/dev/null \
            | grep -o '"executable":"[^"]*'"$t"'[^"]*"' | head -1 | cut -d'"' -f4)
        cp "$path" "gpu-bin/$t"
    done
    cargo build --release -p lora-cli
    cp target/release/lora gpu-bin/lora
    ls -la gpu-bin
    ;;
run)
    mkdir -p gpu-results
    # NVRTC from the machine's CUDA toolkit (or a pip wheel), ptxas if present.
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    if command -v ptxas >/dev/null; then export LORA_PTXAS="$(command -v ptxas)"; fi
    [ -x /usr/local/cuda/bin/ptxas ] && export LORA_PTXAS=/usr/local/cuda/bin/ptxas
    {
        echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
        for t in cuda_ptx cuda_parity; do
            echo "## $t"
            # Run from lora-kernels/ so relative paths match `cargo test`.
            (cd lora-kernels && "../gpu-bin/$t" --nocapture --test-threads 1) 2>&1 \
                || echo "FAILED: $t"
        done
        echo "## lora bench linear --device cuda --suite --json"
        gpu-bin/lora bench linear --device cuda --suite --json 2>&1 || echo "FAILED: bench"
    } | tee gpu-results/results.txt
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
