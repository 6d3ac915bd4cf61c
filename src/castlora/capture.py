"""Record inputs and outputs of chosen modules during a forward pass.

Hooks live only inside the `capture` context manager and are removed on exit, also when the
forward pass raises: a stray hook would silently keep copying activations in every later call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn


@dataclass
class Captured:
    """What one `capture` block recorded: module path -> tensor (last call wins)."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None


def _first_tensor(x):
    # Decoder layers return tuples (hidden, attn, ...); hooks see positional args as a tuple.
    while isinstance(x, (tuple, list)):
        x = x[0]
    return x


@contextmanager
def capture(model: nn.Module, inputs: Iterable[str] = (), outputs: Iterable[str] = (), *,
            logits: bool = False, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None, detach: bool = True) -> Iterator[Captured]:
    """Record the first positional input of modules in `inputs`, the (first) output of modules in
    `outputs` and, with `logits=True`, the output of the model's output embedding.

    Tensors are detached (unless `detach=False`) and moved to `device`/`dtype` when given.
    """
    got = Captured()

    def keep(t: torch.Tensor) -> torch.Tensor:
        t = _first_tensor(t)
        if detach:
            t = t.detach()
        if device is not None or dtype is not None:
            t = t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)
        return t

    handles = []
    try:
        for path in dict.fromkeys(inputs):
            mod = model.get_submodule(path)
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, kwargs, p=path: got.inputs.__setitem__(
                    p, keep(args[0] if args else next(iter(kwargs.values())))), with_kwargs=True))
        for path in dict.fromkeys(outputs):
            mod = model.get_submodule(path)
            handles.append(mod.register_forward_hook(
                lambda m, a, out, p=path: got.outputs.__setitem__(p, keep(out))))
        if logits:
            head = model.get_output_embeddings()
            if head is None:
                raise ValueError(f"{type(model).__name__} has no output embedding to capture logits from")
            handles.append(head.register_forward_hook(
                lambda m, a, out: setattr(got, "logits", keep(out))))
        yield got
    finally:
        for h in handles:
            h.remove()
