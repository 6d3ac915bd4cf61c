"""`translate`: port a LoRA from a source model to a target model.

check every input (before any model loads) -> run the transfer method (TRANSFERS[cfg.transfer]) -> write
its adapter and castlora.json atomically (a failed run leaves --out as it was).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ._version import __version__
from .adapters import PICKLE_NAMES, SAFETENSORS_NAME, read_adapter_folder
from .config import TranslateConfig, build, to_dict
from .errors import CastloraError
from .corpus import check_corpus_path, check_regular_file, read_prompts
from .families import UnsupportedArchitectureError, family_for
from .hub import hub_offline, push_folder, resolve_adapter
from .input_checks import check_output_path
from .models import check_model_path, local_model_type
from .pair import parse_device_map
from .safe_io import atomic_folder, write_text_atomic
from .teacher_cache import file_digest
from .transfers import TRANSFERS, AdapterFiles, PortInputs

logger = logging.getLogger("castlora")


@dataclass
class TranslateResult:
    out: Path
    record: dict


def check_inputs(cfg: TranslateConfig, log=logger.info) -> AdapterFiles:
    """Everything that can be checked before a model is loaded; returns the adapter, read once."""
    cfg.check_required()
    check_model_path(cfg.source, cfg.allow_pickle, "source model")
    check_model_path(cfg.target, cfg.allow_pickle, "target model")
    for what in ("source", "target"):  # an unsupported architecture fails before loading any weights
        model_type = local_model_type(getattr(cfg, what))
        if model_type is not None:
            try:
                family_for(model_type)
            except UnsupportedArchitectureError as e:
                raise UnsupportedArchitectureError(f"{what} model {getattr(cfg, what)}: {e}") from None
    for which in ("source", "target"):
        parse_device_map(cfg.device_map, which)

    folder = resolve_adapter(cfg.adapter, cfg.adapter_revision)
    config, tensors = read_adapter_folder(folder, cfg.allow_pickle, warn=log)
    for c in [*cfg.corpus, *cfg.strength_corpus]:
        check_corpus_path(str(c))
    for p in cfg.prompts:
        check_regular_file(p, "prompts file")
    out = Path(cfg.out)
    check_output_path(out, {"--adapter": folder, "--source": cfg.source, "--target": cfg.target,
                            **{f"--corpus {c}": c for c in cfg.corpus},
                            **{f"--strength-corpus {c}": c for c in cfg.strength_corpus},
                            **{f"--prompts {p}": p for p in cfg.prompts},
                            **({"--teacher-cache": cfg.teacher_cache} if cfg.teacher_cache else {})})
    if (out.exists() or out.is_symlink()) and not (cfg.overwrite or cfg.resume):
        raise CastloraError(f"output folder {out} already exists: choose another --out or pass --overwrite")
    if cfg.resume and out.exists() and not workdir_of(out).exists():
        raise CastloraError(f"{out} is complete and there is no interrupted run to resume; "
                            "pass --overwrite instead of --resume to redo it")
    return AdapterFiles(folder, config, tensors, _weights_digest(folder))


def workdir_of(out: Path) -> Path:
    """Where an unfinished run keeps its checkpoints and start: beside --out, never inside an input."""
    return out.with_name(f".{out.name}.castlora-work")


def _weights_digest(folder: Path) -> str:
    """sha256 of the adapter's weights file (safetensors, or the pickle the user allowed)."""
    for name in (SAFETENSORS_NAME, *PICKLE_NAMES):
        if (folder / name).is_file():
            return file_digest(folder / name)
    return ""


def translate(source: str = "", adapter: str = "", target: str = "", corpus: list | str = (), out: str = "",
              config: TranslateConfig | None = None, log=None, hub_api=None, **options) -> TranslateResult:
    """Port the LoRA in `adapter` (trained on `source`) to `target`; write a PEFT adapter to `out`.

    Options are the fields of TranslateConfig (steps, teacher, transfer, ...); `config` gives them all at once.
    `hub_api`: what --push-to-hub uploads through (default: huggingface_hub.HfApi()).
    """
    log = log or logger.info
    given = dict(source=source, adapter=adapter, target=target, out=out,
                 corpus=[corpus] if isinstance(corpus, (str, Path)) else list(corpus), **options)
    given = {k: str(v) if isinstance(v, Path) else v for k, v in given.items() if v not in ("", [], ())}
    cfg = build(TranslateConfig, to_dict(config) if config else None, given)
    adapter_files = check_inputs(cfg, log)
    if cfg.push_to_hub and hub_api is None and hub_offline():  # before the work, not after it
        raise CastloraError(f"--push-to-hub {cfg.push_to_hub}: HF_HUB_OFFLINE is set; unset it to upload, or drop "
                            "--push-to-hub and upload the folder later")
    given_cfg, cfg = cfg, cfg.resolved(accelerator=torch.cuda.is_available())
    if cfg.prompts and given_cfg.lr == "auto":
        log(f"--lr auto with --prompts{' and --transfer labels' if cfg.transfer == 'labels' else ''}: {cfg.lr:g}")
    if cfg.device != "cpu":
        log(f"device: {cfg.device}")
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    workdir = workdir_of(out)
    prompts = read_prompts(cfg.prompts) if cfg.prompts else []  # a broken file fails here, before any model
    if prompts and cfg.transfer == "cast":
        log("with --prompts, --transfer labels (a LoRA trained on the source's answers to them) ported better than "
            "CAST on every exact-match cell measured (docs/results.md)")

    port = TRANSFERS[cfg.transfer](PortInputs(cfg, adapter_files, prompts, workdir, log))

    record = {"castlora_version": __version__, "transfer": cfg.transfer, "source": cfg.source,
              "target": cfg.target, "adapter": cfg.adapter, "config": to_dict(cfg), **port.record,
              "versions": versions(), "hardware": {"device": cfg.device, "platform": platform.platform(),
                                                   "threads": torch.get_num_threads()}}
    with atomic_folder(out, overwrite=cfg.overwrite or cfg.resume) as tmp:
        export = port.write(tmp) or {}
        record.update(export)
        record["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        write_text_atomic(tmp / "castlora.json", json.dumps(record, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)
    log(f"wrote {out} ({', '.join(port.files)}) in {record['wall_seconds']} s")
    if cfg.push_to_hub:
        log(f"pushed to {cfg.push_to_hub}: {push_folder(out, cfg.push_to_hub, hub_api)}")
    return TranslateResult(out, record)


def versions() -> dict:
    """The versions a port was made with (castlora.json)."""
    import peft
    import transformers

    return {"castlora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}
