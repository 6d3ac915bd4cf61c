"""Read a PEFT LoRA folder and map each adapted module to the (layer, role) sites of its base model.

A module that is fused on the source (GPT-NeoX `query_key_value`) carries one LoRA whose B rows
cover q, k and v at once; castlora splits it into one kernel per role (the rows of that role), so
every later stage deals with plain (layer, role) kernels.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import AdapterMismatchError, CastloraError, CastloraWarning
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


def read_adapter_folder(path: str | Path, allow_pickle: bool = False,
                        warn=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the LoRA tensors of a PEFT folder (safetensors; pickle only if allowed),
    checked by check_adapter (a CastloraError on a broken adapter). Its warnings go to `warn(message)`,
    or to warnings.warn(CastloraWarning) when no `warn` is given."""
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
    tensors = load_tensors(weights, allow_pickle=allow_pickle)
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CastloraError(f"{weights} does not hold a name -> tensor mapping: it is not a PEFT adapter's "
                            "weights file; save the adapter again with peft's save_pretrained")
    for message in check_adapter(config, tensors, where=path):
        if warn is not None:
            warn(message)
        else:
            warnings.warn(message, CastloraWarning, stacklevel=2)
    return config, tensors


HUGE_DELTA_NORM = 1e4  # |scale * B @ A| (Frobenius) above this: a warning (a trained LoRA's is ~0.1-10)
# above this no forward pass survives it (activations overflow a few layers on, and the port comes out empty):
# an error, before any model loads
BROKEN_DELTA_NORM = 1e8
_F32_MAX = torch.finfo(torch.float32).max
_REDO = "save the adapter again with peft's save_pretrained"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _regex_error(pattern) -> str | None:
    if not isinstance(pattern, str):
        return f"{pattern!r} is not a string"
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        return f"{pattern!r} is not a valid regular expression ({e})"
    return None


