"""`castlora inspect`: what a PEFT LoRA folder holds, per module, mapped to (layer, site)."""

from __future__ import annotations

from pathlib import Path

from .adapters import load_adapter, read_adapter_folder
from .errors import CastloraError
from .families import model_sites
from .models import load_model


def inspect_adapter(adapter_dir: str, model: str | None = None, allow_pickle: bool = False) -> str:
    config, tensors = read_adapter_folder(adapter_dir, allow_pickle)
    name = model or config.get("base_model_name_or_path")
    if not name:
        raise CastloraError(f"{adapter_dir}: adapter_config.json names no base model; pass --model")
    if model is None and not Path(str(name)).is_dir():
        # the name comes from a file the user may not trust: the hub is asked only for a model the user names
        raise CastloraError(f"{adapter_dir}: its base model {name} is not a local folder; pass --model {name} to "
                            "fetch it from the hub (or --model FOLDER)")
    base = load_model(name, "float32", "cpu", allow_pickle=allow_pickle)
    sites = model_sites(base)
    lora = load_adapter(adapter_dir, sites, allow_pickle, files=(config, tensors))
    model_type = getattr(base.config, "model_type", "?")
    layout = "" if model_type == sites.family.name else f" ({sites.family.name} layout)"
    lines = [f"adapter {adapter_dir}  base {name}  family {model_type}{layout}  "
             f"{len(lora.module_paths)} modules, {len(lora.kernels)} kernels",
             f"{'layer':>5} {'site':<5} {'rank':>4} {'alpha':>6} {'A':>12} {'B':>12} {'|s*B@A|':>10}  module"]
    alpha = config.get("lora_alpha")
    for k in lora.kernels:
        lines.append(f"{k.layer:>5} {k.role:<5} {k.rank:>4} {alpha!s:>6} {str(tuple(k.A.shape)):>12} "
                     f"{str(tuple(k.B.shape)):>12} {k.delta_weight().norm():>10.4f}  {k.module_path}")
    return "\n".join(lines)
