"""`--transfer labels`: with the task's prompts, the plainest port. The source with its LoRA answers every
prompt (greedy), and an ordinary LoRA of the source LoRA's shape (rank, alpha, roles) is trained on the target
with those answers as the completions (sequence-level distillation). No heads, no alignment, no shared
vocabulary: the target learns the behaviour in its own tokens. Not data-free (it needs --prompts).

It beat CAST with the same prompts on every exact-match cell measured (docs/results.md): the answer a
prompt gets, written out, carries a copy of the name in the target's own tokenization, which CAST's KL
sees only where both tokenizers put a boundary."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..adapters import load_adapter
from ..errors import CastloraError
from ..families import model_sites
from ..generate import greedy_answers
from ..models import load_model, load_tokenizer
from ..train_lora import train_lora
from .base import Port, PortInputs, register_transfer


@register_transfer("labels")
def port_by_labels(inp: PortInputs) -> Port:
    """Answer the task's prompts with the source and its LoRA, and train the target's LoRA on the answers.
    Writes the PEFT adapter and labels.jsonl (the answers)."""
    from peft import PeftModel

    cfg, log, prompts = inp.cfg, inp.log, inp.prompts
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    log(f"loading {cfg.source} with its LoRA")
    source = load_model(cfg.source, cfg.dtype, cfg.device, allow_pickle=cfg.allow_pickle,
                        trust_remote_code=cfg.trust_remote_code)
    lora = load_adapter(inp.adapter.folder, model_sites(source), cfg.allow_pickle,
                        files=(inp.adapter.config, inp.adapter.tensors))
    source = PeftModel.from_pretrained(source, str(inp.adapter.folder), is_trainable=False).eval()
    tok = load_tokenizer(cfg.source, cfg.trust_remote_code)
    # The target's LoRA has the source LoRA's shape: its rank, its alpha per rank, its roles
    rank = max(k.rank for k in lora.kernels)
    alpha = float(lora.config.get("lora_alpha", rank))
    roles = sorted({k.role for k in lora.kernels})
    # Each distinct prompt once: a greedy answer repeats with its prompt, and a prompt the file holds many times
    # (an empty one, say) would otherwise fill the training set with one answer
    distinct = list(dict.fromkeys(prompts))
    answers = greedy_answers(source, tok, distinct, max_new_tokens=cfg.seq_len, progress=cfg.progress)
    del source
    t_answers = time.perf_counter() - t0
    empty = sum(not a.strip() for a in answers)
    log(f"the source answered {len(distinct)} distinct task prompts in {t_answers:.1f} s ({empty} empty answers, "
        "left out); this port is not data-free")
    rows = [{"prompt": p, "completion": a} for p, a in zip(distinct, answers) if a.strip()]
    if not rows:
        raise CastloraError("the source with its LoRA gave an empty answer to every prompt of --prompts: nothing "
                            "to train the target on (check that the prompts are the task's and the LoRA the source's)")
    labels = "".join(json.dumps(r) + "\n" for r in rows)
    work = Path(tempfile.mkdtemp(prefix="castlora-labels-"))
    try:
        data = work / "labels.jsonl"
        data.write_text(labels, encoding="utf-8")
        summary = train_lora(cfg.target, str(data), str(work / "lora"), steps=cfg.steps, rank=rank, alpha=alpha,
                             targets=roles, lr=cfg.lr, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                             device=cfg.device, dtype=cfg.dtype, overwrite=True, schedule="linear",
                             progress=cfg.progress, log=log)
        trained = {f.name: f.read_bytes() for f in (work / "lora").iterdir() if f.is_file()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {
        "task_prompts": len(prompts),
        "labels": {"distinct_prompts": len(distinct), "answered": len(rows), "empty": empty,
                   "seconds": round(t_answers, 1),
                   "mean_chars": round(sum(len(r["completion"]) for r in rows) / len(rows), 1)},
        "lora": {k: summary[k] for k in ("rank", "alpha", "modules", "steps", "lr", "schedule", "final_loss",
                                          "seconds")},
        "train_seconds": summary["seconds"],
    }

    def write(folder: Path) -> None:
        for name, content in trained.items():
            (folder / name).write_bytes(content)
        (folder / "labels.jsonl").write_text(labels, encoding="utf-8")

    return Port(record, write, ["adapter_model.safetensors", "labels.jsonl", "castlora.json"])
