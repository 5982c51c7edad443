#!/usr/bin/env python3
"""PyTorch + PEFT side of `lora bench train`: GPT-2 small (random weights, no download), LoRA r=8
on c_attn, batch 4 x 256, f32 (or bf16 autocast), one AdamW step per iteration; median step time,
tokens/s, peak RSS.

Run (needs torch, transformers, peft), after the Rust side, on the same machine:
    ./target/release/lora bench train --threads 2
    python3 benches/compare_train_peft.py --threads 2
bf16 (PyTorch's best CPU mode where the CPU has AVX512-BF16 or AMX):
    ./target/release/lora bench train --threads 2 --precision bf16
    python3 benches/compare_train_peft.py --threads 2 --autocast-bf16
On a GPU (scripts/gpu-check.sh does this):
    ./target/release/lora bench train --device cuda
    python3 benches/compare_train_peft.py --device cuda
"""
import argparse
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--tf32", action="store_true",
                    help="allow TF32 tensor cores in matmuls (the twin of `lora bench train --tf32`)")
    ap.add_argument("--autocast-bf16", action="store_true",
                    help="run forward and loss under torch.autocast(dtype=torch.bfloat16), the twin of "
                         "`lora bench train --precision bf16`")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0))
    model.to(dev)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 50257, (args.batch, args.seq)).to(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.autocast_bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB -> GiB
    out = {"torch": torch.__version__, "device": str(dev), "threads": args.threads, "tf32": args.tf32,
           "autocast_bf16": args.autocast_bf16, "median_step_s": med, "tokens_per_s": args.batch * args.seq / med, "peak_rss_gib": rss}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(dev) / (1 << 30)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
