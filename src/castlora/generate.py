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
