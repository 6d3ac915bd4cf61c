"""`castlora inspect`: what a PEFT LoRA folder holds, per module, mapped to (layer, site)."""

from __future__ import annotations

from .adapters import load_adapter, read_adapter_folder
from .families import model_sites
from .models import load_model


def inspect_adapter(adapter_dir: str, model: str | None = None, allow_pickle: bool = False) -> str:
    config, _ = read_adapter_folder(adapter_dir, allow_pickle)
    name = model or config.get("base_model_name_or_path")
    if not name:
        from .errors import CastloraError
        raise CastloraError(f"{adapter_dir}: adapter_config.json names no base model; pass --model")
    base = load_model(name, "float32", "cpu", allow_pickle=allow_pickle)
    sites = model_sites(base)
    lora = load_adapter(adapter_dir, sites, allow_pickle)
    lines = [f"adapter {adapter_dir}  base {name}  family {sites.family.name}  "
             f"{len(lora.module_paths)} modules, {len(lora.kernels)} kernels",
             f"{'layer':>5} {'site':<5} {'rank':>4} {'alpha':>6} {'A':>12} {'B':>12} {'|s*B@A|':>10}  module"]
    alpha = config.get("lora_alpha")
    for k in lora.kernels:
        lines.append(f"{k.layer:>5} {k.role:<5} {k.rank:>4} {alpha!s:>6} {str(tuple(k.A.shape)):>12} "
                     f"{str(tuple(k.B.shape)):>12} {k.delta_weight().norm():>10.4f}  {k.module_path}")
    return "\n".join(lines)
