"""Train an ordinary LoRA (thin over transformers + peft): the source adapters to port and the
retrained reference on the target. Text files -> language modelling on seq_len windows;
prompt/completion jsonl -> loss on the completion tokens only."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .corpus import read_documents
from .evaluate import completion_example, is_examples_file, load_examples, text_windows
from .families import model_sites
from .models import load_model, load_tokenizer
from .safe_io import atomic_folder


# how prompt/completion examples are tokenized (evaluate.completion_example): "joint" (the whole text at once), the
# completion as part of the whole text; LoRAs recorded without this key had theirs tokenized apart
COMPLETION_TOKENS = "joint"


def _lm_examples(tok, data: list[str], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, label ids) pairs; labels -100 where no loss is taken."""
    examples = []
    for path in data:
        if is_examples_file(path):
            for e in load_examples(path):
                ids, labels = completion_example(tok, e)
                examples.append((ids[:seq_len], labels[:seq_len]))
        else:
            for w in text_windows(tok, read_documents(path), seq_len - 1):
                examples.append((w, list(w)))
    return examples


def _collate(batch, pad: int):
    width = max(len(i) for i, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (i, l) in enumerate(batch):
        ids[b, :len(i)], labels[b, :len(l)], mask[b, :len(i)] = torch.tensor(i), torch.tensor(l), 1
    return ids, mask, labels


SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, step: int, steps: int, warmup: int = 10) -> float:
    """The lr multiplier at `step` (0-based): a short linear warmup (these runs are a few hundred steps),
    then constant, or a decay from 1 toward 0 that the step after the last would reach. A decay makes the
    final iterate, the one saved, less a matter of where the last few noisy updates happened to land."""
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, steps - warmup)  # 0 at the first step after warmup, < 1 at the last
    if schedule == "linear":
        return 1.0 - done
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    return 1.0


def train_lora(model: str, data: list[str] | str, out: str, steps: int = 200, rank: int = 8, alpha: float = 16.0,
               targets: list[str] | None = None, lr: float = 1e-3, batch_size: int = 8, seq_len: int = 256,
               seed: int = 0, device: str = "cpu", dtype: str = "float32", overwrite: bool = False,
               schedule: str = "constant", progress: bool = True, log=print) -> dict:
    """Train a LoRA on `model` with `data`; `targets` are canonical roles (q, k, v, o, gate, up, down)
    or module names. `schedule` is the lr after a 10-step warmup: "constant", or "linear" / "cosine"
    decay toward zero at the last step. Writes a PEFT adapter folder to `out` and returns a summary."""
    from peft import LoraConfig, get_peft_model

    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")

    data = [data] if isinstance(data, str) else list(data)
    torch.manual_seed(seed)
    tok = load_tokenizer(model)
    base = load_model(model, dtype, device)
    sites = model_sites(base)
    targets = targets or ["q", "v"]
    # Canonical roles resolve through the family spec (fused modules appear once).
    modules = sorted({sites.site(i, r).path for i in range(sites.num_layers) for r in targets if (i, r) in sites.sites}
                     | {t for t in targets if t not in ("q", "k", "v", "o", "gate", "up", "down")})
    if not modules:
        raise ValueError(f"none of {targets} exists in this {sites.family.name} model (roles: {sites.roles})")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=modules,
                        fan_in_fan_out=sites.family.transposed, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    examples = _lm_examples(tok, data, seq_len)
    if not examples:
        raise ValueError(f"no training examples in {data}")
    rng = random.Random(seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    peft_model.train()
    losses, t0 = [], time.perf_counter()
    order: list[int] = []
    for step in tqdm(range(steps), disable=not progress, desc="train-lora", dynamic_ncols=True):
        if len(order) < batch_size:
            extra = list(range(len(examples)))
            rng.shuffle(extra)
            order += extra
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        ids, mask, labels = (t.to(device) for t in _collate(batch, pad))
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(schedule, step, steps)
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    peft_model.eval()
    summary = {"model": model, "data": data, "steps": steps, "rank": rank, "alpha": alpha, "modules": modules,
               "lr": lr, "schedule": schedule, "batch_size": batch_size, "seq_len": seq_len, "seed": seed,
               "completion_tokens": COMPLETION_TOKENS,
               "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])), "seconds": round(time.perf_counter() - t0, 1)}
    with atomic_folder(out, overwrite) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        (Path(tmp) / "train_lora.json").write_text(json.dumps({**summary, "losses": losses}, indent=1))
    log(f"trained LoRA ({len(modules)} modules, rank {rank}) for {steps} steps: loss {summary['final_loss']:.4f}; "
        f"wrote {out}")
    return summary
