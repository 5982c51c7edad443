#!/usr/bin/env python3
"""Side-by-side LoRA linear comparison, lora-rs vs PyTorch, on this machine.

Alternates `lora bench linear --suite --json` and `benches/compare_torch.py --json` for several
rounds (so both see the same machine conditions on a shared, noisy host) and prints a Markdown
table of the medians over rounds.

Run from the repository root (needs `pip install torch` and a release build):
    cargo build --release -p lora-cli && python3 benches/compare.py --rounds 3 --threads 2
"""
import argparse
import json
import statistics
import subprocess
import sys


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora", default="target/release/lora")
    args = ap.parse_args()
    rs, py = {}, {}
    for i in range(args.rounds):
        for row in run_json([args.lora, "bench", "linear", "--suite", "--json", "--threads", str(args.threads)]):
            rs.setdefault((row["tokens"], row["in"], row["out"], row["rank"]), []).append(row)
        for row in run_json([sys.executable, "benches/compare_torch.py", "--json", "--threads", str(args.threads)]):
            py.setdefault((row["tokens"], row["in"], row["out"], row["rank"]), []).append(row)
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
    med = lambda rows, key: statistics.median(r[key] for r in rows)
    print("| shape (N x K x M, r) | lora-rs LoRA ms | lora-rs base-only ms | overhead | % of GEMM ceiling | PyTorch LoRA ms | PyTorch base-only ms | PyTorch / lora-rs (LoRA) |")
    print("|---|---|---|---|---|---|---|---|")
    for key in rs:
        r, p = rs[key], py[key]
        lr, pr = med(r, "median_ms"), med(p, "median_ms")
        print(f"| {key[0]} x {key[1]} x {key[2]}, r{key[3]} | {lr:.1f} | {med(r, 'base_only_median_ms'):.1f} | "
              f"{med(r, 'overhead_pct'):.1f}% | {100 * med(r, 'fraction_of_ceiling'):.0f}% | {pr:.1f} | "
              f"{med(p, 'base_only_median_ms'):.1f} | {pr / lr:.2f}x |")


if __name__ == "__main__":
    main()
