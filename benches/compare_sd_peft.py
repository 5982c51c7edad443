#!/usr/bin/env python3
"""diffusers + PEFT side of `lora bench sd`: one step of a Stable Diffusion 1.5-shaped
`UNet2DConditionModel` (random weights, no download; `--base-channels 320` is SD 1.5's 860M
parameters): `--mode train`, a LoRA training step as diffusers' `train_text_to_image_lora.py`
runs it (`unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=[to_k, to_q, to_v,
to_out.0]))`, noisy latents at size/8, random 77x768 text states, MSE to a random target,
backward, clipping at 1.0, AdamW); `--mode generate`, one classifier-free-guided sampling step
(the UNet on the batch doubled, under no_grad). Median step time and peak RSS of this process.

Run each mode in its own process (peak RSS is per process), same threads as the Rust side,
alternating the two sides:
    ./target/release/lora bench sd --threads 2 --json
    python3 benches/compare_sd_peft.py --threads 2
    python3 benches/compare_sd_peft.py --threads 2 --bf16       # autocast bf16 (AVX512-BF16/AMX)
    ./target/release/lora bench sd --mode generate --threads 2 --json
    python3 benches/compare_sd_peft.py --mode generate --threads 2 [--bf16]
`lora bench sd --weights f16` holds the frozen weights as an fp16 checkpoint's are held (16-bit
in memory, computed in f32); PyTorch's f32 run upcasts such a checkpoint, so its side is the same
either way.
Needs torch, diffusers, peft.
"""
import argparse
import json
import resource
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="train", choices=["train", "generate"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--base-channels", type=int, default=320)
    ap.add_argument("--bf16", action="store_true", help="autocast to bf16 (PyTorch's best CPU mode where bf16 instructions exist)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = args.base_channels
    unet = UNet2DConditionModel(
        block_out_channels=(c, 2 * c, 4 * c, 4 * c),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    train = args.mode == "train"
    unet.requires_grad_(False)
    if train:
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        unet.train()
    else:
        unet.eval()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if train else None
    lat = args.size // 8
    b = args.batch if train else 2 * args.batch
    noisy = torch.randn(b, 4, lat, lat)
    target = torch.randn(b, 4, lat, lat)
    ctx = torch.randn(b, 77, 768)
    ts = torch.tensor([100 + 300 * i for i in range(b)])

    def step():
        if train:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                pred = unet(noisy, ts, ctx).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        else:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                unet(noisy, ts, ctx).sample.float()

    step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    print(json.dumps({
        "mode": args.mode, "precision": "bf16 autocast" if args.bf16 else "f32", "batch": args.batch,
        "size": args.size, "base_channels": c, "unet_params": sum(p.numel() for p in unet.parameters()),
        "lora_params": sum(p.numel() for p in params), "threads": args.threads, "torch": torch.__version__,
        "median_step_s": med, "step_times_s": times, "peak_rss_gib": rss,
    }))


if __name__ == "__main__":
    main()
