"""How far the training run moves an exact-match task's LoRA: each recipe trained with several seeds on each
zoo model, scored on VALIDATION prompts (another task seed, every train and test prompt excluded, as in
levers.py), never the test split. Prints one row per (recipe, model): exact match per seed, its mean and
range, and the completion loss.

  OMP_NUM_THREADS=1 python benchmarks/lora_recipe.py greet runs/recipe_greet llama,mistral,neox 0,1,2 \
      'constant:schedule=constant' 'linear:schedule=linear' 'cosine:schedule=cosine'

A recipe is NAME:key=value,... over train_lora's arguments (lr, steps, schedule, rank, targets=q+k+v+o);
unset ones take the bench's exact-match recipe (BenchConfig.lora_recipe("exact")). Adapters go to
OUT/loras and are reused when present.
"""

import json
import statistics
import sys
import time
from pathlib import Path

from peft import PeftModel

from castlora.bench import BenchConfig
from castlora.demo import shared_dir
from castlora.evaluate import completion_loss, exact_match
from castlora.models import load_model, load_tokenizer
from castlora.safe_io import write_text_atomic
from castlora.train_lora import train_lora

from lever_folder import exact_split

task, out, models, seeds = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(","), [int(s) for s in sys.argv[4].split(",")]
recipes = sys.argv[5:] or ["bench:"]  # "bench:": the bench's recipe as it stands
shared, cfg = shared_dir(None), BenchConfig()
train, val_ex = exact_split(task, out, shared)  # the bench's training split; validation prompts of another seed


def recipe(spec: str) -> tuple[str, dict]:
    name, _, opts = spec.partition(":")
    kw = {k: v for k, v in cfg.lora_recipe("exact").items() if k not in ("seed", "alpha")}
    for item in filter(None, opts.split(",")):
        k, _, v = item.partition("=")
        if k not in kw:
            raise SystemExit(f"unknown recipe key {k!r} in {spec!r}; use {', '.join(kw)}")
        kw[k] = v.split("+") if k == "targets" else type(kw[k])(v)
    return name, kw


print(f"{task}: {len(val_ex)} validation prompts; seeds {seeds}", flush=True)
print("| recipe | model | exact match per seed | mean | min-max | completion loss mean | train s per LoRA |")
print("|---|---|---|---:|---:|---:|---:|")
rows = []
for spec in recipes:
    name, kw = recipe(spec)
    for model in models:
        zoo = str(shared / "zoo" / model)
        tok, accs, losses, secs = load_tokenizer(zoo), [], [], []
        for seed in seeds:
            path = out / "loras" / f"{name}_{model}_s{seed}"
            if not (path / "adapter_model.safetensors").exists():
                t0 = time.perf_counter()
                train_lora(zoo, str(train.train), str(path), alpha=2 * kw["rank"], seed=seed, overwrite=True,
                           progress=False, log=lambda *a: None, **kw)
                secs.append(time.perf_counter() - t0)
            m = PeftModel.from_pretrained(load_model(zoo), str(path)).eval()
            accs.append(exact_match(m, tok, val_ex)["accuracy"])
            losses.append(completion_loss(m, tok, val_ex)["completion_loss"])
        rows.append({"recipe": name, "options": kw, "model": model, "seeds": seeds, "exact_match": accs,
                     "completion_loss": losses})
        print(f"| {name} | {model} | {' / '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(accs):.3f} | "
              f"{min(accs):.2f}-{max(accs):.2f} | {statistics.mean(losses):.3f} | "
              f"{statistics.mean(secs) if secs else float('nan'):.0f} |", flush=True)
write_text_atomic(out / "recipes.json", json.dumps(rows, indent=1))
