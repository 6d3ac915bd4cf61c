"""The two models of a port, as one object: the source with its LoRA, the target, their tokenizers and
sites, and (once attached) the ported kernels and the wrappers that apply them on the target. Every
stage of CAST (teacher, loss, held-out check, training, export) takes this object instead of the
5-8 positional handles it would otherwise thread through."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .adapters import LoraAdapter, load_adapter
from .cast_module import CastLinear, PortedKernel
from .errors import CastloraError
from .families import ModelSites, Site, model_sites
from .models import load_model, load_tokenizer


@dataclass
class ModelPair:
    source: object  # PeftModel: the source base with the LoRA (disable_adapter() gives the base)
    target: object  # the target base; ported deltas act on it inside cast_module.attached
    tok_s: object
    tok_t: object
    s_sites: ModelSites
    t_sites: ModelSites
    ports: list[tuple[PortedKernel, Site]] = field(default_factory=list)
    wrappers: list[CastLinear] = field(default_factory=list)

    @property
    def source_inner(self):
        """The source's transformers model under peft (where capture hooks and shared_logits attach)."""
        return self.source.base_model.model


def parse_device_map(spec: str, which: str):
    """'' -> None; 'auto' -> 'auto'; JSON -> a dict (one map for both models, or {"source": {...},
    "target": {...}}, where a model left out loads whole on --device)."""
    if not spec:
        return None
    if spec == "auto":
        return "auto"
    try:
        m = json.loads(spec)
    except json.JSONDecodeError as e:
        raise CastloraError(f"--device-map must be 'auto' or a JSON object of module -> device: {e}") from None
    if isinstance(m, dict) and m and set(m) <= {"source", "target"}:
        m = m.get(which)
    if m is not None and not isinstance(m, dict):
        raise CastloraError(f"--device-map must be 'auto' or a JSON object of module -> device, not {spec}")
    return m


def load_pair(cfg, adapter) -> tuple[ModelPair, object, LoraAdapter]:
    """Load both models, their tokenizers and sites, split the adapter (transfers.AdapterFiles, read once) into
    the source's kernels (an adapter of another model is refused here, before peft sees it), and attach it to
    the source (frozen). Returns (pair, source base model, the adapter's kernels)."""
    from peft import PeftModel

    load = dict(allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
    src_base = load_model(cfg.source, cfg.dtype, cfg.device, device_map=parse_device_map(cfg.device_map, "source"),
                          **load)
    tgt = load_model(cfg.target, cfg.dtype, cfg.device, device_map=parse_device_map(cfg.device_map, "target"), **load)
    tok_s = load_tokenizer(cfg.source, cfg.trust_remote_code)
    tok_t = load_tokenizer(cfg.target, cfg.trust_remote_code)
    s_sites, t_sites = model_sites(src_base), model_sites(tgt)
    lora = load_adapter(adapter.folder, s_sites, cfg.allow_pickle, files=(adapter.config, adapter.tensors))
    source = PeftModel.from_pretrained(src_base, str(adapter.folder), is_trainable=False).eval()
    for p in source.parameters():
        p.requires_grad_(False)
    return ModelPair(source, tgt, tok_s, tok_t, s_sites, t_sites), src_base, lora


__all__ = ["ModelPair", "load_pair", "parse_device_map"]
