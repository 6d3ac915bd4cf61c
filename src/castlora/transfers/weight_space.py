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

from ..errors import CastloraError
from ..export import stack_factors
from ..families import ModelSites, Site
from ..pair import load_pair
from ..site_map import map_sites, proportional_layer_map
from .base import Port, PortInputs, adapter_writer, register_transfer


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


@register_transfer("weight-space")
def port_weight_space(inp: PortInputs) -> Port:
    """The data-free baseline: no text, no heads; the deltas carried across by the weights' singular bases."""
    cfg = inp.cfg
    inp.log(f"loading {cfg.source} and {cfg.target}")
    pair, src_base, lora = load_pair(cfg, inp.adapter)
    layer_map = proportional_layer_map(pair.s_sites.num_layers, pair.t_sites.num_layers)
    site_pairs, dropped = map_sites(lora.kernels, pair.t_sites, layer_map, cfg.allow_drop)
    if not site_pairs:
        raise CastloraError("no adapter site could be ported to the target")
    factors = weight_space_factors(site_pairs, pair.s_sites, src_base, pair.target)
    record = {"source_family": pair.s_sites.family.name, "target_family": pair.t_sites.family.name,
              "layer_map": layer_map, "layer_map_kind": "proportional", "dropped": dropped,
              "site_map": [p.describe() for p in site_pairs], "init": {"transfer": "weight-space"},
              "loss_curve": [], "train_seconds": 0, "export_fit_error": {}}
    fields_, write = adapter_writer(inp, pair.target, factors, pair.t_sites.family.transposed, record)
    record.update(fields_)
    return Port(record, write, ["adapter_model.safetensors", "castlora.json"])
