"""Fold the heads into a plain LoRA on the target and write it through peft's own API.

With linear heads the ported delta at a site is exactly rank r:
    s * P_out (core (P_in x))  =  B_T A_T x   with  A_T = core @ P_in,  B_T = s * P_out,
and rank r + k with --extra-rank k (the free directions' rows below A_T, their columns beside B_T).
Several kernels can land on one target module (a fused module hosting q and v, or two source
layers mapped to one target layer): their A_T are stacked and their B_T placed side by side in
the rows of their roles, so the module's LoRA rank is the sum of theirs. Every module is padded
with zeros to one common rank (an exact no-op) so that any LoRA server can load the adapter;
lora_alpha = r makes peft's scaling 1, the LoRA scale living in B_T.
Non-linear heads are exported by a reduced-rank least-squares fit on the target's activations at every
real position of the calibration batches.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from .cast_module import PortedKernel
from .families import Site
from .capture import capture
from .closed_form import STATS_BUDGET_BYTES, Fit, port_groups
from .heads import LinearHead, reduced_rank_from_stats
from ._version import __version__


def port_factors(port: PortedKernel, fit: Fit | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A_T, B_T, relative fit error) of one port; exact (error 0) for linear heads. Non-linear heads
    need `fit`: the statistics of (site input, ported delta) pairs (delta_fits)."""
    with torch.no_grad():
        if is_linear(port):
            A = port.core @ port.p_in.weight
            B = port.scale * port.p_out.weight
            return A.float().cpu(), B.float().cpu(), 0.0
        if fit is None:
            raise ValueError("non-linear heads need target activations to be exported (delta_fits)")
        A, B, err = reduced_rank_from_stats(fit.g[0], fit.c[0], fit.yy[0], port.rank)
        return A.cpu(), B.cpu(), err


def is_linear(port: PortedKernel) -> bool:
    return isinstance(port.p_in, LinearHead) and isinstance(port.p_out, LinearHead)


def fit_bytes(port: PortedKernel) -> int:
    """The fp64 statistics delta_fits keeps for `port`: X^T X and X^T D."""
    d_in, d_out = port.p_in.linear_part().shape[1], port.p_out.linear_part().shape[0]
    return 8 * (d_in ** 2 + d_in * d_out)


@torch.no_grad()
def delta_fits(ports: list[tuple[PortedKernel, Site]], target, batches) -> list[Fit]:
    """Statistics of each port's delta as a function of its site's input, at every real target position
    of `batches` (PairBatch list), streamed: memory does not grow with the number of positions. The
    target runs as it is: inside `attached`, each site reads what the port reads at run time."""
    fits = [Fit() for _ in ports]
    for batch in batches:
        with capture(target, inputs=[site.path for _, site in ports]) as ct:
            target(input_ids=batch.ids_t, attention_mask=batch.mask_t)
        for (port, site), fit in zip(ports, fits):
            x = ct.inputs[site.path]
            x = x[batch.mask_t.to(x.device).bool()]  # real positions only, not padding
            fit.update(0, x, port(x.to(port.core.device)))
    return fits