def _check_config(config, where: str) -> None:
    """The adapter_config.json fields castlora relies on; a CastloraError naming the first bad one."""
    def bad(msg: str, todo: str = f"fix adapter_config.json or {_REDO}"):
        raise CastloraError(f"{where}: {msg}; {todo}")

    if not isinstance(config, dict):
        bad(f"adapter_config.json holds a JSON {type(config).__name__}, not an object")
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        bad(f"peft_type {peft_type!r} is not a LoRA", "castlora ports LoRA adapters only")
    if config.get("use_dora"):
        bad("DoRA adapters are not supported (use_dora=true)", "port a plain LoRA (use_dora=false)")
    if config.get("modules_to_save"):
        bad(f"modules_to_save {config['modules_to_save']!r}: full copies of modules cannot be ported, only "
            "LoRA A/B matrices", "train the adapter without modules_to_save")
    if "r" not in config:
        bad("no rank r")
    if not _is_int(config["r"]) or config["r"] <= 0:
        bad(f"r must be a positive integer, not {config['r']!r}")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        bad(f"lora_alpha must be a finite number, not {config['lora_alpha']!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if err := _regex_error(targets):
            bad(f"target_modules {err}")
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        bad(f"target_modules must be a module name list or a regular expression, not {targets!r}")
    exclude = config.get("exclude_modules")
    if exclude is not None and not isinstance(exclude, (str, list)):
        bad(f"exclude_modules must be a list or a regular expression, not {exclude!r}")
    if isinstance(exclude, str) and (err := _regex_error(exclude)):
        bad(f"exclude_modules {err}")
    if isinstance(exclude, list) and not all(isinstance(x, str) for x in exclude):
        bad(f"exclude_modules must list module names, not {exclude!r}")
    for name, ok, want in (("rank_pattern", lambda v: _is_int(v) and v > 0, "a positive integer"),
                           ("alpha_pattern", _is_number, "a finite number")):
        pattern = config.get(name)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            bad(f"{name} must be an object (module pattern -> value), not {pattern!r}")
        for key, value in pattern.items():
            if err := _regex_error(key):
                bad(f"{name} key {err}")
            if not ok(value):
                bad(f"{name}[{key!r}] must be {want}, not {value!r}")
    layers = config.get("layers_to_transform")
    if layers is not None and not (_is_int(layers) or (isinstance(layers, list) and all(map(_is_int, layers)))):
        bad(f"layers_to_transform must be a layer index or a list of them, not {layers!r}")
    lp = config.get("layers_pattern")
    if lp is not None:
        for pat in [lp] if isinstance(lp, str) else lp if isinstance(lp, list) else [lp]:
            if err := _regex_error(pat):
                bad(f"layers_pattern {err}")


def _pattern_value(patterns: dict | None, module_path: str):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return None


def _targeted(config: dict, key: str) -> bool:
    """Whether peft would have put a LoRA on module `key` under this config (peft's own matching rules)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{x}") for x in exclude):
            return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, key) is not None
    if "all-linear" in targets or key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = config.get("layers_pattern")
    if not pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for pat in [pattern] if isinstance(pattern, str) else pattern:
            if m := re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", key):
                break
    if not m:
        return False
    return int(m["idx"]) == layers if isinstance(layers, int) else int(m["idx"]) in layers


def _names(items, n: int = 6) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def check_adapter(config: dict, tensors: dict[str, torch.Tensor], where: str | Path | None = None,
                  huge_norm: float = HUGE_DELTA_NORM) -> list[str]:
    """Check a PEFT LoRA's config and tensors before any model loads; return warnings, raise on errors.

    Raises CastloraError (AdapterMismatchError for a lora_A without its lora_B or the reverse) when
    the config is not a JSON object or has a bad r / lora_alpha / target_modules / peft_type / pattern,
    is a DoRA or has modules_to_save; when a LoRA tensor's module is not one target_modules (and
    layers_to_transform) selects; when a module's rank is not r (or its rank_pattern), its A and B do
    not fit, or a weight is NaN/inf; when a module's delta scale * B @ A overflows float32.
    Returns a warning for each module whose delta is huge (Frobenius norm above `huge_norm`).
    Tensors that are not LoRA A/B weights are left to load_adapter.
    """
    where = str(where) if where is not None else "adapter"
    _check_config(config, where)
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m:
            pairs.setdefault(m["path"], {})[m["ab"]] = (key, t)
    if not pairs:
        raise CastloraError(f"{where}: the weights hold no LoRA tensors (no *.lora_A.weight / *.lora_B.weight); "
                            f"it is not a LoRA adapter, or {_REDO}")

    untargeted = [p for p in pairs if not _targeted(config, p)]
    if untargeted:
        raise CastloraError(
            f"{where}: tensors of modules that target_modules {config['target_modules']!r}"
            + (f" with layers_to_transform {config['layers_to_transform']!r}" if config.get("layers_to_transform")
               not in (None, []) else "")
            + f" does not select: {_names(untargeted)}; the config does not describe these weights: fix "
            f"target_modules in adapter_config.json or {_REDO}")
    halves = [f"{p}: has lora_{'A' if 'B' in ab else 'B'} missing" for p, ab in pairs.items() if set(ab) != {"A", "B"}]
    if halves:
        raise AdapterMismatchError(f"{where}: {'; '.join(sorted(halves)[:6])}; the weights file is incomplete: "
                                   f"{_REDO}")

    warns: list[str] = []
    for mpath, ab in sorted(pairs.items()):
        (a_key, A), (b_key, B) = ab["A"], ab["B"]
        for key, t in ((a_key, A), (b_key, B)):
            if t.dim() != 2:
                raise CastloraError(f"{where}: {key} has shape {tuple(t.shape)}, not a 2-D matrix: castlora ports "
                                    "LoRAs of linear layers only")
            if t.is_complex():
                raise CastloraError(f"{where}: {key} has dtype {t.dtype}, not real numbers; {_REDO}")
            finite = torch.isfinite(t.double())
            if not bool(finite.all()):
                raise CastloraError(f"{where}: {key} holds {int((~finite).sum())} NaN/inf value(s): the adapter is "
                                    "broken (a diverged training run?); use a checkpoint from before it diverged")
        rank = A.shape[0]
        if B.shape[1] != rank:
            raise CastloraError(f"{where}: {mpath}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit "
                                f"(A's rows must equal B's columns); {_REDO}")
        want = _pattern_value(config.get("rank_pattern"), mpath) or config["r"]
        if rank != want:
            src = "rank_pattern" if _pattern_value(config.get("rank_pattern"), mpath) else "r"
            raise CastloraError(f"{where}: {mpath} has rank {rank} but adapter_config.json says {src}={want}; "
                                f"fix r/rank_pattern in adapter_config.json or {_REDO}")
        alpha = _pattern_value(config.get("alpha_pattern"), mpath)
        alpha = float(alpha if alpha is not None else config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        A64, B64 = A.double(), B.double()
        fro2 = float(((B64.T @ B64) * (A64 @ A64.T)).sum().clamp_min(0))  # |B A|_F^2 = tr(B'B AA'), r x r only
        norm = abs(scale) * math.sqrt(fro2) if math.isfinite(fro2) else math.inf
        if not math.isfinite(norm) or norm > _F32_MAX:
            raise CastloraError(f"{where}: {mpath}: the LoRA delta scale*B@A overflows float32 (norm {norm:.3g}): "
                                "the adapter is broken; use a checkpoint from before it diverged")
        if norm > BROKEN_DELTA_NORM:
            raise CastloraError(f"{where}: {mpath}: the LoRA delta |scale*B@A| is {norm:.3g}, above "
                                f"{BROKEN_DELTA_NORM:g} (a trained LoRA's is about 0.1-10): the adapter is broken; "
                                "use a checkpoint from before it diverged")
        if norm > huge_norm:
            warns.append(f"{where}: {mpath}: the LoRA delta |scale*B@A| is huge ({norm:.3g}, above {huge_norm:g}): "
                         "the adapter may be broken; check it on its source model before porting")
    return warns


def _alpha_for(module_path: str, config: dict, rank: int) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


def load_adapter(path: str | Path, sites: ModelSites, allow_pickle: bool = False,
                 files: tuple[dict, dict[str, torch.Tensor]] | None = None) -> LoraAdapter:
    """Load a PEFT LoRA folder and split it into per-site kernels of the model described by `sites`.
    `files`: the folder's (config, tensors) when read_adapter_folder has read them already."""
    config, tensors = files if files is not None else read_adapter_folder(path, allow_pickle)
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
