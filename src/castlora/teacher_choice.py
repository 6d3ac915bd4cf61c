"""`--teacher auto`: pick the teacher from the two base models alone, with no task data.

The source teacher asks the target to copy source+LoRA whole, the source base's habits included.
Where the source is the stronger model that copying helps (the imitation control alone recovers
0.24-0.43 of the gap from llama), and the source teacher wins. Where the source is the weaker model
it hurts (that control is -0.14 from neox to llama), and the blend teacher, which swaps half of
the source base for the target's own, recovers far more (shakespeare validation text, neox->llama
0.606 against 0.391 of the gap; docs/levers.md).

Which model is stronger is measured on whole documents that both read: the total next-token loss
of each base model over the same strings, in bits per UTF-8 byte, so that tokenizers of any size
compare. Each document is scored from its start, after the model's document-start token (BOS, or
EOS for GPT-2 style tokenizers), so both models pay for every byte; a tokenizer that adds no BOS
would otherwise leave the first token of each text unscored.
The documents are `--strength-corpus` when given, else `--corpus`, in a seeded order: as many
characters as the training stream has tokens (about a quarter of its text, so the choice costs a
small part of the run), at least MIN_STRENGTH_CHARS and at most STRENGTH_CHARS. The source must be
weaker by a margin (MARGIN, 1%).

Why a separate corpus: a model's loss on text it trained on measures memory as well as strength.
The zoo's models trained on general/train for 8 epochs. On its documents mistral spends 0.5-0.8%
*fewer* bits than llama; on held-out general/valid 1.7-1.8% more, as the zoo manifest ranks them, and
on validation text the blend beat the source teacher from mistral to llama. The bench and the demo pass general/valid.
"""

from __future__ import annotations

import math
import random

import torch

from .evaluate import text_loss

MARGIN = 0.01  # the source must spend this much more (relative) than the target to count as weaker
STRENGTH_CHARS = 100_000  # of documents (~25k tokens): two forward passes of seconds on a CPU
MIN_STRENGTH_CHARS = 2_000  # a smoke run (a few steps) still reads a few documents
DOC_CHARS = 4_000  # at most this much of each document, so that one long document cannot dominate


def strength_budget(steps: int, batch_size: int, seq_len: int) -> int:
    """Characters of documents to score: the training stream's token count, within the bounds above."""
    return max(MIN_STRENGTH_CHARS, min(STRENGTH_CHARS, steps * batch_size * seq_len))


def strength_texts(docs: list[str], seed: int = 0, max_chars: int | None = None) -> list[str]:
    """Whole documents (the first DOC_CHARS of long ones) in a seeded order, max_chars in all
    (default STRENGTH_CHARS)."""
    max_chars = STRENGTH_CHARS if max_chars is None else max_chars
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    texts, total = [], 0
    for i in order:
        text = docs[i][:DOC_CHARS]
        if text.strip():
            texts.append(text)
            total += len(text)
        if total >= max_chars:
            break
    return texts


@torch.no_grad()
def bits_per_byte(model, tokenizer, texts: list[str], seq_len: int) -> float:
    """Total next-token loss of `model` over `texts`, each scored whole from the model's document-start
    token, in bits per UTF-8 byte."""
    scored = text_loss(model, tokenizer, texts, seq_len=seq_len, doc_start=True)
    return scored["mean_loss"] * scored["tokens"] / math.log(2) / sum(len(t.encode("utf-8")) for t in texts)


def pick_teacher(source_bits_per_byte: float, target_bits_per_byte: float) -> str:
    """The rule: blend when the source spends MARGIN (relative) more bits per byte, else source."""
    return "blend" if source_bits_per_byte > target_bits_per_byte * (1 + MARGIN) else "source"


def choose_teacher(source, tok_s, target, tok_t, texts: list[str], seq_len: int) -> tuple[str, dict]:
    """"blend" when the source base spends MARGIN more bits per byte on `texts` than the target base,
    else "source". `source` is the PeftModel (its LoRA is switched off here); `target` the base."""
    with source.disable_adapter():
        bpb_s = bits_per_byte(source, tok_s, texts, seq_len)
    bpb_t = bits_per_byte(target, tok_t, texts, seq_len)
    teacher = pick_teacher(bpb_s, bpb_t)
    return teacher, {"teacher": teacher, "source_bits_per_byte": round(bpb_s, 4),
                     "target_bits_per_byte": round(bpb_t, 4), "texts": len(texts)}
