"""A behaviour-revealing corpus without task data: text sampled from the source model *with its
LoRA*, prompted by the first tokens of general documents. On such text the LoRA's effect is
everywhere, so the heads see far more of what they must carry than on general text."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


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
