"""Read a PEFT LoRA folder and map each adapted module to the (layer, role) sites of its base model.

A module that is fused on the source (GPT-NeoX `query_key_value`) carries one LoRA whose B rows
cover q, k and v at once; castlora splits it into one kernel per role (the rows of that role), so
every later stage deals with plain (layer, role) kernels.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import AdapterMismatchError, CastloraError
from .families import ModelSites
from .safe_io import load_tensors

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraKernel:
    """The frozen source LoRA at one site: delta(x) = scale * B @ A @ x (B restricted to the role's rows)."""

    layer: int
    role: str
    module_path: str
    A: torch.Tensor  # r x d_in
    B: torch.Tensor  # d_out(role) x r
    scale: float
    rows: torch.Tensor | None = None  # the role's rows of a fused source module

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.role}"

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.B.float() @ self.A.float()


@dataclass
class LoraAdapter:
    path: Path
    config: dict
    kernels: list[LoraKernel]
    module_paths: list[str] = field(default_factory=list)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def read_adapter_folder(path: str | Path, allow_pickle: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the LoRA tensors of a PEFT folder (safetensors; pickle only if allowed)."""
    path = Path(path)
    if not path.is_dir():
        raise CastloraError(f"adapter folder {path} does not exist or is not a folder")
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise CastloraError(f"{path} has no {ADAPTER_CONFIG}: it is not a PEFT adapter folder")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CastloraError(f"{cfg_file} is not valid JSON: {e}") from e
    except OSError as e:
        raise CastloraError(f"{cfg_file} cannot be read: {e}") from e
    weights = path / SAFETENSORS_NAME
    if not weights.is_file():
        pickles = [p for p in PICKLE_NAMES if (path / p).is_file()]
        if pickles:
            weights = path / pickles[0]
        else:
            raise CastloraError(f"{path} has no {SAFETENSORS_NAME}")
    return config, load_tensors(weights, allow_pickle=allow_pickle)


def _alpha_for(module_path: str, config: dict, rank: int) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


def load_adapter(path: str | Path, sites: ModelSites, allow_pickle: bool = False) -> LoraAdapter:
    """Load a PEFT LoRA folder and split it into per-site kernels of the model described by `sites`."""
    config, tensors = read_adapter_folder(path, allow_pickle)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CastloraError(f"{path}: peft_type {peft_type} is not a LoRA; castlora ports LoRA adapters only")
    if config.get("use_dora"):
        raise CastloraError(f"{path}: DoRA adapters are not supported (use_dora=true)")

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown_keys = []
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m:
            unknown_keys.append(key)
            continue
        pairs.setdefault(m["path"], {})[m["ab"]] = t
    if unknown_keys:
        raise CastloraError(f"{path}: tensors castlora cannot port (not LoRA A/B of a linear layer): "
                            f"{', '.join(sorted(unknown_keys)[:8])}")

    base = config.get("base_model_name_or_path") or "(not recorded)"
    problems, kernels = [], []
    for mpath, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            problems.append(f"{mpath}: has lora_{'A' if 'B' in ab else 'B'} missing")
            continue
        located = sites.locate(mpath)
        if not located:
            problems.append(f"{mpath}: no such adaptable module in this {sites.family.name} model")
            continue
        A, B = ab["A"], ab["B"]
        s0 = located[0]
        if A.shape[1] != s0.d_in or B.shape[0] != s0.module_out or A.shape[0] != B.shape[1]:
            problems.append(f"{mpath}: adapter A {tuple(A.shape)}, B {tuple(B.shape)} but the model's "
                            f"module maps {s0.d_in} -> {s0.module_out}")
            continue
        rank = A.shape[0]
        alpha = _alpha_for(mpath, config, rank)
        scale = alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank
        for site in located:
            Bs = B if site.rows is None else B[site.rows]
            kernels.append(LoraKernel(site.layer, site.role, mpath, A.float(), Bs.float(), scale, site.rows))
    if problems:
        raise AdapterMismatchError(
            f"adapter {path} does not fit this {sites.family.name} model "
            f"({sites.num_layers} layers, hidden {sites.hidden_size}):\n  " + "\n  ".join(problems)
            + f"\nThe adapter says it was trained on base model {base!r}: use that model as --source.")
    kernels.sort(key=lambda k: (k.layer, k.role))
    return LoraAdapter(Path(path), config, kernels, sorted(pairs))
