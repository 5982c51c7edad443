#!/usr/bin/env python3
"""PyTorch + PEFT side of `lora bench vision`: one LoRA training step of a ViT-base classifier
(random weights, no download; r16 on q_proj/v_proj, the classifier in modules_to_save, AdamW,
clipping at 1.0) or of one conv LoRA layer (3x3, 256 -> 256, r16; forward + backward with a fixed
output gradient, AdamW); median step time, images/s and peak RSS of this process.

Run each mode in its own process (peak RSS is per process), same threads as the Rust side:
    ./target/release/lora bench vision --threads 2
    python3 benches/compare_vision_peft.py --threads 2
    python3 benches/compare_vision_peft.py --threads 2 --bf16      # autocast bf16 (CPU AMX/AVX512-BF16)
    ./target/release/lora bench vision --arch conv --threads 2
    python3 benches/compare_vision_peft.py --arch conv --threads 2
Needs torch, transformers, peft.
"""
import argparse
import json
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit", choices=["vit", "conv"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--bf16", action="store_true", help="autocast to bf16 (PyTorch's best CPU mode where bf16 instructions exist)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.arch == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        size = args.size or 224
        model = ViTForImageClassification(
            ViTConfig(num_hidden_layers=args.layers, image_size=size, num_labels=10, attn_implementation="sdpa")
        )
        model = get_peft_model(
            model,
            LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]),
        )
        x = torch.randn(args.batch, 3, size, size)
        y = torch.arange(args.batch) % 10

        def loss_fn():
            return model(pixel_values=x, labels=y).loss
    else:
        size = args.size or 56

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False)

            def forward(self, x):
                return self.conv(x)

        model = get_peft_model(Net(), LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["conv"]))
        x = torch.randn(args.batch, 256, size, size)
        dy = torch.randn(args.batch, 256, size, size)

        def loss_fn():
            return (model(x) * dy).sum()

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = loss_fn()
        loss.backward()
        if args.arch == "vit":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    print(json.dumps({
        "arch": args.arch, "mode": "bf16 autocast" if args.bf16 else "f32", "batch": args.batch, "size": size,
        "threads": args.threads, "torch": torch.__version__, "median_step_s": med,
        "images_per_s": args.batch / med, "peak_rss_gib": rss,
    }))


if __name__ == "__main__":
    main()
