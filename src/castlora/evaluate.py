"""Scores and retention (docs/method.md, "How a transfer is judged").

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
from tqdm.auto import tqdm

from .corpus import read_documents, read_text_file
from .errors import CastloraError
from .generate import greedy_answers


def load_examples(path: str | Path) -> list[dict]:
    """The prompt/completion records of a .jsonl (or .jsonl.gz) examples file; a one-line CastloraError
    naming the file and line for anything else (not a regular file, not UTF-8, broken JSON, not an object,
    fields missing or not strings)."""
    path = Path(path)
    rows = []
    for n, line in enumerate(read_text_file(path, "examples file", CastloraError).splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise CastloraError(f"{path}:{n} is not a JSON line ({e}): fix or remove that line") from e
            if not isinstance(rec, dict) or "prompt" not in rec or "completion" not in rec:
                raise CastloraError(f"{path}:{n} needs 'prompt' and 'completion' fields (a JSON object per line)")
            for field in ("prompt", "completion"):
                if not isinstance(rec[field], str):
                    raise CastloraError(f"{path}:{n}: field {field!r} is {json.dumps(rec[field])[:40]}, not a string: "
                                        "write it as a JSON string")
            rows.append(rec)
    return rows


def is_examples_file(path: str | Path) -> bool:
    p = str(path)
    if not p.endswith((".jsonl", ".jsonl.gz")):
        return False
    text = read_text_file(p, "examples file", CastloraError)
    first = next((line for line in text.splitlines() if line.strip()), "{}")
    try:
        rec = json.loads(first)
    except (ValueError, RecursionError):
        return False  # read as documents, whose reader names the broken line
    return isinstance(rec, dict) and "prompt" in rec


def doc_start_id(tokenizer) -> int | None:
    """The token a document follows in training: BOS, else EOS (GPT-2 style models separate documents
    with EOS and add no BOS)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def text_windows(tokenizer, docs: list[str], seq_len: int, max_tokens: int | None = None,
                 doc_start: bool = False, coverage: list | None = None) -> list[list[int]]:
    """Each document tokenized (with BOS if the tokenizer adds one) and cut into seq_len windows.
    doc_start: every document follows doc_start_id() instead, so its first token is scored too, by any
    tokenizer (a GPT-2 tokenizer adds no BOS, and its first token would go unscored).
    coverage: a list that receives, per document that has a scored token, the UTF-8 byte count of the
    text its scored tokens cover (scored_text_bytes)."""
    windows, total = [], 0
    start = doc_start_id(tokenizer) if doc_start else None
    offsets = coverage is not None and getattr(tokenizer, "is_fast", False)
    enc = tokenizer(docs, add_special_tokens=start is None, return_offsets_mapping=offsets)
    for d, ids in enumerate(enc["input_ids"]):
        spans = enc["offset_mapping"][d] if offsets else None
        if start is not None:
            ids = [start, *ids]
            spans = None if spans is None else [(0, 0), *spans]
        used = 0
        for i in range(0, len(ids) - 1, seq_len):
            w = ids[i:i + seq_len + 1]  # one token of overlap: every target is predicted once
            if len(w) > 1:
                windows.append(w)
                total += len(w) - 1
                used = i + len(w)
            if max_tokens and total >= max_tokens:
                break
        if coverage is not None and used:
            coverage.append(scored_text_bytes(tokenizer, docs[d], ids, used, spans))
        if max_tokens and total >= max_tokens:
            return windows
    return windows


def scored_text_bytes(tokenizer, doc: str, ids: list[int], used: int, spans=None) -> int:
    """UTF-8 bytes of the text of `doc` covered by its scored tokens ids[1:used] (ids[0], BOS or the
    document's first token, is never a target). With character offsets (`spans`, a fast tokenizer): the
    text from the end of ids[0]'s span (0 for BOS, which covers none) to the end of the document when
    every token is scored, else to the end of the last scored token's span; so the whitespace between
    tokens is counted, and a special token counts nothing. Without offsets: the bytes of
    tokenizer.decode(ids[1:used]) with special tokens skipped."""
    if spans is not None and len(spans) == len(ids):
        a = spans[0][1]
        b = len(doc) if used >= len(ids) else max(end for _, end in spans[:used])
        return len(doc[a:max(a, b)].encode("utf-8"))
    return len(tokenizer.decode(ids[1:used], skip_special_tokens=True).encode("utf-8"))


