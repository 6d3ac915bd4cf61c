"""Activation (gradient) checkpointing of the target's blocks, for any family.

The student's backward needs the target's activations; at 7B and long sequences they, not the
weights, fill the card. Inside `checkpointed_blocks`, each block keeps only its inputs and
recomputes its insides during the backward pass: about one more block forward per step for
memory that no longer grows with depth. The blocks come from the family spec, so no
model-specific switch is needed, and the model stays in eval mode (HF's own switch only acts in
train mode, which would turn dropout on).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextmanager
def checkpointed_blocks(model: nn.Module, block_paths: list[str], enabled: bool = True) -> Iterator[None]:
    if not enabled:
        yield
        return
    blocks = [model.get_submodule(p) for p in block_paths]
    # A KV cache would be appended to twice (forward, then recomputation): keys of double length.
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = False
    # A block dispatched by accelerate (--device-map) has its hook as an instance `forward`: keep it to put back,
    # or the block would lose the hook that moves its inputs and loads its offloaded weights.
    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            if not torch.is_grad_enabled():  # teacher passes and evaluation: nothing to save
                return _original(*args, **kwargs)
            # non-reentrant: works with keyword arguments, with inputs that need no grad, and with
            # intermediate tensors (the heads' z for the MSE term) used outside the block
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = forward  # instance attribute: shadows the class's forward
    try:
        yield
    finally:
        for block, old in zip(blocks, saved):
            if old is None:
                del block.forward
            else:
                block.forward = old
        if config is not None:
            config.use_cache = use_cache
