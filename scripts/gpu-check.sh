#!/usr/bin/env bash
# GPU checks from binaries built elsewhere (the GPU machine may have no Rust toolchain).
#
#   scripts/gpu-check.sh build   # on a machine with Rust: builds the CUDA test binaries into
#                                # gpu-bin/cu12 and gpu-bin/cu13 (bindings for CUDA 12 / 13)
#   scripts/gpu-check.sh run     # on the GPU machine, from the repository root (gpu-bin/ copied
#                                # there): runs the set whose cuBLAS and NVRTC the machine has
#                                # (CUDA 13 first) and writes gpu-results/results.txt
#
# What runs: NVRTC compilation of every .cu for sm_80/sm_90 plus ptxas register/spill report
# (cuda_ptx); the CUDA LoRA linear, element-wise, row and attention kernels against the f64
# oracle / CPU twins with NaN-poisoned outputs (cuda_parity); every method of the device
# backend trait the training step calls, CUDA vs the CPU backend (cuda_accel); lora-core's unit
# tests, whose op bodies run on the CPU and on cuda:0; a training run on cuda:0 resumed on the CPU
# (lora-train's run test of that name); and the LoRA linear benchmark,
# fused CUDA layer vs cuBLAS base layer alone, at the four reference shapes plus two
# Llama-7B-like ones (`lora bench linear --device cuda --suite --json`); whole training steps on
# the GPU against the CPU on the fixture models (lora-train's device tests, whose every body also
# runs on cuda:0 where one answers; LORA_REQUIRE_GPU=1 so a
# skip fails); and the GPT-2 small training step (`lora bench train --device cuda`, LoRA r8 on
# c_attn, batch 4 x 256) beside PyTorch + PEFT on the same GPU (benches/compare_train_peft.py).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
build)
    rm -rf gpu-bin
    for v in 12 13; do
        mkdir -p "gpu-bin/cu$v"
        f="--no-default-features --features cuda-$v"
        for pt in lora-kernels:cuda_parity lora-kernels:cuda_accel lora-kernels:cuda_ptx lora-train:device \
            lora-train:run lora-core:lib; do
            p=${pt%%:*} t=${pt##*:}
            sel="--test $t" pat="$t"
            [ "$t" = lib ] && sel=--lib pat="lora_core"
            # shellcheck disable=SC2086
            path=$(cargo test --release -p "$p" $f $sel --no-run --message-format=json 2>/dev/null \
                | grep -o '"executable":"[^"]*'"$pat"'[^"]*"' | head -1 | cut -d'"' -f4)
            cp "$path" "gpu-bin/cu$v/$p-$t"
        done
        # shellcheck disable=SC2086
        cargo build --release -p lora-cli $f
        cp target/release/lora "gpu-bin/cu$v/lora"
    done
    # Without debug info they fit the 64 MiB a device run may carry (14 MB a set vs 160 MB).
    strip gpu-bin/cu*/*
    ls -la gpu-bin/cu*
    ;;
run)
    mkdir -p gpu-results
    # NVRTC from the machine's CUDA toolkit (or a pip wheel), ptxas if present.
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    if command -v ptxas >/dev/null; then export LORA_PTXAS="$(command -v ptxas)"; fi
    [ -x /usr/local/cuda/bin/ptxas ] && export LORA_PTXAS=/usr/local/cuda/bin/ptxas
    # The binaries whose bindings match the machine's cuBLAS and NVRTC, CUDA 13 first.
    has() {
        grep -q "$1" < <(ldconfig -p 2>/dev/null) && return 0
        local d IFS=:
        for d in ${LD_LIBRARY_PATH:-}; do ls "$d/$1"* >/dev/null 2>&1 && return 0; done
        return 1
    }
    bin=gpu-bin/cu12
    if has libcublas.so.13 && has libnvrtc.so.13; then bin=gpu-bin/cu13; fi
    {
        echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ) with $bin"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
        echo "libraries: $( (ldconfig -p; IFS=:; for d in ${LD_LIBRARY_PATH:-}; do ls "$d"; done) 2>/dev/null \
            | grep -oE 'lib(cuda|cublas|cublasLt|nvrtc)\.so\.[0-9.]+' | sort -u | tr '\n' ' ')"
        for t in cuda_ptx cuda_parity cuda_accel; do
            echo "## $t"
            # Run from lora-kernels/ so relative paths match `cargo test`.
            (cd lora-kernels && LORA_REQUIRE_GPU=1 "../$bin/lora-kernels-$t" --nocapture --test-threads 1) 2>&1 \
                || echo "FAILED: $t"
        done
        echo "## lora-core unit tests: op bodies on the CPU and on cuda:0"
        (cd lora-core && ../$bin/lora-core-lib --nocapture --test-threads 1) 2>&1 || echo "FAILED: lora-core"
        echo "## device (lora-train): every body on the CPU and on cuda:0"
        (cd lora-train && LORA_REQUIRE_GPU=1 ../$bin/lora-train-device --nocapture --test-threads 1) 2>&1 \
            || echo "FAILED: device"
        echo "## a run on cuda:0 resumed on the CPU (lora-train run test)"
        (cd lora-train && LORA_REQUIRE_GPU=1 ../$bin/lora-train-run a_run_on_a_gpu --nocapture) 2>&1 \
            || echo "FAILED: run on a gpu"
        echo "## lora bench linear --device cuda --suite --json"
        $bin/lora bench linear --device cuda --suite --json 2>&1 || echo "FAILED: bench"
        echo "## lora bench train --device cuda --json (GPT-2 small, LoRA r8 c_attn, 4 x 256)"
        $bin/lora bench train --device cuda --steps 10 --json 2>&1 || echo "FAILED: bench train"
        echo "## PyTorch + PEFT, same step, same GPU"
        python3 benches/compare_train_peft.py --device cuda --steps 10 2>&1 || echo "FAILED: peft"
        echo "## the same two with TF32 tensor cores allowed in the base products (both sides)"
        $bin/lora bench train --device cuda --tf32 --steps 10 --json 2>&1 || echo "FAILED: bench train tf32"
        python3 benches/compare_train_peft.py --device cuda --tf32 --steps 10 2>&1 || echo "FAILED: peft tf32"
    } | tee gpu-results/results.txt
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
