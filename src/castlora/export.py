"""Fold the heads into a plain LoRA on the target and write it through peft's own API.

With linear heads the ported delta at a site is exactly rank r:
    s * P_out (core (P_in x))  =  B_T A_T x   with  A_T = core @ P_in,  B_T = s * P_out,
and rank r + k with --extra-rank k (the free directions' rows below A_T, their columns beside B_T).
Several kernels can land on one target module (a fused module hosting q and v, or two source
layers mapped to one target layer): their A_T are stacked and their B_T placed side by side in
the rows of their roles, so the module's LoRA rank is the sum of theirs. Every module is padded
with zeros to one common rank (an exact no-op) so that any LoRA server can load the adapter;
lora_alpha = r makes peft's scaling 1, the LoRA scale living in B_T.
Non-linear heads are exported by a reduced-rank least-squares fit on the target's activations at every
real position of the calibration batches.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cast_module import PortedKernel
from .families import Site
from .capture import capture
from .closed_form import STATS_BUDGET_BYTES, _Fit, port_groups
from .heads import LinearHead, reduced_rank_from_stats


def port_factors(port: PortedKernel, fit: _Fit | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A_T, B_T, relative fit error) of one port; exact (error 0) for linear heads. Non-linear heads
    need `fit`: the statistics of (site input, ported delta) pairs (delta_fits)."""
    with torch.no_grad():
        if is_linear(port):
            A = port.core @ port.p_in.weight
            B = port.scale * port.p_out.weight
            if port.extra_rank:  # the free directions are r more rows of A and columns of B
                A = torch.cat([A, port.extra_gain * port.x_in.weight])
                B = torch.cat([B, port.scale * port.x_out.weight], 1)
            return A.float().cpu(), B.float().cpu(), 0.0
        if fit is None:
            raise ValueError("non-linear heads need target activations to be exported (delta_fits)")
        A, B, err = reduced_rank_from_stats(fit.g[0], fit.c[0], fit.yy[0], port.rank + port.extra_rank)
        return A.cpu(), B.cpu(), err


def is_linear(port: PortedKernel) -> bool:
    return isinstance(port.p_in, LinearHead) and isinstance(port.p_out, LinearHead)


def fit_bytes(port: PortedKernel) -> int:
    """The fp64 statistics delta_fits keeps for `port`: X^T X and X^T D."""
    d_in, d_out = port.p_in.linear_part().shape[1], port.p_out.linear_part().shape[0]
    return 8 * (d_in ** 2 + d_in * d_out)


@torch.no_grad()
def delta_fits(ports: list[tuple[PortedKernel, Site]], target, batches) -> list[_Fit]:
    """Statistics of each port's delta as a function of its site's input, at every real target position
    of `batches` (PairBatch list), streamed: memory does not grow with the number of positions. The
    target runs as it is: inside `attached`, each site reads what the port reads at run time."""
    fits = [_Fit() for _ in ports]
    for batch in batches:
        with capture(target, inputs=[site.path for _, site in ports]) as ct:
            target(input_ids=batch.ids_t, attention_mask=batch.mask_t)
        for (port, site), fit in zip(ports, fits):
            x = ct.inputs[site.path]
            x = x[batch.mask_t.to(x.device).bool()]  # real positions only, not padding
            fit.update(0, x, port(x.to(port.core.device)))
    return fits


def stack_factors(items: list[tuple[torch.Tensor, torch.Tensor, Site]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per target module path: (A: R x d_in, B: module_out x R) from per-site (A, B, site) factors.
    Kernels on one module are stacked; a fused site's B fills only its role's rows."""
    per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor, Site]]] = {}
    for A, B, site in items:
        per_module.setdefault(site.path, []).append((A, B, site))
    out = {}
    for path, group in per_module.items():
        A = torch.cat([a for a, _, _ in group], 0)
        Bm = torch.zeros(group[0][2].module_out, A.shape[0])
        col = 0
        for a, b, site in group:
            rows = torch.arange(site.module_out) if site.rows is None else site.rows
            Bm[rows, col:col + a.shape[0]] = b
            col += a.shape[0]
        out[path] = (A, Bm)
    return out


def module_factors(ports: list[tuple[PortedKernel, Site]], target=None, batches=(),
                   budget: int = STATS_BUDGET_BYTES):
    """Per target module path: (A, B) of all ports on it, and the fit error per port. Non-linear heads
    are fitted on `target`'s activations over `batches` (delta_fits), in groups of ports whose
    statistics fit in `budget` bytes, one pass over the batches per group."""
    done: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
    nonlinear = [i for i, (port, _) in enumerate(ports) if not is_linear(port)]
    if nonlinear and (target is None or not batches):
        raise ValueError("non-linear heads need target activations to be exported: pass target and batches")
    for group in port_groups([ports[i] for i in nonlinear], budget, fit_bytes):
        sub = [ports[nonlinear[j]] for j in group]
        for j, fit in zip(group, delta_fits(sub, target, batches)):
            done[nonlinear[j]] = port_factors(ports[nonlinear[j]][0], fit)
    items, errors = [], {}
    for i, (port, site) in enumerate(ports):
        A, B, err = done[i] if i in done else port_factors(port)
        errors[f"{port.source_key}->{port.target_key}"] = err
        items.append((A, B, site))
    return stack_factors(items), errors


def export_peft(target, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], out_dir: str | Path,
                transposed: bool = False, base_model_name: str | None = None):
    """Write `factors` as a PEFT LoRA adapter for `target` into out_dir; returns the target unwrapped.

    Uses get_peft_model + the LoRA layers' own parameters + save_pretrained: no key is written by
    hand, so the folder is exactly what peft itself would save for this target.
    """
    from peft import LoraConfig, get_peft_model

    rank = max(a.shape[0] for a, _ in factors.values())
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
                        target_modules=sorted(factors), fan_in_fan_out=transposed,
                        init_lora_weights=False)
    peft_model = get_peft_model(target, config)
    try:
        with torch.no_grad():
            for path, (A, B) in factors.items():
                layer = peft_model.base_model.model.get_submodule(path)
                for lin, value in ((layer.lora_A["default"], A), (layer.lora_B["default"], B)):
                    w = lin.weight
                    full = torch.zeros(w.shape, dtype=w.dtype)  # zero-padded to the common rank
                    full[tuple(slice(0, n) for n in value.shape)] = value.to(w.dtype)
                    # Offloaded modules get their LoRA on the meta device: give it real storage.
                    dev = torch.device("cpu") if w.device.type == "meta" else w.device
                    lin.weight = torch.nn.Parameter(full.to(dev), requires_grad=False)
        if base_model_name:
            peft_model.peft_config["default"].base_model_name_or_path = base_model_name
        peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        target = peft_model.unload()
    return target
