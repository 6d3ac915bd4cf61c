"""A behaviour-revealing corpus without task data: text sampled from the source model *with its
LoRA*, prompted by the first tokens of general documents. On such text the LoRA's effect is
everywhere, so the heads see far more of what they must carry than on general text."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from .losses import lora_effect


@contextmanager
def lora_scaled(model, factor: float):
    """Every LoRA layer of the peft `model` at `factor` times its scale while the block runs (the
    scales are restored however it ends). 1 changes nothing."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    saved = [dict(m.scaling) for m in layers]
    try:
        if factor != 1:
            for m in layers:
                m.scaling = {k: v * factor for k, v in m.scaling.items()}
        yield model
    finally:
        for m, old in zip(layers, saved):
            m.scaling = old


@torch.no_grad()
def sample_texts(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int = 256,
                 prompt_tokens: int = 8, top_k: int = 50, temperature: float = 1.0,
                 batch_size: int = 16, seed: int = 0, progress: bool = True) -> list[str]:
    """`n` texts (prompt + continuation) sampled with top-k from `model`, batched, left-padded."""
    if not prompts:
        raise ValueError("no prompts to generate from")
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    gen = torch.Generator(device="cpu").manual_seed(seed)
    texts: list[str] = []
    try:
        bar = tqdm(total=n, disable=not progress, desc="generate", dynamic_ncols=True)
        for start in range(0, n, batch_size):
            heads = []
            for i in range(start, min(n, start + batch_size)):
                ids = tokenizer(prompts[i % len(prompts)], add_special_tokens=False)["input_ids"][:prompt_tokens]
                heads.append(tokenizer.decode(ids))
            enc = tokenizer(heads, return_tensors="pt", padding=True).to(device)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            out = model.generate(**enc, do_sample=True, top_k=top_k, temperature=temperature,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            texts.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
            bar.update(len(heads))
        bar.close()
    finally:
        tokenizer.padding_side = old_side
    return [t for t in texts if t.strip()]


@torch.no_grad()
def lora_effect_prompts(model, tokenizer, texts: list[str], n: int, window: int = 64, skip: int = 4,
                        batch_size: int = 16, progress: bool = True) -> tuple[list[str], list[float]]:
    """The `n` prompts of `texts` (windows of general text) where the LoRA moves the source the most.

    A LoRA trained on one kind of prompt ("Greet NAME ->") barely acts on text that never looks like
    it, and continuations of ordinary document starts rarely do. So each window is scored by its
    largest per-position KL(source+LoRA || source) (past its first `skip` tokens, where there is
    too little context to mean anything), and a prompt is its window cut right after that position:
    sampling then continues exactly where the LoRA acts. No task data: the windows are general text.
    Measured on the zoo LoRAs, the strongest positions are line ends and format breaks, not the
    task's prompts, and ports trained on the samples scored lower (docs/results.md, session 11).
    `model` is the source as a peft model with the LoRA. Returns (prompts, their effects), strongest first."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    scored: list[tuple[float, str]] = []
    try:
        bar = tqdm(total=len(texts), disable=not progress, desc="mine prompts", dynamic_ncols=True)
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], add_special_tokens=False, truncation=True,
                            max_length=window, padding=True, return_tensors="pt").to(model.device)
            lp_lora = torch.log_softmax(model(**enc).logits.float(), -1)
            with model.disable_adapter():
                lp_base = torch.log_softmax(model(**enc).logits.float(), -1)
            effect = lora_effect(lp_lora, lp_base) * enc["attention_mask"]
            effect[:, :skip] = 0
            best, where = effect.max(-1)
            for ids, e, p in zip(enc["input_ids"], best.tolist(), where.tolist()):
                if e > 0:
                    scored.append((e, tokenizer.decode(ids[:p + 1])))
            bar.update(len(enc["input_ids"]))
        bar.close()
    finally:
        tokenizer.padding_side = old_side
    scored.sort(key=lambda s: -s[0])
    top = [s for s in scored if s[1].strip()][:n]
    return [p for _, p in top], [round(e, 5) for e, _ in top]


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 16,
                   progress: bool = False) -> list[str]:
    """The model's greedy continuation of each prompt, up to its EOS, as the text that follows the prompt
    (the whole sequence decoded and the prompt's own text cut off, so a leading space survives: decoding
    the new tokens alone drops it for sentencepiece tokenizers)."""
    device = next(model.parameters()).device
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every prompt ends where generation starts
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="answers", dynamic_ncols=True):
            chunk = prompts[i:i + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad)
            for row, ids in zip(enc["input_ids"], out):
                head = tokenizer.decode(row, skip_special_tokens=True)
                whole = tokenizer.decode(ids, skip_special_tokens=True)
                answers.append(whole[len(head):] if whole.startswith(head) else
                               tokenizer.decode(ids[len(row):], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old
    return answers
