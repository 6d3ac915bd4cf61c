"""The obvious data-free competitor to CAST: sample text from source+LoRA, then train a fresh LoRA
on the target on that text (plain next-token loss, the retrained LoRA's recipe). No heads, no
teacher distributions: only the source's samples carry the LoRA's behaviour.

Scored on VALIDATION text as in levers.py (the last training document), beside the target base and
the retrained LoRA. The samples are prompted like CAST's generated text (the first 8 tokens of
general documents, top-k 50, temperature 1) and saved in DIR/synthetic/{src}_{task}.jsonl.

  OMP_NUM_THREADS=1 python benchmarks/synthetic_retrain.py shakespeare neox llama runs/lev_nl 1200

DIR is a levers.py folder (its LoRAs are reused: DIR/loras/{model}_{task}).
"""

import json
import sys
import time
from pathlib import Path

from peft import PeftModel

from castlora.bench import BenchConfig
from castlora.bench.tasks import get_task
from castlora.corpus import read_corpus, read_documents
from castlora.demo import shared_dir
from castlora.evaluate import text_loss
from castlora.generate import sample_texts
from castlora.models import load_model, load_tokenizer
from castlora.train_lora import train_lora

task, src, tgt, out, n = *sys.argv[1:5], int(sys.argv[5])
shared, cfg, out = shared_dir(None), BenchConfig(), Path(out)
zoo = shared / "zoo"
val_docs = read_documents(get_task(task, shared, out / "tasks").train)[-1:]


def val_loss(adapter: str | None) -> float:
    m = load_model(str(zoo / tgt))
    if adapter:
        m = PeftModel.from_pretrained(m, adapter).eval()
    return text_loss(m, load_tokenizer(str(zoo / tgt)), val_docs, seq_len=256, max_tokens=20000)["mean_loss"]


samples = out / "synthetic" / f"{src}_{task}_{n}.jsonl"
t0 = time.perf_counter()
if not samples.exists():
    source = PeftModel.from_pretrained(load_model(str(zoo / src)), str(out / "loras" / f"{src}_{task}")).eval()
    prompts = read_corpus([str(shared / "data" / "general" / "train.txt.gz")])
    texts = sample_texts(source, load_tokenizer(str(zoo / src)), prompts, n, max_new_tokens=cfg.seq_len,
                         seed=cfg.seed, progress=False)
    samples.parent.mkdir(parents=True, exist_ok=True)
    samples.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
t_gen = time.perf_counter() - t0
lora = out / "synthetic" / f"{src}_to_{tgt}_{task}_{n}"
train_lora(str(zoo / tgt), str(samples), str(lora), steps=cfg.lora_steps, rank=cfg.lora_rank, alpha=2 * cfg.lora_rank,
           targets=cfg.lora_targets, lr=cfg.lr, batch_size=8, seq_len=cfg.seq_len, seed=cfg.seed, overwrite=True,
           progress=False, log=lambda *a: None)
base, ret, syn = val_loss(None), val_loss(str(out / "loras" / f"{tgt}_{task}")), val_loss(str(lora))
print(f"| {task} {src}->{tgt} | {n} samples | base {base:.3f} | retrained {ret:.3f} | synthetic retrain {syn:.3f} "
      f"| gap {(base - syn) / (base - ret):.3f} | generation {t_gen:.0f} s, total {time.perf_counter() - t0:.0f} s |")
