"""Can the zoo models learn an exact-match task? The bench's LoRA recipe for exact tasks, scored on
validation examples made with another seed (never the test split).

  python benchmarks/learnability.py echo llama mistral neox
  python benchmarks/learnability.py greet mistral
"""

import sys
import tempfile
from pathlib import Path

from peft import PeftModel

from castlora.bench import BenchConfig
from castlora.demo import shared_dir
from castlora.evaluate import exact_match
from castlora.models import load_model, load_tokenizer
from castlora.train_lora import train_lora
from lever_folder import exact_split

task, models = sys.argv[1], sys.argv[2:]
shared, cfg = shared_dir(None), BenchConfig()
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    # the split levers.py and lora_recipe.py score on (since session 27: the test prompts of seed 0 are left
    # out too, not only the training ones; sessions 1-3 scored on a split that could hold a test prompt)
    train, val_ex = exact_split(task, tmp, shared)
    recipe = cfg.lora_recipe("exact")
    print(f"| model | {task} LoRA | base |  ({len(val_ex)} validation examples; recipe: {recipe})")
    for name in models:
        zoo = str(shared / "zoo" / name)
        out = tmp / f"lora_{name}"
        train_lora(zoo, str(train.train), str(out), **recipe, overwrite=True, progress=False, log=lambda *a: None)
        tok = load_tokenizer(zoo)
        acc = exact_match(PeftModel.from_pretrained(load_model(zoo), str(out)).eval(), tok, val_ex)["accuracy"]
        base = exact_match(load_model(zoo), tok, val_ex)["accuracy"]
        print(f"| {name} | {acc:.2f} | {base:.2f} |", flush=True)
