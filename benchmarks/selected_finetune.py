"""Can the source LoRA pick real text to learn from? Fine-tune the target on the general text its LoRA likes best.

CAST learns from the teacher's distribution on general and generated text; the retrained LoRA learns from real
task text's own next tokens. This asks whether the source LoRA can stand in for the task data as a *selector*: it
scores every paragraph of general/train (the first 128 source tokens of each, paragraphs of 16 tokens or more) by
how much the LoRA raises the source's log-likelihood per token, keeps the best paragraphs up to TOKENS source tokens,
and trains a LoRA on the target on them with the task LoRAs' recipe (plain next-token loss on real text, 150 steps
of 8 x 128, lr 2e-3, rank 8 on q, v). Control: paragraphs drawn at random, same length filter and budget. Prints
both validation gaps recovered (the last training document, as in levers.py) and the top paragraphs.
A diagnostic: no task data, no teacher, no heads.

  OMP_NUM_THREADS=1 python benchmarks/selected_finetune.py shakespeare neox llama runs/lev_nl 150000

Scores are kept in DIR/selected/, the texts and LoRAs in DIR/selected/ too.
"""

import json
import random
import sys

import torch
import torch.nn.functional as F
from peft import PeftModel

from castlora.bench import BenchConfig
from castlora.corpus import read_corpus
from castlora.models import load_model
from castlora.safe_io import write_text_atomic
from castlora.train_lora import train_lora
from lever_folder import lever_folder, validation_loss, with_adapter

lf = lever_folder(sys.argv[:5])
budget = int(sys.argv[5])
cfg = BenchConfig()
folder = lf.out / "selected"
folder.mkdir(parents=True, exist_ok=True)
paragraphs = [p for d in read_corpus([str(lf.shared / "data" / "general" / "train.txt.gz")]) for p in d.split("\n\n")]
enc = lf.tok_s(paragraphs, add_special_tokens=False)["input_ids"]
units = [(p, ids[:128]) for p, ids in zip(paragraphs, enc) if len(ids) >= 16]


@torch.no_grad()
def token_log_likelihood(model) -> torch.Tensor:
    """Mean log-likelihood per token of each unit (its first token unscored), batched by length."""
    out = torch.empty(len(units))
    order = sorted(range(len(units)), key=lambda i: len(units[i][1]))
    for k in range(0, len(order), 32):
        idx = order[k:k + 32]
        width = max(len(units[i][1]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, i in enumerate(idx):
            ids[b, :len(units[i][1])], mask[b, :len(units[i][1])] = torch.tensor(units[i][1]), 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                reduction="none").view(len(idx), -1)  # 2x faster than over a transposed view
        valid = mask[:, 1:].float()
        out[idx] = (logp * valid).sum(1) / valid.sum(1)
    return out


scores_file = folder / f"{lf.src}_{lf.task}_gain.json"
if not scores_file.exists():
    gain = token_log_likelihood(with_adapter(lf, lf.src)) - token_log_likelihood(load_model(str(lf.zoo / lf.src)))
    write_text_atomic(scores_file, json.dumps(gain.tolist()))
gain = torch.tensor(json.loads(scores_file.read_text()))


def take(order) -> list[str]:
    texts, total = [], 0
    for i in order:
        texts.append(units[i][0])
        total += len(units[i][1])
        if total >= budget:
            break
    return texts


best = take(gain.argsort(descending=True).tolist())
shuffled = list(range(len(units)))
random.Random(cfg.seed).shuffle(shuffled)
base = validation_loss(lf, load_model(str(lf.zoo / lf.tgt)))
retrained = validation_loss(lf, with_adapter(lf, lf.tgt))
print(f"{lf.task} {lf.src}->{lf.tgt}: {len(units):,} paragraphs of general/train scored by the {lf.src} LoRA's gain "
      f"(mean {gain.mean():.3f} nats/token, best kept {gain.sort(descending=True).values[len(best) - 1]:.3f}+); "
      f"validation base {base:.3f}, retrained {retrained:.3f}")
for name, texts in (("selected", best), ("random", take(shuffled))):
    data = folder / f"{lf.src}_{lf.task}_{name}_{budget}.jsonl"
    write_text_atomic(data, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    adapter = folder / f"{lf.src}_{lf.tgt}_{lf.task}_{name}_{budget}"
    train_lora(str(lf.zoo / lf.tgt), str(data), str(adapter), steps=cfg.lora_steps, rank=cfg.lora_rank,
               alpha=2 * cfg.lora_rank, targets=cfg.lora_targets, lr=cfg.lr, batch_size=8, seq_len=cfg.seq_len,
               seed=cfg.seed, overwrite=True, progress=False, log=lambda *a: None)
    tuned = validation_loss(lf, PeftModel.from_pretrained(load_model(str(lf.zoo / lf.tgt)), str(adapter)).eval())
    print(f"  {name}: {len(texts):,} paragraphs, fine-tuned validation loss {tuned:.3f}, "
          f"gap recovered {(base - tuned) / (base - retrained):.3f}")
print("the five paragraphs the LoRA likes best:")
for i in gain.argsort(descending=True)[:5].tolist():
    print(f"  {gain[i]:.2f}: {units[i][0][:160]!r}")
