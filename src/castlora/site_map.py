"""Which target site hosts each source kernel (CAST.md step 1).

Layers: proportional depth by default, or a data-driven map (linear CKA between the two residual
streams on aligned positions, then the best monotone alignment). Roles: the same role where the
target has it, else its documented counterpart (families.ROLE_COUNTERPARTS), else dropped — only
when the user allows it, and always listed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import LoraKernel
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


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA of two activation matrices with the same rows (positions)."""
    X = X.double() - X.double().mean(0)
    Y = Y.double() - Y.double().mean(0)
    xy = (Y.t() @ X).pow(2).sum()
    return float(xy / ((X.t() @ X).pow(2).sum().sqrt() * (Y.t() @ Y).pow(2).sum().sqrt()).clamp_min(1e-30))


def cka_layer_map(source_acts: list[torch.Tensor], target_acts: list[torch.Tensor]) -> tuple[list[int], list[list[float]]]:
    """Monotone map i -> j maximising the summed CKA (dynamic programming; j never decreases)."""
    n_s, n_t = len(source_acts), len(target_acts)
    sim = [[linear_cka(source_acts[i], target_acts[j]) for j in range(n_t)] for i in range(n_s)]
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
    return mapping, sim


def map_sites(kernels: list[LoraKernel], target: ModelSites, layer_map: list[int],
              allow_drop: bool = False) -> tuple[list[SitePair], list[dict]]:
    """Pair every source kernel with a target site; returns (pairs, dropped)."""
    pairs, dropped = [], []
    for k in kernels:
        j = layer_map[k.layer]
        role, note = k.role, ""
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
