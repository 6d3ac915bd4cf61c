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


def uncovered_layers(layer_map: list[int], n_target: int) -> list[tuple[int, int]]:
    """(source layer, target layer) for every target layer that `layer_map` leaves empty, each taking
    the source layer at the nearest relative depth (layer centres)."""
    nearest, hosted = proportional_layer_map(n_target, len(layer_map)), set(layer_map)  # target j -> source
    return [(nearest[j], j) for j in range(n_target) if j not in hosted]


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
              allow_drop: bool = False, extra: list[tuple[int, int]] = ()) -> tuple[list[SitePair], list[dict]]:
    """Pair every source kernel with a target site; returns (pairs, dropped). `extra` (source layer,
    target layer) pairs host the kernels of that source layer a second time (uncovered_layers)."""
    pairs, dropped = [], []
    placements = [(k, layer_map[k.layer], "") for k in kernels]
    placements += [(k, j, f"copy for target layer {j}, which the layer map leaves empty")
                   for i, j in extra for k in kernels if k.layer == i]
    for k, j, copy_note in placements:
        role, note = k.role, copy_note
        if (j, role) not in target.sites:
            alt = ROLE_COUNTERPARTS.get(role)
            if alt and (j, alt) in target.sites:
                role, note = alt, "; ".join(filter(None, [copy_note, f"target has no {k.role!r}; mapped to its "
                                                                      f"counterpart {alt!r}"]))
            elif allow_drop:
                if copy_note:  # the kernel itself is reported (or ported) at its own layer
                    continue
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
