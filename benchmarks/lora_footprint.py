"""How much does a LoRA change its own model on general text? Mean KL(model+LoRA || model) per
token on `general/valid` windows. A LoRA whose footprint on general text is large hands CAST a
training signal dominated by that collateral change rather than by its task behaviour.

  OMP_NUM_THREADS=1 python benchmarks/lora_footprint.py llama runs/m1/loras/llama_shakespeare runs/m7/loras/llama_greet
"""

import sys

import torch
import torch.nn.functional as F
from peft import PeftModel

from castlora.corpus import read_documents
from castlora.demo import shared_dir
from castlora.evaluate import text_windows
from castlora.models import load_model, load_tokenizer

model_name, adapters = sys.argv[1], sys.argv[2:]
shared = shared_dir(None)
zoo = str(shared / "zoo" / model_name)
tok = load_tokenizer(zoo)
windows = [w for w in text_windows(tok, read_documents(shared / "data" / "general" / "valid.txt.gz"), 128)
           if len(w) == 129][:128]
ids = torch.tensor(windows)
print(f"| LoRA ({model_name}) | KL(LoRA ‖ base) per token, general/valid, {ids.numel()} tokens |")
print("|---|---:|")
for adapter in adapters:
    model = PeftModel.from_pretrained(load_model(zoo), adapter).eval()
    total = 0.0
    with torch.no_grad():
        for batch in ids.split(16):
            lp = F.log_softmax(model(input_ids=batch).logits.float(), -1)
            with model.disable_adapter():
                lb = F.log_softmax(model(input_ids=batch).logits.float(), -1)
            total += float((lp.exp() * (lp - lb)).sum())
    print(f"| {adapter} | {total / ids.numel():.3f} |", flush=True)
