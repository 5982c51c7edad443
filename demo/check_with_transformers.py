# Loads the demo's base model and adapter with transformers + PEFT (PyPI: torch, transformers,
# peft) and checks that they reproduce what `lora` computes: the loss of one text, with and
# without the adapter, the greedy translations of examples/hf_generate.rs, and that the adapted
# model ends its translation with EOS (training appends it) in both.
#
#   python3 demo/check_with_transformers.py        (from the repository root)
#
# Not run in CI (CI needs no Python); last run 2026-11-29 (adapter trained with EOS) with torch
# 2.15, transformers 5.24, peft 0.21.2: both losses equal `lora eval`'s to 1e-6, all generations
# identical, and both stop at EOS after the translation.
import subprocess, json, sys
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from peft import PeftModel

tok = PreTrainedTokenizerFast(tokenizer_file="demo/base/tokenizer.json")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("demo/base"), "demo/adapter")
text = ("english : a lazy wolf likes the white hen near the river . french :"
        " un loup paresseux aime la poule blanche près de la rivière .")
ids = tok(text, return_tensors="pt").input_ids
ok = True
with open("/tmp/lora-demo-check.jsonl", "w") as f:
    f.write(json.dumps({"text": text}) + "\n")
for adapter in (False, True):
    with torch.no_grad():
        if adapter:
            ours_args = ["--adapter", "demo/adapter"]
            theirs = model(ids, labels=ids).loss.item()
        else:
            ours_args = []
            with model.disable_adapter():
                theirs = model(ids, labels=ids).loss.item()
    out = subprocess.run(["cargo", "run", "-q", "--release", "-p", "lora-cli", "--", "eval", "--model", "demo/base",
                          *ours_args, "--data", "/tmp/lora-demo-check.jsonl", "--json"],
                         capture_output=True, text=True, check=True).stdout
    ours = json.loads(out)["loss"]
    print(f"adapter={adapter}: transformers loss {theirs:.7f}, lora {ours:.7f}")
    ok &= abs(theirs - ours) < 1e-5

prompt = "english : a lazy wolf likes the white hen near the river . french :"
p = tok(prompt, return_tensors="pt").input_ids
# Token 0 is both BOS and pad: pass the attention mask, or generate() masks the BOS out.
kw = dict(attention_mask=torch.ones_like(p), max_new_tokens=14, do_sample=False,
          eos_token_id=tok.convert_tokens_to_ids("."), pad_token_id=0)
adapted = tok.decode(model.generate(p, **kw)[0][p.shape[1]:])
with model.disable_adapter():
    base = tok.decode(model.generate(p, **kw)[0][p.shape[1]:])
print("base:   ", base)
print("adapted:", adapted)
ok &= adapted == "un loup paresseux aime la poule blanche près de la rivière ."
ok &= base == "un poisson blanc suit un loup ."  # `lora generate --model demo/base` (same prompt)

# Training ends every completion with EOS (token 0, config.json's eos_token_id), so the adapted
# model stops by itself: generate with the real EOS and compare with `lora generate`.
kw = dict(attention_mask=torch.ones_like(p), max_new_tokens=30, do_sample=False,
          eos_token_id=0, pad_token_id=0)
out = model.generate(p, **kw)[0][p.shape[1]:].tolist()
stopped = out[-1] == 0
theirs = tok.decode(out, skip_special_tokens=True).strip()
ours = subprocess.run(["cargo", "run", "-q", "--release", "-p", "lora-cli", "--", "generate", "--model", "demo/base",
                       "--adapter", "demo/adapter", "--prompt", prompt, "--max-new-tokens", "30"],
                      capture_output=True, text=True, check=True).stdout.strip()
print(f"adapted, stopping at EOS: {len(out)} new tokens, ended with EOS: {stopped}")
print("  transformers:", theirs)
print("  lora:        ", ours)
ok &= stopped and theirs == adapted and ours == prompt + " " + adapted
print("OK" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
