"""CAST's training text: chunks of general text, and text sampled from the source with its LoRA.

General text alone rarely shows what a LoRA does; text the source writes with its LoRA does, and needs no
task data. By default every training text is generated, each from the first few tokens of a general
document (with --prompts, from a whole task prompt). The first `calib_batches` batches are general text
held out of training: the closed-form fit, the start's scale and the end check are judged there.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from .corpus import make_chunks
from .errors import CorpusError
from .generate import sample_texts
from .safe_io import write_text_atomic
from .teacher_cache import text_digest

PROMPT_TOKENS = 8  # tokens of a general document that start a generated text; the source writes the rest


@dataclass
class TrainingText:
    calib: list[str]  # held out of training (general text)
    train: list[str]  # the training stream, in order
    held: list[str] | None  # with --prompts: samples from the prompts held out of training (else the calibration)
    info: dict = field(default_factory=dict)  # for castlora.json


def training_texts(cfg, docs: list[str], source, tok_s, adapter_digest: str, task_prompts: list[str], log
                   ) -> TrainingText:
    """`cfg` is resolved: cfg.generate texts are sampled, the rest of the max(steps, 1) x batch_size
    training texts are general chunks."""
    n_needed = max(cfg.steps, 1) * cfg.batch_size
    n_calib = cfg.calib_batches * cfg.batch_size
    n_gen = cfg.generate
    info = {}
    general = make_chunks(docs, tok_s, cfg.seq_len, n_needed - n_gen + n_calib, seed=cfg.seed)
    if not general:
        raise CorpusError("the corpus yields no text chunk of at least 16 tokens")
    n_general = max(0, len(general) - n_calib)
    general_needed = n_needed - n_gen
    if cfg.steps > 0 and general_needed > 0 and n_general * cfg.max_epochs < general_needed:
        raise CorpusError(
            f"the corpus is too short for {cfg.steps} steps of batch {cfg.batch_size}: it yields {n_general} "
            f"training chunks of up to {cfg.seq_len} source tokens ({n_calib} more go to calibration), and the "
            f"{general_needed} general texts of the training stream would repeat it "
            f"{general_needed / max(1, n_general):.1f} times, more than --max-epochs {cfg.max_epochs:g}. It needs "
            f"at least {math.ceil(general_needed / cfg.max_epochs)} chunks: add text to --corpus, lower --steps or "
            "--batch-size, or raise --max-epochs.")
    if not n_gen:
        texts = general
        calib = texts[:min(len(texts), n_calib)]
        return TrainingText(calib, texts[len(calib):] or texts, None, info)

    # With --prompts the training text is the task's: the start and end are judged on fresh samples from the
    # same prompts, held out of training (general calibration text says little about a task's prompts)
    n_held = n_calib if task_prompts else 0
    t0 = time.perf_counter()
    gen = _sampled(cfg, docs, source, tok_s, adapter_digest, task_prompts, n_gen + n_held)
    held = None
    if n_held:
        gen, held = gen[:-n_held], gen[-n_held:]
    if task_prompts:  # the record and the log say plainly that this port saw task data
        info["task_prompts"] = len(task_prompts)
        log(f"trained on text sampled from {len(task_prompts)} task prompts (--prompts): this port is not data-free")
    info.update({"generated_texts": len(gen), "generated_chars": sum(map(len, gen)),
                 "generate_batch_size": cfg.generate_batch_size, **({"held_out_generated": n_held} if n_held else {}),
                 "generation_seconds": round(time.perf_counter() - t0, 1)})
    log(f"generated {len(gen)} texts ({info['generated_chars']} chars) in {info['generation_seconds']} s"
        + (f", and {n_held} more held out" if n_held else ""))
    stream = [gen[i % len(gen)] for i in range(n_gen)] + general[:general_needed]
    random.Random(cfg.seed).shuffle(stream)
    # the held-out calibration text first; a corpus too short to fill it lends it the stream's first texts
    texts = general[general_needed:general_needed + n_calib] + stream
    calib = texts[:min(len(texts), n_calib)]
    return TrainingText(calib, texts[len(calib):] or texts, held, info)


def _sampled(cfg, docs, source, tok_s, adapter_digest: str, task_prompts: list[str], n: int) -> list[str]:
    """`n` texts sampled from source+LoRA, read from the teacher cache's generated.json when it holds these."""
    saved = Path(cfg.teacher_cache) / "generated.json" if cfg.teacher_cache else None
    key = {"source": str(cfg.source), "adapter": adapter_digest, "n": n, "seq_len": cfg.seq_len, "top_k": cfg.top_k,
           "seed": cfg.seed, "prompts": text_digest(list(task_prompts) or docs),
           **({"task_prompts": True} if task_prompts else {}),
           **({"generate_batch_size": cfg.generate_batch_size} if cfg.generate_batch_size != 16 else {})}
    if saved and saved.exists():
        try:
            rec = json.loads(saved.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None  # a torn or foreign file: sample again and replace it
        if isinstance(rec, dict) and rec.get("key") == key and isinstance(rec.get("texts"), list) \
                and all(isinstance(t, str) for t in rec["texts"]):
            return rec["texts"]
    prompts, prompt_tokens = (list(task_prompts), cfg.seq_len) if task_prompts else (docs, PROMPT_TOKENS)
    gen = sample_texts(source, tok_s, prompts, n, max_new_tokens=cfg.seq_len, top_k=cfg.top_k,
                       prompt_tokens=prompt_tokens, batch_size=cfg.generate_batch_size, seed=cfg.seed,
                       progress=cfg.progress)
    if saved:
        saved.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(saved, json.dumps({"key": key, "texts": gen}))
    return gen
