#!/usr/bin/env python3
"""PyTorch side of the LoRA linear comparison: the same layer and shapes as `lora bench linear
--suite`, forward + backward with a frozen base weight (PEFT's LoRA math written out: PEFT's
`Linear` computes exactly `base(x) + lora_B(lora_A(dropout(x))) * scaling`), median of timed
iterations, on the same number of threads.

Run (after `pip install torch`), on the same machine and right after the Rust bench:
    python3 benches/compare_torch.py --threads 2
bf16 (PyTorch's best CPU mode where the CPU has AVX512-BF16 or AMX), against
`lora bench linear --suite --precision bf16`:
    python3 benches/compare_torch.py --threads 2 --autocast-bf16
Prints one line per shape: median ms of LoRA fwd+bwd, of the base layer alone (fwd + input
gradient), and the overhead.
"""
import argparse
import json
import time

import torch

SUITE = [(2048, 768, 768, 8), (2048, 768, 3072, 16), (4096, 2048, 2048, 16), (512, 4096, 4096, 64)]


def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=9)
    ap.add_argument("--json", action="store_true", help="one JSON object per shape")
    ap.add_argument("--autocast-bf16", action="store_true",
                    help="run the layer under torch.autocast('cpu', dtype=torch.bfloat16)")
    args = ap.parse_args()
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast_bf16)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not args.json:
        mode = "autocast bf16" if args.autocast_bf16 else "f32"
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {mode}")
    for n, k, m, r in SUITE:
        x = torch.randn(n, k, requires_grad=True)
        w = torch.randn(m, k) / k**0.5  # frozen
        a = (torch.rand(r, k) * 2 - 1).div_(k**0.5).requires_grad_()
        b = (torch.randn(m, r) * 0.1).requires_grad_()
        dy = torch.randn(n, m)
        s = 2.0

        def lora_step():
            with cast:
                y = x @ w.t() + s * ((x @ a.t()) @ b.t())
            y.backward(dy)

        def base_step():
            with cast:
                y = x @ w.t()
            y.backward(dy)

        lora_step()
        base_step()
        tl, tb = [], []
        for _ in range(args.iters):
            for f, acc in ((lora_step, tl), (base_step, tb)):
                x.grad = a.grad = b.grad = None
                t = time.perf_counter()
                f()
                acc.append(time.perf_counter() - t)
        ml, mb = median(tl), median(tb)
        flops = 4 * n * k * m + 2 * n * r * (3 * k + 3 * m)
        if args.json:
            print(json.dumps({"tokens": n, "in": k, "out": m, "rank": r, "median_ms": ml * 1e3,
                              "base_only_median_ms": mb * 1e3, "gflops": flops / ml / 1e9,
                              "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "autocast_bf16": args.autocast_bf16}))
        else:
            print(f"{n} x {k} x {m}, r{r}: lora {ml * 1e3:.2f} ms ({flops / ml / 1e9:.1f} GFLOP/s), "
                  f"base-only {mb * 1e3:.2f} ms, overhead {(ml / mb - 1) * 100:.1f}%")


if __name__ == "__main__":
    main()
