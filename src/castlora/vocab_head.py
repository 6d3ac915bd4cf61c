"""Logits over the shared vocabulary only.

The CAST loss compares teacher and student on the pieces both tokenizers share (18-24k of 32-50k
on the zoo pairs), so the other columns of the output layer are computed and thrown away. On small
models that matmul is a large part of the step. `shared_logits` swaps the model's output
embedding for one that computes only the shared rows, in the shared vocabulary's order; whatever
the model does to logits after the output layer (Gemma-2's soft-capping, Granite's scaling) is
elementwise and still applies.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class SharedVocabHead(nn.Module):
    """Computes `base_layer(x)[..., ids]` without computing the other columns."""

    def __init__(self, base_layer: nn.Linear, ids: torch.Tensor):
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("ids", ids.to(base_layer.weight.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_layer.weight.index_select(0, self.ids)  # frozen: no gradient, no copy kept
        b = self.base_layer.bias.index_select(0, self.ids) if self.base_layer.bias is not None else None
        return F.linear(x, w, b)


def can_restrict(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # A plain Linear whose weights are in memory: not a peft layer on lm_head, not offloaded by accelerate.
    return (type(head) is nn.Linear and getattr(head, "_hf_hook", None) is None
            and head.weight.device.type != "meta")


@contextmanager
def shared_logits(model: nn.Module, ids: torch.Tensor) -> Iterator[torch.Tensor | None]:
    """Within the block, `model(...).logits[..., k]` is the logit of token `ids[k]`.

    Yields None when the restriction is in place (the logits already are the shared columns), or
    `ids` when the model's output layer cannot be swapped (the caller then selects the columns).
    """
    if not can_restrict(model):
        yield ids
        return
    head = model.get_output_embeddings()
    if ids.numel() == head.weight.shape[0] and torch.equal(ids.cpu(), torch.arange(ids.numel())):
        yield None  # one tokenizer on both sides: every column, in order; nothing to swap or copy
        return
    model.set_output_embeddings(SharedVocabHead(head, ids))
    try:
        yield None
    finally:
        model.set_output_embeddings(head)
