# Loads the detection demo's base model (demo/detect/base) and the adapter a `lora demo --task
# detect` run wrote (lora-demo-detect/adapter) with transformers + PEFT (PyPI: torch,
# transformers, peft, pillow) and checks that they reproduce what `lora predict` computes: every
# detection token's best class, score and box on a few validation images, with the adapter (six
# classes) and without it (the base's three).
#
#   cargo run --release -p lora-cli -- demo --task detect      (writes lora-demo-detect/)
#   python3 demo/detect/check_with_transformers.py             (from the repository root)
#
# Not run in CI (CI needs no Python). Last run 2026-11-30 with torch 2.15.0, transformers 5.24.0,
# peft 0.21.2 on the adapter of commit 1710369's demo: see demo/README.md for the figures.
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from peft import PeftModel
from transformers import YolosForObjectDetection
from transformers.models.yolos.image_processing_pil_yolos import YolosImageProcessorPil

BASE, ADAPTER, DATA = "demo/detect/base", "lora-demo-detect/adapter", "lora-demo-detect/data"
LORA = ["cargo", "run", "-q", "--release", "-p", "lora-cli", "--"]

names = json.load(open(os.path.join(ADAPTER, "config.json")))["id2label"]
labels = [names[str(i)] for i in range(len(names))]
base = YolosForObjectDetection.from_pretrained(BASE, num_labels=len(labels), ignore_mismatched_sizes=True)
model = PeftModel.from_pretrained(base, ADAPTER)
model.eval()
proc = YolosImageProcessorPil.from_pretrained(ADAPTER)

base_only = YolosForObjectDetection.from_pretrained(BASE)
base_only.eval()
base_labels = [base_only.config.id2label[i] for i in range(base_only.config.num_labels)]


def tokens(m, names, path):
    pixels = torch.tensor(np.asarray(proc(images=Image.open(path).convert("RGB"), return_tensors="np")["pixel_values"]))
    with torch.no_grad():
        out = m(pixel_values=pixels)
    prob = out.logits.softmax(-1)[0, :, :-1]
    score, cls = prob.max(-1)
    w, h = Image.open(path).size
    found = []
    for q in range(prob.shape[0]):
        cx, cy, bw, bh = out.pred_boxes[0, q].tolist()
        found.append((names[cls[q]], score[q].item(), [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]))
    return sorted(found, key=lambda t: -t[1])


ok = True
worst_score = worst_box = 0.0
val = sorted(os.listdir(os.path.join(DATA, "images/val")))[:5]
for name in val:
    path = os.path.join(DATA, "images/val", name)
    for adapter in (True, False):
        theirs = tokens(model if adapter else base_only, labels if adapter else base_labels, path)
        args = ["--adapter", ADAPTER] if adapter else []
        ours = json.loads(subprocess.run(LORA + ["predict", "--model", BASE, *args, "--image", path, "--conf", "0", "--json"],
                                         capture_output=True, text=True, check=True).stdout)["predictions"]
        ok &= len(ours) == len(theirs)
        for (tl, ts, tb), o in zip(theirs, ours):
            ds, db = abs(ts - o["score"]), max(abs(a - b) for a, b in zip(tb, o["box"]))
            worst_score, worst_box = max(worst_score, ds), max(worst_box, db)
            ok &= tl == o["label"] and ds < 1e-4 and db < 1e-3
        print(f"{name} adapter={adapter}: {len(ours)} tokens, top: transformers {theirs[0][0]} {theirs[0][1]:.6f}, lora {ours[0]['label']} {ours[0]['score']:.6f}")
print(f"largest differences: score {worst_score:.2e}, box {worst_box:.2e} px;", "all equal" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
