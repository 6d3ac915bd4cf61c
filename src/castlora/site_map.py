"""Which target site hosts each source kernel (docs/method.md, step 1).

Layers: proportional depth by default, or a data-driven map (linear CKA between the two residual
streams on aligned positions, then the best monotone alignment). Roles: the same role where the
target has it, else its documented counterpart (families.ROLE_COUNTERPARTS), else dropped — only
when the user allows it, and always listed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import LoraKernel
from .capture import capture
from .errors import CastloraError
from .families import ROLE_COUNTERPARTS, ModelSites, Site


@dataclass(frozen=True)
class SitePair:
    kernel: LoraKernel
    target: Site
    note: str = ""  # why this target role, when it is not the same role

    def describe(self) -> dict:
        return {"source": self.kernel.key, "source_module": self.kernel.module_path,
                "target": self.target.key, "target_module": self.target.path,
                "rank": self.kernel.rank, **({"note": self.note} if self.note else {})}


def proportional_layer_map(n_source: int, n_target: int) -> list[int]:
    """Source layer i -> the target layer at the same relative depth (layer centres)."""
    return [min(n_target - 1, int((i + 0.5) * n_target / n_source)) for i in range(n_source)]


# The aligned positions CKA compares, at most (evenly spaced in each calibration batch). Enough for a
# layer-to-layer similarity, and it bounds what is kept: 32 + 32 layers x 4096 positions x 4096 numbers
# at 7B is 4 GiB on the models' device, where 4 batches of 8 x 512 would be 17.
CKA_POSITIONS = 4096


@torch.no_grad()
def residual_streams(source, source_inner, target, s_paths: list[str], t_paths: list[str], batches,
                     max_positions: int = CKA_POSITIONS) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's output at the aligned positions of `batches` (PairBatch list), both base models
    (the source's LoRA off, as for the heads): (source layers, target layers), each (positions x d),
    kept on the device the layer ran on."""
    per_batch = -(-max_positions // max(1, len(batches)))
    acc_s, acc_t = [[] for _ in s_paths], [[] for _ in t_paths]
    for b in batches:
        with capture(source_inner, outputs=s_paths) as cs, source.disable_adapter():
            source(input_ids=b.ids_s, attention_mask=b.mask_s)
        with capture(target, outputs=t_paths) as ct:
            target(input_ids=b.ids_t, attention_mask=b.mask_t)
        n = b.num_aligned
        keep = None if n <= per_batch else torch.linspace(0, n - 1, per_batch).round().long()
        for acc, out, paths, side in ((acc_s, cs.outputs, s_paths, "s"), (acc_t, ct.outputs, t_paths, "t")):
            for a, p in zip(acc, paths):
                x = b.gather(out[p], side)
                a.append((x if keep is None else x[keep.to(x.device)]).float())
    return [torch.cat(a) for a in acc_s], [torch.cat(a) for a in acc_t]


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA of two activation matrices with the same rows (positions), in float64 on X's device."""
    X = X.double() - X.double().mean(0)
    Y = Y.to(X.device).double()
    Y = Y - Y.mean(0)
    xy = (Y.t() @ X).pow(2).sum()
    return float(xy / ((X.t() @ X).pow(2).sum().sqrt() * (Y.t() @ Y).pow(2).sum().sqrt()).clamp_min(1e-30))


def cka_layer_map(source_acts: list[torch.Tensor], target_acts: list[torch.Tensor]) -> tuple[list[int], list[list[float]]]:
    """Monotone map i -> j maximising the summed CKA, and the CKA of every layer pair."""
    sim = [[linear_cka(x, y) for y in target_acts] for x in source_acts]
    return monotone_layer_map(sim), sim


def monotone_layer_map(sim: list[list[float]]) -> list[int]:
    """The map i -> j with j never decreasing that maximises sum_i sim[i][j] (dynamic programming)."""
    n_s, n_t = len(sim), len(sim[0])
    best = [[0.0] * n_t for _ in range(n_s)]
    back = [[0] * n_t for _ in range(n_s)]
    for i in range(n_s):
        for j in range(n_t):
            if i == 0:
                best[i][j] = sim[i][j]
                continue
            k = max(range(j + 1), key=lambda k: best[i - 1][k])
            best[i][j], back[i][j] = best[i - 1][k] + sim[i][j], k
    j = max(range(n_t), key=lambda j: best[n_s - 1][j])
    mapping = [0] * n_s
    for i in range(n_s - 1, -1, -1):
        mapping[i] = j
        j = back[i][j]
    return mapping


def map_sites(kernels: list[LoraKernel], target: ModelSites, layer_map: list[int],
              allow_drop: bool = False) -> tuple[list[SitePair], list[dict]]:
    """Pair every source kernel with a target site; returns (pairs, dropped)."""
    pairs, dropped = [], []
    for k in kernels:
        j, role, note = layer_map[k.layer], k.role, ""
        if (j, role) not in target.sites:
            alt = ROLE_COUNTERPARTS.get(role)
            if alt and (j, alt) in target.sites:
                role, note = alt, f"target has no {k.role!r}; mapped to its counterpart {alt!r}"
            elif allow_drop:
                dropped.append({"source": k.key, "source_module": k.module_path,
                                "reason": f"target family {target.family.name} has no {k.role!r} role"})
                continue
            else:
                raise CastloraError(
                    f"the target ({target.family.name}) cannot host the source's {k.role!r} LoRA at layer "
                    f"{k.layer} ({k.module_path}): it has roles {', '.join(target.roles)} and no counterpart "
                    "is defined. Pass --allow-drop to port the rest and list this one as dropped.")
        pairs.append(SitePair(k, target.site(j, role), note))
    return pairs, dropped
