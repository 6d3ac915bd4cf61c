"""The `--init auto` start: CAST-0's heads with their output heads scaled by the factor that fits the
teacher best on the held-out calibration batches.

Why: the closed form is fitted to predict target activations, not to match the teacher. On the same
model it is exact (llama->llama keeps ~100% of the LoRA); across families its delta can point the
wrong way and start *below* the target base (shakespeare neox->llama: loss 8.88 against the base's
5.69), and training then spends its steps undoing it. A zero start (scale 0, the `zero-delta` init)
avoids that but throws away a perfect start on related models. Scaling the output heads by
s in {0, 1/4, 1/2, 3/4, 1} and keeping the s with the lowest KL to the teacher covers both ends for
a few forward passes: the teacher runs once per calibration batch, the target once per (batch, s).
"""

from __future__ import annotations

from typing import Callable

import torch

from .cast_module import PortedKernel
from .families import Site

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def set_output_scale(ports: list[tuple[PortedKernel, Site]], scale: float,
                     weights: list[torch.Tensor] | None = None) -> None:
    """Set each output head's linear part to `scale` x `weights` (default: x its current value)."""
    for i, (port, _) in enumerate(ports):
        w = port.p_out.linear_part()
        w.copy_((weights[i] if weights is not None else w) * scale)


@torch.no_grad()
def search_start(ports: list[tuple[PortedKernel, Site]], kl_at: Callable[[], float],
                 candidates: dict[str, list[torch.Tensor]], scales: tuple[float, ...] = SCALES) -> dict:
    """For each candidate set of output-head weights and each scale, measure `kl_at()`; keep the
    lowest. Scale 0 is the same for every candidate and is measured once. Ties go to the earlier
    candidate and the larger scale. Returns what was measured."""
    kls: dict[tuple[str, float], float] = {}
    for name, weights in candidates.items():
        for s in scales:
            if s == 0 and kls and any(k[1] == 0 for k in kls):
                continue
            set_output_scale(ports, s, weights)
            kls[(name, s)] = float(kl_at())
    order = list(candidates)
    best = min(kls, key=lambda k: (kls[k], order.index(k[0]), -k[1]))
    set_output_scale(ports, best[1], candidates[best[0]])
    return {"candidate": best[0], "output_scale": best[1],
            "start_kl": {f"{n}@{s}": round(v, 5) for (n, s), v in kls.items()}}


@torch.no_grad()
def scale_output_heads(ports: list[tuple[PortedKernel, Site]], kl_at: Callable[[], float],
                       scales: tuple[float, ...] = SCALES) -> dict:
    """Try each scale of the output heads' linear part (MLP heads' residual branch starts at zero, so
    this scales the whole delta), keep the one with the lowest `kl_at()`. Returns what was measured."""
    weights = [port.p_out.linear_part().detach().clone() for port, _ in ports]
    found = search_start(ports, kl_at, {"closed-form": weights}, scales)
    return {"output_scale": found["output_scale"],
            "start_kl": {k.split("@")[1]: v for k, v in found["start_kl"].items()}}


__all__ = ["scale_output_heads", "search_start", "set_output_scale", "SCALES"]
