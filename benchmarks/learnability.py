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
from castlora.bench.tasks import make_echo, make_greet
from castlora.demo import shared_dir
from castlora.evaluate import exact_match, load_examples
from castlora.models import load_model, load_tokenizer
from castlora.train_lora import train_lora

task, models = sys.argv[1], sys.argv[2:]
shared, cfg = shared_dir(None), BenchConfig()
make = {"echo": lambda d, seed: make_echo(d, shared, seed), "greet": make_greet}[task]
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    train = make(tmp / "train", 0)
    seen = {e["prompt"] for e in load_examples(train.train)}
    val = make(tmp / "val", 100)  # another seed: other words / names
    val_ex = [e for e in load_examples(val.test) + load_examples(val.train) if e["prompt"] not in seen][:60]
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
