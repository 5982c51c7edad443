# Loads the diffusion demo's base pipeline (demo/diffusion/base) with diffusers, and the LoRA
# file a `lora demo --task diffusion` run wrote (lora-demo-diffusion/pytorch_lora_weights.safetensors)
# with `load_lora_weights` (PyPI: torch, diffusers, transformers, peft, safetensors, pillow), and
# checks that they generate what `lora sd generate` does from the same initial latents: every
# pixel within 2/255, without the LoRA and with it, for two prompts (one the LoRA never saw).
#
#   cargo run --release -p lora-cli -- demo --task diffusion      (writes lora-demo-diffusion/)
#   python3 demo/diffusion/check_with_diffusers.py                (from the repository root)
#
# Not run in CI (CI needs no Python). Last run 2026-11-30 with torch 2.15.0, diffusers 0.42.1,
# transformers 5.24.0, peft 0.21.2 on the committed base and a default run's LoRA: see demo/README.md.
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

BASE, LORA = "demo/diffusion/base", "lora-demo-diffusion/pytorch_lora_weights.safetensors"
LORA_CMD = ["cargo", "run", "-q", "--release", "-p", "lora-cli", "--"]
STEPS, GUIDANCE, N = 20, 4.0, 4

pipe = StableDiffusionPipeline.from_pretrained(BASE, torch_dtype=torch.float32, safety_checker=None)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
latents = torch.randn(N, 4, 16, 16, generator=torch.Generator().manual_seed(5))
tmp = tempfile.mkdtemp()
noise = os.path.join(tmp, "latents.safetensors")
save_file({"latents": latents.contiguous()}, noise)


def ours(prompt, lora):
    out = os.path.join(tmp, f"ours-{prompt.replace(' ', '-')}-{int(lora)}.png")
    args = ["sd", "generate", "--model", BASE, "--prompt", prompt, "--steps", str(STEPS),
            "--guidance", str(GUIDANCE), "--scheduler", "dpm++", "--size", "32x32",
            "--batch", str(N), "--init-noise", noise, "--out", out]
    if lora:
        args += ["--lora", LORA]
    r = subprocess.run(LORA_CMD + args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"lora sd generate failed: {r.stderr}")
    grid = np.asarray(Image.open(out).convert("RGB")).astype(np.int32)
    # `--batch 4` makes a 2 x 2 grid, row-major.
    return [grid[(i // 2) * 32:(i // 2 + 1) * 32, (i % 2) * 32:(i % 2 + 1) * 32] for i in range(N)]


def theirs(prompt):
    img = pipe(prompt=[prompt] * N, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               height=32, width=32, latents=latents.clone(), output_type="np").images
    return [(np.round(x * 255)).astype(np.int32) for x in img]


ok = True
for lora in (False, True):
    if lora:
        pipe.load_lora_weights(LORA)
    for prompt in ("a red circle", "an orange triangle"):
        a, b = ours(prompt, lora), theirs(prompt)
        worst = max(int(np.abs(x - y).max()) for x, y in zip(a, b))
        print(f"{'with' if lora else 'without'} the LoRA, {prompt!r}: max pixel difference {worst}/255 over {N} images")
        ok &= worst <= 2
print("OK" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
