"""The --layer-map cka map and its CKA matrix for zoo llama -> TARGET: CAST-0 (no training) with a random
rank-8 LoRA on q and v, calibration batches from general/valid. Prints one JSON line, so two releases can be
compared.

  python benchmarks/cka_map.py mistral [SHARED]
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import castlora
from castlora.shared import shared_dir
from castlora.models import load_model

target = sys.argv[1]
shared = shared_dir(sys.argv[2] if len(sys.argv) > 2 else None)
torch.manual_seed(0)
with tempfile.TemporaryDirectory(prefix="castlora-cka-") as tmp:
    tmp = Path(tmp)
    source = get_peft_model(load_model(str(shared / "zoo" / "llama"), torch.float32, "cpu"),
                            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    source.save_pretrained(str(tmp / "lora"))
    res = castlora.translate(source=str(shared / "zoo" / "llama"), adapter=str(tmp / "lora"),
                             target=str(shared / "zoo" / target),
                             corpus=[str(shared / "data" / "general" / "valid.txt.gz")], out=str(tmp / "out"), steps=0,
                             layer_map="cka", progress=False, log=lambda *a, **k: None)
print(json.dumps({"layer_map": res.record["layer_map"], "cka": res.record["cka"]}))