def stack_factors(items: list[tuple[torch.Tensor, torch.Tensor, Site]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per target module path: (A: R x d_in, B: module_out x R) from per-site (A, B, site) factors.
    Kernels on one module are stacked; a fused site's B fills only its role's rows."""
    per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor, Site]]] = {}
    for A, B, site in items:
        per_module.setdefault(site.path, []).append((A, B, site))
    out = {}
    for path, group in per_module.items():
        A = torch.cat([a for a, _, _ in group], 0)
        Bm = torch.zeros(group[0][2].module_out, A.shape[0])
        col = 0
        for a, b, site in group:
            rows = torch.arange(site.module_out) if site.rows is None else site.rows
            Bm[rows, col:col + a.shape[0]] = b
            col += a.shape[0]
        out[path] = (A, Bm)
    return out


def module_factors(ports: list[tuple[PortedKernel, Site]], target=None, batches=(),
                   budget: int = STATS_BUDGET_BYTES):
    """Per target module path: (A, B) of all ports on it, and the fit error per port. Non-linear heads
    are fitted on `target`'s activations over `batches` (delta_fits), in groups of ports whose
    statistics fit in `budget` bytes, one pass over the batches per group."""
    done: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
    nonlinear = [i for i, (port, _) in enumerate(ports) if not is_linear(port)]
    if nonlinear and (target is None or not batches):
        raise ValueError("non-linear heads need target activations to be exported: pass target and batches")
    for group in port_groups([ports[i] for i in nonlinear], budget, fit_bytes):
        sub = [ports[nonlinear[j]] for j in group]
        for j, fit in zip(group, delta_fits(sub, target, batches)):
            done[nonlinear[j]] = port_factors(ports[nonlinear[j]][0], fit)
    items, errors = [], {}
    for i, (port, site) in enumerate(ports):
        A, B, err = done[i] if i in done else port_factors(port)
        errors[f"{port.source_key}->{port.target_key}"] = err
        items.append((A, B, site))
    return stack_factors(items), errors


ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The values vLLM accepts for --max-lora-rank, and its default.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16


def short_target_modules(model, paths) -> list[str]:
    """target_modules for a LoraConfig that selects exactly the modules at `paths` in `model`: their last
    names (["q_proj", "v_proj"]) when those select no other module the way peft matches a list (a module
    whose name is the key or ends with "." + key), else the full paths. Sorted either way."""
    paths = set(paths)
    short = {p.rsplit(".", 1)[-1] for p in paths}
    selected = {name for name, _ in model.named_modules() if name and name.rsplit(".", 1)[-1] in short}
    return sorted(short) if selected == paths else sorted(paths)


def export_peft(target, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], out_dir: str | Path,
                transposed: bool = False, base_model_name: str | None = None,
                provenance: dict | None = None):
    """Write `factors` as a PEFT LoRA adapter for `target` into out_dir; returns the target unwrapped.

    Uses get_peft_model + the LoRA layers' own parameters + save_pretrained: no key is written by
    hand, so the folder is exactly what peft itself would save for this target. The config has
    task_type CAUSAL_LM, target_modules as short names where they select exactly the ported modules
    (short_target_modules), and base_model_name_or_path exactly as given (a hub id stays a hub id).
    The weights file carries castlora's provenance as safetensors metadata (add_safetensors_metadata)
    and README.md is a model card (write_model_card). `provenance` (all optional): source_model,
    source_adapter, method, steps, held_out_kl, truncation (truncate_factors' report), tags.
    """
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    rank = max(a.shape[0] for a, _ in factors.values())
    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
                        target_modules=short_target_modules(target, factors), fan_in_fan_out=transposed,
                        init_lora_weights=False)
    peft_model = get_peft_model(target, config)
    try:
        with torch.no_grad():
            for path, (A, B) in factors.items():
                layer = peft_model.base_model.model.get_submodule(path)
                for lin, value in ((layer.lora_A["default"], A), (layer.lora_B["default"], B)):
                    w = lin.weight
                    full = torch.zeros(w.shape, dtype=w.dtype)  # zero-padded to the common rank
                    full[tuple(slice(0, n) for n in value.shape)] = value.to(w.dtype)
                    # Offloaded modules get their LoRA on the meta device: give it real storage.
                    dev = torch.device("cpu") if w.device.type == "meta" else w.device
                    lin.weight = torch.nn.Parameter(full.to(dev), requires_grad=False)
        peft_config = peft_model.peft_config["default"]
        if base_model_name:
            peft_config.base_model_name_or_path = str(base_model_name)
        # save_embedding_layers=False: no embedding is targeted, and "auto" would look the base model up
        # on the hub to see whether its vocabulary was resized.
        peft_model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False)
        base = peft_config.base_model_name_or_path
    finally:
        target = peft_model.unload()
    _sort_target_modules(out_dir / ADAPTER_CONFIG)
    info = {**(provenance or {}), "base_model": base, "exported_rank": rank}
    add_safetensors_metadata(out_dir / ADAPTER_WEIGHTS, provenance_metadata(info))
    write_model_card(out_dir, info)
    return target


def _sort_target_modules(path: Path) -> None:
    """peft keeps target_modules as a set and writes it in hash order, which changes from run to run:
    write it sorted, so that one export gives one file."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            Path(tmp).write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def provenance_metadata(info: dict) -> dict[str, str]:
    """safetensors metadata (str -> str) from `info`: castlora_version, and each of base_model,
    source_model, source_adapter, method, steps, held_out_kl, exported_rank, truncation that is given
    (JSON for what is not a string). A `transfer` key is read as `method`."""
    info = dict(info)
    if "method" not in info and "transfer" in info:
        info["method"] = info.pop("transfer")
    meta = {"castlora_version": str(info.get("castlora_version") or __version__)}
    for key in ("base_model", "source_model", "source_adapter", "method", "steps", "held_out_kl",
                "exported_rank", "truncation"):
        value = info.get(key)
        if value is not None:
            meta[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    return meta


def add_safetensors_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Add `metadata` to the header of the safetensors file at `path` (keeping what it has, "format": "pt"
    included). The file is rewritten into a temporary file in the same folder and renamed over it, so
    it is never seen half written."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        merged = {**(f.metadata() or {}), **{str(k): str(v) for k, v in metadata.items()}}
    merged.setdefault("format", "pt")
    tensors = load_file(str(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=merged)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _kl_text(kl) -> str:
    if kl is None:
        return "not measured"
    if isinstance(kl, dict):
        start, end = kl.get("start"), kl.get("end")
        if isinstance(start, (int, float)) and isinstance(end, (int, float)):
            text = f"{start:.4g} before training, {end:.4g} after"
            return text + (f" (on {kl['text']})" if kl.get("text") else "")
        return json.dumps(kl, default=str)
    return f"{kl:.4g}" if isinstance(kl, (int, float)) else str(kl)


def write_model_card(folder: str | Path, info: dict) -> Path:
    """Write folder/README.md: a Hugging Face model card (huggingface_hub.ModelCard) for a ported adapter.

    Metadata: base_model, library_name peft, pipeline_tag text-generation, tags (castlora, lora, peft,
    plus info["tags"]). Body: source model and adapter, method, training steps, held-out KL, rank,
    castlora version, and how to load it. `info` keys, all optional: base_model, source_model,
    source_adapter, method (or transfer), steps, held_out_kl (a number, or translate's
    {"start", "end", "text"}), exported_rank, truncation ({module: relative error}), castlora_version, tags.
    Returns the card's path; written atomically (temporary file + rename)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    base = info.get("base_model") or None
    method = info.get("method") or info.get("transfer")
    version = info.get("castlora_version") or __version__
    rank = info.get("exported_rank")
    tags = ["castlora", "lora", "peft"] + [t for t in info.get("tags", ()) if t not in ("castlora", "lora", "peft")]
    data = ModelCardData(base_model=str(base) if base else None, library_name="peft",
                         pipeline_tag="text-generation", tags=tags)

    def cell(v) -> str:
        return "unknown" if v is None or v == "" else f"`{v}`"

    rows = [("Base (target) model", cell(base)), ("Source model", cell(info.get("source_model"))),
            ("Source adapter", cell(info.get("source_adapter"))), ("Method", cell(method)),
            ("Training steps", "unknown" if info.get("steps") is None else str(info["steps"])),
            ("Held-out KL to the source", _kl_text(info.get("held_out_kl"))),
            ("LoRA rank", "unknown" if rank is None else str(rank)), ("castlora version", f"`{version}`")]
    truncation = info.get("truncation") or {}
    cut = {k: v for k, v in truncation.items() if v}
    lines = [
        f"# LoRA adapter for {base or 'its base model'}, ported by castlora",
        "",
        f"This adapter was ported by castlora {version} from the "
        f"LoRA {cell(info.get('source_adapter'))} of {cell(info.get('source_model'))} to "
        f"{cell(base)}{f' with the {method} method' if method else ''}. It is a standard PEFT LoRA: "
        "no castlora code is needed to use it.",
        "",
        "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows],
        "",
    ]
    if cut:
        worst = max(cut.values())
        lines += [f"The rank was truncated by SVD on {len(cut)} module(s); the largest relative Frobenius "
                  f"error of a truncated delta is {worst:.4g}.", ""]
    lines += ["## Use", "", "```python", "from peft import AutoPeftModelForCausalLM", "",
              'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/adapter")', "```", ""]
    warning = rank_warning(rank) if isinstance(rank, int) else None
    if warning:
        lines += [f"vLLM: {warning}.", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = folder / "README.md"
    fd, tmp = tempfile.mkstemp(prefix=".README.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        Path(tmp).write_text(str(card), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@torch.no_grad()
def truncate_factors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], max_rank: int
                     ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """(--max-rank) Each module whose rank (rows of A) exceeds max_rank, replaced by the best rank-max_rank
    approximation of its delta B @ A (Eckart-Young: the top max_rank singular directions), the singular
    values split evenly between the factors (A_R = sqrt(S) V^T, B_R = U sqrt(S)). Computed in float64
    through QR of the factors, so the full d_out x d_in delta is never formed; returned in A's and B's dtypes.
    Modules within the cap are returned as they are. report[module] = ||delta - delta_R||_F / ||delta||_F
    (0.0 for modules not truncated, and for a zero delta)."""
    if max_rank < 1:
        from .errors import CastloraError
        raise CastloraError(f"--max-rank must be >= 1, not {max_rank}")
    out, report = {}, {}
    for path, (A, B) in factors.items():
        if A.shape[0] <= max_rank:
            out[path], report[path] = (A, B), 0.0
            continue
        qb, rb = torch.linalg.qr(B.double())      # B = qb rb
        qa, ra = torch.linalg.qr(A.double().T)    # A^T = qa ra, so B A = qb (rb ra^T) qa^T
        u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
        k = min(max_rank, s.numel())
        root = s[:k].sqrt()
        a_r = root[:, None] * (qa @ vh.T)[:, :k].T
        b_r = (qb @ u)[:, :k] * root
        total = float(s.square().sum())
        report[path] = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
        out[path] = (a_r.to(A.dtype), b_r.to(B.dtype))
    return out, report


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that serves `rank`; None above vLLM's largest (512)."""
    return next((v for v in VLLM_LORA_RANKS if v >= rank), None)


def rank_warning(rank: int) -> str | None:
    """None when vLLM serves an adapter of this rank with its defaults (rank <= 16), else what to do."""
    if rank <= VLLM_DEFAULT_MAX_LORA_RANK:
        return None
    cap = vllm_max_lora_rank(rank)
    if cap is None:
        return (f"the exported LoRA rank {rank} exceeds {VLLM_LORA_RANKS[-1]}, the largest --max-lora-rank "
                f"vLLM accepts: vLLM cannot serve it; re-export with --max-rank {VLLM_LORA_RANKS[-1]} or lower")
    return (f"the exported LoRA rank {rank} exceeds vLLM's default --max-lora-rank "
            f"{VLLM_DEFAULT_MAX_LORA_RANK}: serve it with --max-lora-rank {cap} (or re-export with "
            f"--max-rank {VLLM_DEFAULT_MAX_LORA_RANK})")


def serving_problems(folder: str | Path, max_lora_rank: int = VLLM_LORA_RANKS[-1]) -> list[str]:
    """What keeps vLLM from serving the adapter in `folder` with --max-lora-rank `max_lora_rank` (by default
    the largest it accepts, 512), one sentence each; [] when nothing does. vLLM's published constraints:
    a LoRA (peft_type LORA) whose tensors are only lora_A / lora_B weights, rank <= max_lora_rank,
    bias "none", no modules_to_save, no DoRA (use_dora)."""
    from safetensors import safe_open

    folder = Path(folder)
    problems: list[str] = []
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        return [f"{folder} has no {ADAPTER_CONFIG}"]
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"{config_path} is not readable JSON ({e})"]
    if max_lora_rank not in VLLM_LORA_RANKS:
        problems.append(f"vLLM accepts --max-lora-rank only in {list(VLLM_LORA_RANKS)}, not {max_lora_rank}")
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')}: vLLM serves LoRA adapters only")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias is {cfg.get('bias')!r}: vLLM needs bias 'none' (LoRA biases are not served)")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save is {cfg['modules_to_save']}: vLLM supports only modules_to_save None")
    if cfg.get("use_dora"):
        problems.append("use_dora is true: vLLM does not support DoRA")
    ranks = [int(cfg.get("r", 0))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank:
        problems.append(f"LoRA rank {max(ranks)} is greater than --max-lora-rank {max_lora_rank}")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if not (folder / "adapter_model.bin").is_file():
            problems.append(f"{folder} has no {ADAPTER_WEIGHTS}")
        return problems
    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is a problem to report
        return problems + [f"{weights} is not a readable safetensors file ({e})"]
    other = sorted(k for k in shapes if not (".lora_A." in k or ".lora_B." in k) or not k.endswith(".weight"))
    if other:
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        problems.append(f"tensors other than lora_A / lora_B weights: {', '.join(other[:3])}{more}")
    tensor_rank = max([s[0] for k, s in shapes.items() if ".lora_A." in k and s]
                      + [s[-1] for k, s in shapes.items() if ".lora_B." in k and s] + [0])
    if tensor_rank > max_lora_rank and tensor_rank > max(ranks):
        problems.append(f"a LoRA tensor has rank {tensor_rank}, greater than --max-lora-rank {max_lora_rank}")
    return problems
