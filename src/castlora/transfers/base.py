"""What every transfer method takes and returns, and the registry they add themselves to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import TranslateConfig


@dataclass
class AdapterFiles:
    """The source adapter, read once: its folder, adapter_config.json, tensors and their digest."""
    folder: Path
    config: dict
    tensors: dict
    digest: str


@dataclass
class PortInputs:
    cfg: TranslateConfig  # resolved: no "auto" left
    adapter: AdapterFiles
    prompts: list[str]  # the task's prompts (--prompts), [] when data-free
    workdir: Path  # checkpoints and the resumable start of this --out
    log: Callable[[str], None] = print


@dataclass
class Port:
    record: dict  # castlora.json, less what translate adds (versions, wall time)
    write: Callable[[Path], None]  # writes the adapter files into a (temporary) folder
    files: list[str] = field(default_factory=list)  # what `write` writes, for the log


TRANSFERS: dict[str, Callable[[PortInputs], Port]] = {}


def adapter_writer(inp: PortInputs, target, factors: dict, transposed: bool, record: dict, extra=None):
    """(record fields, write): the ported factors as a PEFT adapter for `target`, first truncated to
    --max-rank where the user caps the rank (two source layers folded into one target layer add their ranks)."""
    from ..export import export_peft, rank_warning, truncate_factors

    cfg, fields_ = inp.cfg, {}
    if cfg.max_rank:
        factors, report = truncate_factors(factors, cfg.max_rank)
        fields_["truncation_error"] = {k: round(v, 6) for k, v in report.items()}
        worst = max(report.values(), default=0.0)
        inp.log(f"--max-rank {cfg.max_rank}: {sum(v > 0 for v in report.values())} modules truncated, largest "
                f"relative error {worst:.4f}")
    rank = max(a.shape[0] for a, _ in factors.values())
    fields_["exported_rank"] = rank
    if (warning := rank_warning(rank)):
        inp.log(f"warning: {warning}")

    def write(folder: Path) -> None:
        export_peft(target, factors, folder, transposed, base_model_name=cfg.target, provenance={
            "source_model": cfg.source, "source_adapter": cfg.adapter, "method": cfg.transfer, "steps": cfg.steps,
            "held_out_kl": record.get("held_out_kl"), "truncation": fields_.get("truncation_error")})
        if extra:
            extra(folder)

    return fields_, write


def register_transfer(name: str):
    def add(fn):
        TRANSFERS[name] = fn
        return fn
    return add
