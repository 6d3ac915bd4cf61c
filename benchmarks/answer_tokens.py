"""How a model with an adapter answers exact-match prompts, token by token: a diagnostic for ports that score 0.

For the first N validation prompts of TASK (lever_folder.exact_split: another seed, every train and test prompt
of seed 0 left out), prints each completion token as the bench scores it (evaluate.completion_example) with the
probability the model gives it, the model's own top token where that differs, and the greedy answer.

  OMP_NUM_THREADS=1 python benchmarks/answer_tokens.py greet mistral runs/s27j_greet_a/ports/llama_to_mistral_greet_cast_auto_gen_zd
"""

import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from castlora.demo import shared_dir
from castlora.evaluate import completion_example
from castlora.models import load_model, load_tokenizer
from lever_folder import exact_split

task, model_name, adapter = sys.argv[1:4]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 3
shared = shared_dir(None)
with tempfile.TemporaryDirectory() as tmp:
    _, val = exact_split(task, Path(tmp), shared)
folder = str(shared / "zoo" / model_name)
tok = load_tokenizer(folder)
model = PeftModel.from_pretrained(load_model(folder), adapter).eval()
pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
for e in val[:n]:
    ids, labels = completion_example(tok, e)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    row = []
    for i in range(1, len(ids)):
        if labels[i] != -100:
            top = int(logp[i - 1].argmax())
            row.append(f"{tok.convert_ids_to_tokens(ids[i])}:{float(logp[i - 1, ids[i]].exp()):.2f}"
                       + ("" if top == ids[i] else f"[{tok.convert_ids_to_tokens(top)}]"))
    print(f"{e['prompt']!r}  " + " ".join(row))
    enc = tok(e["prompt"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=pad)
    print("   greedy:", tok.convert_ids_to_tokens(out[0, enc["input_ids"].shape[1]:]))
