"""Cross-LoRA style weight-space transfer (arXiv 2508.05232), no data.

For each (source site -> target site) pair: take the truncated SVDs of the two frozen weights,
W_S = U_S S_S V_S^T and W_T = U_T S_T V_T^T, keep k = min of the four dimensions, align the
subspaces by the least-squares maps between the singular bases (for orthonormal bases that is
U_T U_S^T on the output side and V_S V_T^T on the input side), carry the source delta across,
    dW_T = (U_T U_S^T) dW_S (V_S V_T^T),
and truncate dW_T to the source rank r with an SVD. The signs and order of singular vectors are
the only correspondence this baseline has between two independently trained models, which is
why it is expected to be weak across architectures.
"""

from __future__ import annotations

import contextlib

import torch

from ..export import stack_factors
from ..families import ModelSites, Site


def _weight(model, site: Site) -> torch.Tensor:
    module = model.get_submodule(site.path)
    module = getattr(module, "base_layer", module)  # a peft LoRA layer: its frozen base
    loaded = contextlib.nullcontext()
    if hasattr(module, "_hf_hook"):  # --device-map: an offloaded module's weight sits on the meta device
        from accelerate.utils import align_module_device
        loaded = align_module_device(module)
    # on the CPU, where the LoRA's factors are: the models may sit on a GPU, or on several (--device-map)
    with loaded:
        w = module.weight.detach().to("cpu", torch.float64)
    w = w.t() if site.transposed else w  # as (out, in)
    return w if site.rows is None else w[site.rows]


def weight_space_factors(pairs, source_sites: ModelSites, source, target) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per target module: (A, B) of the transferred deltas (same layout as export.module_factors)."""
    items = []
    for pair in pairs:
        k, tsite = pair.kernel, pair.target
        Us, _, Vsh = torch.linalg.svd(_weight(source, source_sites.site(k.layer, k.role)), full_matrices=False)
        Ut, _, Vth = torch.linalg.svd(_weight(target, tsite), full_matrices=False)
        q = min(Us.shape[1], Ut.shape[1])
        d_t = (Ut[:, :q] @ Us[:, :q].t()) @ k.delta_weight().double() @ (Vsh[:q].t() @ Vth[:q])
        U, S, Vh = torch.linalg.svd(d_t, full_matrices=False)
        items.append(((S[:k.rank, None] * Vh[:k.rank]).float(), U[:, :k.rank].float(), tsite))
    return stack_factors(items)
