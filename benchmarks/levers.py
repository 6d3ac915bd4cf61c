"""CAST levers scored on VALIDATION data, never the test split. Ports one source LoRA to one
target with several CAST variants and prints each one's validation score and KL.

- Exact-match tasks (greet, echo): 60 prompts made with another seed, excluding every train and
  test prompt; exact match and the completion loss (and its gap recovered). 100 steps.
- LM tasks (shakespeare, kjv): test loss on 20,000 tokens of the *last training document* (the test
  split is other works). The LoRAs saw ~10% of the training windows, so some of it was seen; it
  ranks variants, and their absolute gap is not the test's. 150 steps.

  OMP_NUM_THREADS=1 python benchmarks/levers.py greet llama mistral runs/lev_greet \
      'delta:teacher=delta' 'lr1e-2:lr=0.01'

A variant is NAME:key=value,key=value (TranslateConfig fields); 8 x 128 batches and at most 400
generated texts at --mix 1/3, the stream of sessions 1-13, so that every command in docs/results.md
reproduces; `generate=-1,mix=1` is the default since session 14 (every training text generated). LoRAs are trained with the bench's recipe unless DIR/loras holds them.

`corpus=task` trains the heads on the task's own training text (the validation document left out) instead of general text: a diagnostic
that CAST may not use (it sees no task data), which says how much of what a port misses is the corpus.
`corpus=prompts` (exact-match tasks) trains on the training split's prompts alone, without their answers: with
`generate=-1,mix=1,prompt_tokens=32` the source with its LoRA writes each answer itself. Also a diagnostic
(unlabelled prompts of the task are task data): does the port carry the skill once its text holds the prompt?
`prompts=train` (exact-match tasks) is the same through `castlora translate --prompts`: the general corpus stays
(calibration, strength, and the texts beyond --mix), and every generated text starts from a whole training prompt.
`corpus=PATH` trains on that file instead of general/train (e.g. text from benchmarks/port_samples.py).
"""

import json
import math
import sys
import time
from pathlib import Path

from peft import PeftModel

from castlora.bench import BenchConfig
from castlora.bench.tasks import get_task, train_prompts
from castlora.corpus import read_documents
from castlora.demo import shared_dir
from castlora.evaluate import completion_loss, exact_match, text_loss
from castlora.models import load_model, load_tokenizer
from castlora.safe_io import write_text_atomic
from castlora.train_lora import train_lora
from castlora.translate import translate

from lever_folder import exact_split, variant


task, src, tgt, out = sys.argv[1:5]
variants = sys.argv[5:]
shared, cfg = shared_dir(None), BenchConfig()
out = Path(out)
exact = task in ("greet", "echo")
steps = 100 if exact else cfg.cast_steps
if exact:
    train, val_ex = exact_split(task, out, shared)  # the bench's training split; validation prompts of another seed
else:
    train = get_task(task, shared, out / "tasks")
    val_docs = read_documents(train.train)[-1:]


def lora(model: str) -> str:
    path = out / "loras" / f"{model}_{task}"
    if not (path / "adapter_model.safetensors").exists():
        train_lora(str(shared / "zoo" / model), str(train.train), str(path), **cfg.lora_recipe(train.kind),
                   overwrite=True, progress=False, log=lambda *a: None)
    return str(path)


def acc(model: str, adapter: str | None) -> tuple[float, float]:
    """Exact tasks: (exact-match accuracy, completion loss); LM tasks: (nan, validation text loss)."""
    m = load_model(str(shared / "zoo" / model))
    if adapter:
        m = PeftModel.from_pretrained(m, adapter).eval()
    tok = load_tokenizer(str(shared / "zoo" / model))
    if not exact:
        return float("nan"), text_loss(m, tok, val_docs, seq_len=256, max_tokens=20000)["mean_loss"]
    return exact_match(m, tok, val_ex)["accuracy"], completion_loss(m, tok, val_ex)["completion_loss"]


src_lora = lora(src)
(base_acc, base_cl), (ret_acc, ret_cl) = acc(tgt, None), acc(tgt, lora(tgt))
print(f"{task} {src}->{tgt}; source+LoRA {acc(src, src_lora)[0 if exact else 1]:.3f}, "
      f"target base {base_acc:.3f} (loss {base_cl:.3f}), retrained {ret_acc:.3f} ({ret_cl:.3f})",
      flush=True)
print("| variant | options | val acc | val loss (ratio, gap recovered) | KL first -> last | run s |")
for v in variants:
    name, opts = variant(v, steps)
    corpus = opts.pop("corpus", "") or str(shared / "data" / "general" / "train.txt.gz")
    if corpus == "task":  # every training document but the validation one
        corpus = str(out / "tasks" / "train_but_validation.jsonl")
        Path(corpus).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(corpus, "".join(json.dumps({"text": d}) + "\n" for d in read_documents(train.train)[:-1]))
    if corpus == "prompts":  # the training split's prompts alone, without their answers (exact-match tasks)
        corpus = str(train_prompts(train, out / "tasks"))
    if opts.get("prompts") == "train":  # the same prompts through `translate --prompts`
        opts["prompts"] = [str(train_prompts(train, out / "tasks"))]
    t0 = time.perf_counter()
    res = translate(source=str(shared / "zoo" / src), adapter=src_lora, target=str(shared / "zoo" / tgt),
                    corpus=[corpus], out=str(out / "ports" / name),
                    overwrite=True, progress=False, log=lambda *a: None, **opts)
    curve = res.record["loss_curve"]
    kl = f"{curve[0]['kl']:.2f} -> {curve[-1]['kl']:.2f}" if curve else "-"
    a, cl = acc(tgt, str(out / "ports" / name))
    # LM tasks: ratio = ppl_retrained / ppl_port; exact tasks: the exact-match ratio (accuracy / retrained's)
    ratio = (a / ret_acc if ret_acc else float("nan")) if exact else math.exp(ret_cl - cl)
    gap = (base_cl - cl) / (base_cl - ret_cl)
    print(f"| {name} | {json.dumps(opts)} | {a:.3f} | {cl:.3f} ({ratio:.3f}, {gap:.3f}) | {kl} | "
          f"{time.perf_counter() - t0:.0f} |", flush=True)