@torch.no_grad()
def text_loss(model, tokenizer, docs: list[str], seq_len: int = 256, batch_size: int = 8,
              max_tokens: int | None = None, doc_start: bool = False, progress: bool = False) -> dict:
    """Mean next-token loss (nats) over the scored tokens of `docs` (text_windows; special tokens other
    than EOS are not scored), perplexity, the token count, and bits per byte: the total loss over the
    scored tokens / ln 2 / the UTF-8 bytes of the text those tokens cover ("bytes"; per document, from
    the end of its first, unscored token (nothing for BOS) to the end of the document, or to the end of
    the last scored token where max_tokens stops mid-document: scored_text_bytes). Unlike the loss per
    token, bits per byte compares models with different tokenizers on the same text."""
    device = next(model.parameters()).device
    covered: list[int] = []
    windows = text_windows(tokenizer, docs, seq_len, max_tokens, doc_start=doc_start, coverage=covered)
    special = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    total_loss, total_tok = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i in tqdm(range(0, len(windows), batch_size), disable=not progress, desc="scoring", dynamic_ncols=True):
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
    n_bytes = sum(covered)
    bpb = total_loss / math.log(2) / n_bytes if n_bytes else float("nan")
    return {"mean_loss": mean, "perplexity": math.exp(mean), "tokens": total_tok, "bytes": n_bytes,
            "bits_per_byte": bpb}


@torch.no_grad()
def completion_example(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a prompt/completion example: prompt and completion tokenized as the one
    text the model reads (with its special tokens), then EOS; labels are -100 on the prompt's tokens
    (the longest run of them the whole text starts with), so no loss falls there.

    Tokenized apart, a completion that starts with a space gets a second one from a sentencepiece
    tokenizer's dummy prefix, and each family splits that double space its own way ("->" + " Hello":
    llama '▁->', '▁', '▁Hello'; mistral '▁->', '▁▁', 'Hello'; neox 'Ġ->', 'ĠHello'). LoRAs trained so
    learnt a string the data does not hold, and a port could not be taught mistral's 'Hello' from llama
    at all: no token boundary of llama's falls after the second space."""
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


def evaluate_model(cfg, log=None) -> dict:
    """`castlora eval`: the model (and its adapter, checked as translate checks one: config, tensors, finite
    weights) scored on cfg.data. A non-finite score is an error, not a result."""
    import math

    from .adapters import read_adapter_folder
    from .config import resolve_device
    from .errors import CastloraError
    from .hub import resolve_adapter
    from .models import check_model_path, load_model, load_tokenizer

    from .corpus import check_regular_file

    if not (cfg.data or cfg.lm_eval):
        raise CastloraError("--data is required (a test text or prompt/completion file), unless --lm-eval is given")
    check_model_path(cfg.model, cfg.allow_pickle, "model")
    data = Path(cfg.data) if cfg.data else None
    if data is not None:
        check_regular_file(data, "data file", CastloraError)
    if cfg.lm_eval:
        from .harness import task_names
        task_names(cfg.lm_eval)  # a missing task file is named before any model loads
    folder = None
    if cfg.adapter:
        folder = resolve_adapter(cfg.adapter)
        config, _ = read_adapter_folder(folder, cfg.allow_pickle, warn=log)
        base = config.get("base_model_name_or_path")
        if log and base and str(base) != str(cfg.model):
            log(f"note: the adapter was made for {base}; scoring it on {cfg.model}")
    model = load_model(cfg.model, cfg.dtype, resolve_device(cfg.device), allow_pickle=cfg.allow_pickle)
    if folder is not None:
        from peft import PeftModel
        try:
            model = PeftModel.from_pretrained(model, str(folder)).eval()
        except (RuntimeError, ValueError) as e:
            first = " ".join(str(e).split())[:200]
            raise CastloraError(f"the adapter {cfg.adapter} does not fit {cfg.model} ({first}): pass the model it "
                                "was made for") from None
    result = {}
    if data is not None:
        result = evaluate(model, load_tokenizer(cfg.model), data, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                          max_tokens=cfg.max_tokens)
    if cfg.lm_eval:
        from .harness import run_lm_eval
        del model  # the harness loads its own copy
        result.update(run_lm_eval(cfg.model, str(folder) if folder else None, cfg.lm_eval,
                                  resolve_device(cfg.device), cfg.dtype, cfg.batch_size, cfg.limit))
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise CastloraError(f"{', '.join(bad)} came out non-finite ({result[bad[0]]}): the model or adapter holds "
                            "non-finite weights")
    return result
