"""Scores and retention (CAST.md, "How a transfer is judged").

Text: mean next-token loss over windows of the documents (BOS targets excluded), perplexity =
exp(loss), likelihood score = exp(-loss). Prompt/completion jsonl: exact match of the greedy
continuation. Retention: ratio = transfer / retrained; gap recovered =
(transfer - base) / (retrained - base), computed on losses for likelihood tasks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .corpus import read_documents
from .errors import CastloraError
from .generate import greedy_answers


def load_examples(path: str | Path) -> list[dict]:
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            rec = json.loads(line)
            if "prompt" not in rec or "completion" not in rec:
                raise CastloraError(f"{path}:{n} needs 'prompt' and 'completion' fields")
            rows.append(rec)
    return rows


def is_examples_file(path: str | Path) -> bool:
    p = str(path)
    if not p.endswith((".jsonl", ".jsonl.gz")):
        return False
    first = next((line for line in Path(p).read_text(encoding="utf-8").splitlines() if line.strip()), "{}")
    return "prompt" in json.loads(first)


def doc_start_id(tokenizer) -> int | None:
    """The token a document follows in training: BOS, else EOS (GPT-2 style models separate documents
    with EOS and add no BOS)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def text_windows(tokenizer, docs: list[str], seq_len: int, max_tokens: int | None = None,
                 doc_start: bool = False) -> list[list[int]]:
    """Each document tokenized (with BOS if the tokenizer adds one) and cut into seq_len windows.
    doc_start: every document follows doc_start_id() instead, so its first token is scored too, by any
    tokenizer (a GPT-2 tokenizer adds no BOS, and its first token would go unscored)."""
    windows, total = [], 0
    start = doc_start_id(tokenizer) if doc_start else None
    enc = tokenizer(docs, add_special_tokens=start is None)["input_ids"]
    for ids in enc:
        ids = ids if start is None else [start, *ids]
        for i in range(0, len(ids) - 1, seq_len):
            w = ids[i:i + seq_len + 1]  # one token of overlap: every target is predicted once
            if len(w) > 1:
                windows.append(w)
                total += len(w) - 1
            if max_tokens and total >= max_tokens:
                return windows
    return windows


@torch.no_grad()
def text_loss(model, tokenizer, docs: list[str], seq_len: int = 256, batch_size: int = 8,
              max_tokens: int | None = None, doc_start: bool = False) -> dict:
    device = next(model.parameters()).device
    windows = text_windows(tokenizer, docs, seq_len, max_tokens, doc_start=doc_start)
    special = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    total_loss, total_tok = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, w in enumerate(chunk):
            ids[b, :len(w)] = torch.tensor(w)
            mask[b, :len(w)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:]
        valid = mask[:, 1:].bool()
        if special:
            valid &= ~torch.isin(targets, torch.tensor(sorted(special), device=device))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="none").view_as(targets)
        total_loss += float(loss[valid].sum())
        total_tok += int(valid.sum())
    if total_tok == 0:
        raise CastloraError("no tokens to score")
    mean = total_loss / total_tok
    return {"mean_loss": mean, "perplexity": math.exp(mean), "tokens": total_tok}


@torch.no_grad()
def completion_example(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a prompt/completion example: prompt and completion tokenized as the one
    text the model reads (with its special tokens), then EOS; labels are -100 on the prompt's tokens
    (the longest run of them the whole text starts with), so no loss falls there.

    Tokenized apart, a completion that starts with a space gets a second one from a sentencepiece
    tokenizer's dummy prefix, and each family splits that double space its own way ("->" + " Hello":
    llama '▁->', '▁', '▁Hello'; mistral '▁->', '▁▁', 'Hello'; neox 'Ġ->', 'ĠHello'). LoRAs trained so
    learnt a string the data does not hold, and a port could not be taught mistral's 'Hello' from llama
    at all: no token boundary of llama's falls after the second space (docs/results.md, session 27)."""
    p = tokenizer(example["prompt"], add_special_tokens=True)["input_ids"]
    ids = tokenizer(example["prompt"] + example["completion"], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    n = 0
    while n < min(len(p), len(ids) - 1) and p[n] == ids[n]:
        n += 1
    return ids, [-100] * n + ids[n:]


@torch.no_grad()
def completion_loss(model, tokenizer, examples: list[dict], batch_size: int = 16) -> dict:
    """Mean loss per completion token given the prompt (teacher-forced; EOS included): the graded
    companion of exact match. An exact-match score of 0 can hide a port that made the right
    completion much likelier; this shows it."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        pairs = [completion_example(tokenizer, e) for e in examples[i:i + batch_size]]
        width = max(len(ids) for ids, _ in pairs)
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for b, (x, y) in enumerate(pairs):
            ids[b, :len(x)], labels[b, :len(y)], mask[b, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(device),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((labels[:, 1:] != -100).sum())
    if count == 0:
        raise CastloraError("the examples have no completion tokens to score")
    return {"completion_loss": total / count, "tokens": count}


def exact_match(model, tokenizer, examples: list[dict], batch_size: int = 16, max_new_tokens: int | None = None) -> dict:
    """Share of examples whose greedy answer starts with the completion (both stripped). Each batch generates
    as many tokens as its longest completion has, plus 2, unless `max_new_tokens` says otherwise."""
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        n_new = max_new_tokens or max(sum(y != -100 for y in completion_example(tokenizer, e)[1]) for e in chunk) + 2
        answers = greedy_answers(model, tokenizer, [e["prompt"] for e in chunk], max_new_tokens=n_new,
                                 batch_size=len(chunk))
        correct += sum(a.strip().startswith(e["completion"].strip()) for e, a in zip(chunk, answers))
    return {"accuracy": correct / max(1, len(examples)), "n": len(examples)}


def evaluate(model, tokenizer, data: str | Path, seq_len: int = 256, batch_size: int = 8,
             max_tokens: int | None = None, max_examples: int | None = None) -> dict:
    """Loss/perplexity on a text file, or exact-match accuracy on a prompt/completion jsonl."""
    if is_examples_file(data):
        ex = load_examples(data)
        return exact_match(model, tokenizer, ex[:max_examples] if max_examples else ex, batch_size * 2)
    return text_loss(model, tokenizer, read_documents(data), seq_len, batch_size, max_tokens)


def retention(base: float, retrained: float, transfer: float, lower_is_better: bool = True) -> dict:
    """ratio and gap recovered. For losses (lower_is_better) the score is exp(-loss), so
    ratio = exp(loss_retrained - loss_transfer) = ppl_retrained / ppl_transfer."""
    if lower_is_better:
        ratio = math.exp(retrained - transfer)
        gap = (base - transfer) / (base - retrained) if base != retrained else float("nan")
    else:
        ratio = transfer / retrained if retrained else float("nan")
        gap = (transfer - base) / (retrained - base) if retrained != base else float("nan")
    return {"ratio": ratio, "gap_recovered": gap}
