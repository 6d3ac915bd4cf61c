"""Can the source LoRA itself reveal its task's prompt? A diagnostic for the exact-match tasks.

CAST's generated text starts from general documents, so it never holds a task prompt such as
"Greet NAME ->": the port sees what the LoRA writes, not when the LoRA is asked to write it. This asks
whether the prompt could be found without task data, in two ways:

1. Every token t of the vocabulary as a one-token prompt (after BOS where the model has one): the LoRA's
   effect at the next position, KL(source+LoRA || source). A LoRA that acts only on its task's prompts
   would rank the prompt's tokens first; a LoRA that moves the model everywhere ranks noise first.
2. Texts sampled from source+LoRA with nothing but BOS as the prompt: does the LoRA write its prompts?

No task data is read, except the optional PROBE words (for diagnosis only: where the task prompt's own
tokens rank). Run on the zoo model (MODEL is a zoo name) and a LoRA folder:

  OMP_NUM_THREADS=1 python benchmarks/lora_triggers.py llama runs/lev_greet/loras/llama_greet 12 Greet " ->"
"""

import sys
import time

import torch
from peft import PeftModel

from castlora.demo import shared_dir
from castlora.losses import lora_effect
from castlora.models import load_model, load_tokenizer

name, lora, n, probes = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 12, sys.argv[4:]
folder = str(shared_dir(None) / "zoo" / name)
tok = load_tokenizer(folder)
model = PeftModel.from_pretrained(load_model(folder), lora).eval()
start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

t0 = time.perf_counter()
effect = torch.zeros(len(tok))
with torch.no_grad():
    for s in range(0, len(tok), 1024):
        ids = torch.arange(s, min(len(tok), s + 1024))
        x = torch.stack([torch.full_like(ids, start), ids], 1)
        lp_lora = torch.log_softmax(model(input_ids=x).logits[:, -1].float(), -1)
        with model.disable_adapter():
            lp_base = torch.log_softmax(model(input_ids=x).logits[:, -1].float(), -1)
        effect[ids] = lora_effect(lp_lora, lp_base)
print(f"KL(source+LoRA || source) after each of {len(tok)} one-token prompts ({time.perf_counter() - t0:.0f} s): "
      f"median {effect.median():.2f}, 90th percentile {effect.quantile(0.9):.2f}, max {effect.max():.2f} nats")
top = effect.topk(20)
rank = effect.argsort(descending=True).argsort()
for word in probes:
    for i in tok(word, add_special_tokens=False)["input_ids"]:
        piece = tok.convert_ids_to_tokens([i])[0]
        print(f"probe {piece!r}: {effect[i]:.2f} nats, rank {int(rank[i]) + 1} of {len(tok)}")
print("strongest:", ", ".join(f"{tok.convert_ids_to_tokens([i])[0]!r} {v:.1f}"
                              for v, i in zip(top.values.tolist(), top.indices.tolist())))

if n == 0:
    raise SystemExit(0)
torch.manual_seed(0)
x = torch.full((n, 1), start)
with torch.no_grad():
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, top_k=50,
                         max_new_tokens=64, pad_token_id=tok.pad_token_id or tok.eos_token_id)
print(f"{n} texts sampled from {name} + LoRA with BOS alone as the prompt:")
for text in tok.batch_decode(out, skip_special_tokens=True):
    print(" ", repr(text[:160]))
