"""`--teacher auto`: pick the teacher from the two base models alone, with no task data.

The source teacher asks the target to copy source+LoRA whole, the source base's habits included.
Where the source is the stronger model that copying helps (the imitation control alone recovers
0.24-0.43 of the gap from llama), and the source teacher wins. Where the source is the weaker model
it hurts (that control is -0.14 from neox to llama), and the blend teacher, which swaps half of
the source base for the target's own, recovers far more (shakespeare validation text, neox->llama
0.606 against 0.391; docs/results.md, session 7).

Which model is stronger is measured on the held-out calibration text, which both read whole: the
total next-token loss of each base model over the same strings, in bits per UTF-8 byte, so that
tokenizers of any size compare. The source must be weaker by a margin (MARGIN, 1%): between close
models 32 texts cannot tell. On the zoo, whose models trained on that very general text for 8
epochs, mistral and llama swap places with the calibration texts (mistral -0.5% to +0.1% against
llama, and llama -0.4% to +0.4% against mistral) though on held-out general text mistral is 3.3%
worse (1.644 against 1.592 bits per byte, zoo manifest); neox is 3.7% worse than llama on both
calibration sets measured. So auto takes the blend for neox->llama only, and keeps the source
teacher for mistral->llama, where `--teacher blend` did better (docs/results.md, session 7).
"""

from __future__ import annotations

import math

import torch

from .evaluate import text_loss

MARGIN = 0.01  # the source must spend this much more (relative) than the target to count as weaker


@torch.no_grad()
def bits_per_byte(model, tokenizer, texts: list[str], seq_len: int) -> float:
    """Total next-token loss of `model` over `texts` (each scored from its own start), in bits per byte."""
    scored = text_loss(model, tokenizer, texts, seq_len=seq_len)
    return scored["mean_loss"] * scored["tokens"] / math.log(2) / sum(len(t.encode("utf-8")) for t in texts)


def choose_teacher(source, tok_s, target, tok_t, texts: list[str], seq_len: int) -> tuple[str, dict]:
    """"blend" when the source base spends MARGIN more bits per byte on `texts` than the target base,
    else "source". `source` is the PeftModel (its LoRA is switched off here); `target` the base."""
    with source.disable_adapter():
        bpb_s = bits_per_byte(source, tok_s, texts, seq_len)
    bpb_t = bits_per_byte(target, tok_t, texts, seq_len)
    teacher = "blend" if bpb_s > bpb_t * (1 + MARGIN) else "source"
    return teacher, {"teacher": teacher, "source_bits_per_byte": round(bpb_s, 4),
                     "target_bits_per_byte": round(bpb_t, 4), "texts": len(texts)}
