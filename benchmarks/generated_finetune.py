"""How much of a LoRA does the generated text carry on its own? Fine-tune the target on it.

CAST's stream is one third text sampled from the source with its LoRA. This samples N texts the
same way (the first 8 tokens of a shuffled general document as the prompt, top-k 50, 128 new
tokens), from the source with its LoRA (`lora`) or without it (`base`, the control), trains a LoRA
on the target on them with the task LoRAs' own recipe (plain next-token loss, 150 steps of 8 x 128,
lr 2e-3, rank 8 on q, v), and prints its validation gap recovered (the last training document, as
in levers.py). A diagnostic: a baseline that distils by data alone, with no teacher and no heads.

  OMP_NUM_THREADS=1 python benchmarks/generated_finetune.py shakespeare neox llama runs/lev_nl lora 1200
  OMP_NUM_THREADS=1 python benchmarks/generated_finetune.py shakespeare neox llama runs/lev_nl base 1200

The texts are kept in DIR/generated/, the LoRAs in DIR/generated_finetune/.
"""

import json
import random
import sys

from peft import PeftModel

from castlora.bench import BenchConfig
from castlora.corpus import read_corpus
from castlora.generate import sample_texts
from castlora.models import load_model
from castlora.safe_io import write_text_atomic
from castlora.train_lora import train_lora
from lever_folder import lever_folder, validation_loss, with_adapter

lf = lever_folder(sys.argv[:5])
which, n = sys.argv[5], int(sys.argv[6])
if which not in ("lora", "base"):
    raise SystemExit("the fifth argument is lora (sample the source with its LoRA) or base (without)")
cfg = BenchConfig()
texts_file = lf.out / "generated" / f"{lf.src}_{lf.task}_{which}_{n}.jsonl"
if not texts_file.exists():
    source = with_adapter(lf, lf.src) if which == "lora" else load_model(str(lf.zoo / lf.src))
    prompts = read_corpus([str(lf.shared / "data" / "general" / "train.txt.gz")])
    random.Random(cfg.seed).shuffle(prompts)
    texts = sample_texts(source, lf.tok_s, prompts, n, max_new_tokens=128, seed=cfg.seed, progress=False)
    texts_file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(texts_file, "".join(json.dumps({"text": t}) + "\n" for t in texts))
adapter = lf.out / "generated_finetune" / f"{lf.src}_{lf.tgt}_{lf.task}_{which}_{n}"
train_lora(str(lf.zoo / lf.tgt), str(texts_file), str(adapter), steps=cfg.lora_steps, rank=cfg.lora_rank,
           alpha=2 * cfg.lora_rank, targets=cfg.lora_targets, lr=cfg.lr, batch_size=8, seq_len=cfg.seq_len,
           seed=cfg.seed, overwrite=True, progress=False, log=lambda *a: None)
base = validation_loss(lf, load_model(str(lf.zoo / lf.tgt)))
retrained = validation_loss(lf, with_adapter(lf, lf.tgt))
tuned = validation_loss(lf, PeftModel.from_pretrained(load_model(str(lf.zoo / lf.tgt)), str(adapter)).eval())
print(f"{lf.task} {lf.src}->{lf.tgt}, {n} texts sampled from the source {'with' if which == 'lora' else 'without'} "
      f"its LoRA: validation base {base:.3f}, retrained {retrained:.3f}, fine-tuned on them {tuned:.3f}, "
      f"gap recovered {(base - tuned) / (base - retrained):.3f}")
