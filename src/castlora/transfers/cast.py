"""CAST: the source LoRA as a frozen kernel seen through learned projection heads (docs/method.md).

The pipeline, one stage per function, in the order `port_cast` runs them:
load the pair -> build the batches -> map the sites and build the ports -> start the heads -> choose the
teacher -> train -> export.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file

from ..cast_module import PortedKernel, attached
from ..closed_form import fit_closed_form, random_init, zero_output_heads
from ..corpus import read_corpus
from ..errors import CastloraError, CorpusError
from ..export import module_factors
from ..pair import ModelPair, load_pair
from ..site_map import cka_layer_map, map_sites, proportional_layer_map, residual_streams
from ..start_scale import scale_output_heads, set_output_scale
from ..teacher_cache import TeacherCache, text_digest
from ..teacher_choice import choose_teacher, strength_budget, strength_texts
from ..teachers import make_teacher
from ..texts import training_texts
from ..tokens import PairBatch, SharedVocab, encode_pair, shared_vocab
from ..train import LoopConfig, fit_heads, held_out_kl
from .base import Port, PortInputs, adapter_writer, register_transfer

# below this share of source positions on common boundaries the KL has too little to compare
MIN_ALIGNED_FRACTION = 0.2
# the options that change a run's result, beside its inputs: a --resume with any of them changed is refused (steps
# too: the training stream and the lr schedule are laid out for the whole run)
RESULT_OPTIONS = ("steps", "batch_size", "seq_len", "lr", "init", "head", "layer_map", "beta", "temperature", "backoff",
                  "calib_batches", "teacher", "delta_weight", "teacher_lora", "objective", "generate", "top_k",
                  "generate_batch_size", "dtype", "amp", "seed")


@dataclass
class Batches:
    make: Callable[[int], PairBatch]  # the training batch of a step (a pure function of the step)
    calib: list[PairBatch]  # held out of training: closed-form fit, start scale
    held: list[PairBatch]  # where the start and the end are judged (calib, or samples from --prompts)
    vocab: SharedVocab
    aligned_fraction: float


@register_transfer("cast")
def port_cast(inp: PortInputs) -> Port:
    cfg, log = inp.cfg, inp.log
    docs = read_corpus(cfg.corpus)  # empty, unreadable or non-UTF-8 text fails before any model loads
    strength_docs = read_corpus(cfg.strength_corpus) if cfg.strength_corpus else []
    run = check_resume(inp, docs)

    log(f"loading {cfg.source} and {cfg.target}")
    pair, _, lora = load_pair(cfg, inp.adapter)
    text = training_texts(cfg, docs, pair.source, pair.tok_s, inp.adapter.digest, inp.prompts, log)
    batches = build_batches(cfg, pair, text, log)
    site_pairs, layer_map, extra = build_ports(cfg, pair, lora, batches, log)
    init_info = start_heads(cfg, pair, batches)
    teacher_name, choice = choose(cfg, pair, strength_docs or docs, log)
    # CAST-0 trains nothing: its teacher (auto left unresolved) only names the held-out KL's reference
    teacher = make_teacher(teacher_name if teacher_name != "auto" else "source", cfg.delta_weight, cfg.teacher_lora)

    state, held_out, cache_info = None, None, None
    with attached(pair.target, pair.ports) as pair.wrappers:
        if cfg.steps > 0:
            open_workdir(inp, run)
            state, held_out, cache_info = train(inp, pair, batches, teacher, init_info)
        # Non-linear heads are exported by a least-squares fit on the target's activations as they run
        factors, fit_errors = module_factors(pair.ports, pair.target, batches.calib)

    record = {
        "source_family": pair.s_sites.family.name, "target_family": pair.t_sites.family.name,
        "layer_map": layer_map, "layer_map_kind": cfg.layer_map, **extra,
        "site_map": [p.describe() for p in site_pairs],
        "teacher": choice or {"teacher": teacher_name}, "init": init_info, "held_out_kl": held_out,
        "loss_curve": state.history if state else [],
        "corpus_tokens_seen": state.tokens_seen if state else 0,
        "train_seconds": round(state.seconds, 2) if state else 0,
        "alignment": {"calibration_aligned_fraction": round(batches.aligned_fraction, 4),
                      "shared_vocab": batches.vocab.size},
        "corpus_docs": len(docs), **text.info, "teacher_cache": cache_info, "export_fit_error": fit_errors,
    }
    ports = pair.ports

    def heads_and_log(folder: Path) -> None:
        save_file({f"{port.source_key}->{port.target_key}.{k}": v.detach().cpu().contiguous()
                   for port, _ in ports for k, v in port.state_dict().items()}, str(folder / "heads.safetensors"))
        # the final log comes from the loop's history: a resumed run lists every step once
        (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in record["loss_curve"]))

    fields_, write = adapter_writer(inp, pair.target, factors, pair.t_sites.family.transposed, record,
                                    heads_and_log)
    record.update(fields_)
    return Port(record, write, ["adapter_model.safetensors", "heads.safetensors", "castlora.json"])


def fingerprint(inp: PortInputs, docs: list[str]) -> dict:
    """What a resumable work folder belongs to: the inputs and every option that changes the result."""
    cfg = inp.cfg
    return {"source": cfg.source, "target": cfg.target, "adapter": inp.adapter.digest,
            "corpus": text_digest(docs), "prompts": text_digest(inp.prompts) if inp.prompts else None,
            **{k: getattr(cfg, k) for k in RESULT_OPTIONS}}


def check_resume(inp: PortInputs, docs: list[str]) -> dict:
    """--resume continues only the run its work folder belongs to (checked before any model loads). Returns
    this run's fingerprint, which `train` records when it starts a work folder."""
    now = fingerprint(inp, docs)
    if inp.cfg.resume and inp.workdir.exists():
        try:
            was = json.loads((inp.workdir / "run.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            raise CastloraError(f"{inp.workdir} holds no readable record of the run it belongs to: it cannot be "
                                "resumed; rerun with --overwrite instead of --resume") from None
        differs = [k for k in now if not isinstance(was, dict) or was.get(k) != now[k]]
        if differs:
            raise CastloraError(f"--resume: the interrupted run in {inp.workdir} had other "
                                f"{', '.join(differs)} than this one; rerun with its settings, or with --overwrite "
                                "to start over")
    return now


def open_workdir(inp: PortInputs, run: dict) -> None:
    """The work folder of a run that trains: kept when resuming, else started anew with the run's record."""
    if inp.cfg.resume and inp.workdir.exists():
        return
    if inp.workdir.exists():
        shutil.rmtree(inp.workdir)
    inp.workdir.mkdir(parents=True)
    (inp.workdir / "run.json").write_text(json.dumps(run))


def build_batches(cfg, pair: ModelPair, text, log) -> Batches:
    vocab = shared_vocab(pair.tok_s, pair.tok_t)
    max_len_t = int(cfg.seq_len * 1.5)  # the target tokenizer may need more tokens for the same text

    def make(step: int, pool=text.train):
        idx = [(step * cfg.batch_size + i) % len(pool) for i in range(cfg.batch_size)]
        return encode_pair([pool[i] for i in idx], pair.tok_s, pair.tok_t, cfg.seq_len, max_len_t)

    calib = [make(i, text.calib).to(cfg.device) for i in range(max(1, len(text.calib) // cfg.batch_size))]
    held = [make(i, text.held).to(cfg.device) for i in range(max(1, len(text.held) // cfg.batch_size))
            ] if text.held else calib
    n_aligned = sum(b.num_aligned for b in calib)
    n_src_tokens = sum(int(b.mask_s.sum()) for b in calib)
    frac = n_aligned / max(1, n_src_tokens)
    log(f"alignment: {n_aligned} of {n_src_tokens} source positions on common boundaries ({frac:.1%}); "
        f"shared vocabulary {vocab.size}")
    if frac < MIN_ALIGNED_FRACTION:
        raise CorpusError(f"only {frac:.1%} of source positions align with the target tokenizer "
                          f"({n_aligned} of {n_src_tokens}); castlora needs at least {MIN_ALIGNED_FRACTION:.0%}. "
                          "Use general text in a language and script both tokenizers cover")
    if vocab.size < 100:
        raise CorpusError(f"the two vocabularies share only {vocab.size} pieces: no usable KL signal")
    if len(text.train) < cfg.batch_size:
        raise CorpusError(f"the corpus yields {len(text.train)} training chunks of {cfg.seq_len} tokens, "
                          f"fewer than one batch ({cfg.batch_size})")
    return Batches(make, calib, held, vocab, frac)


def build_ports(cfg, pair: ModelPair, lora, batches: Batches, log):
    """The layer map (proportional depth, or CKA between residual streams), each source kernel's target
    site, and a PortedKernel per kernel on cfg.device (pair.ports)."""
    extra = {"cka": None}
    if cfg.layer_map == "cka":
        streams = residual_streams(pair.source, pair.source_inner, pair.target, pair.s_sites.layer_paths,
                                   pair.t_sites.layer_paths, batches.calib)
        layer_map, sim = cka_layer_map(*streams)
        extra["cka"] = [[round(v, 4) for v in row] for row in sim]
    else:
        layer_map = proportional_layer_map(pair.s_sites.num_layers, pair.t_sites.num_layers)
    site_pairs, dropped = map_sites(lora.kernels, pair.t_sites, layer_map, cfg.allow_drop)
    if not site_pairs:
        raise CastloraError("no adapter site could be ported to the target")
    for d in dropped:
        log(f"dropped {d['source']} ({d['source_module']}): {d['reason']}")
    pair.ports = [(PortedKernel(p.kernel, p.target, cfg.head).to(cfg.device), p.target) for p in site_pairs]
    log(f"porting {len(pair.ports)} kernels onto {len({s.path for _, s in pair.ports})} target modules; "
        f"{sum(p.numel() for port, _ in pair.ports for p in port.parameters())} head parameters")
    return site_pairs, layer_map, {**extra, "dropped": dropped}


def start_heads(cfg, pair: ModelPair, batches: Batches) -> dict:
    """The heads' start: the closed form (CAST-0), optionally with zero output heads, or random."""
    if cfg.init == "random":
        random_init(pair.ports, cfg.seed)
        return {"random_seed": cfg.seed}
    # The heads map between the *base* models' spaces: with the LoRA on, the source's activations
    # downstream of its first adapted layer carry the LoRA's own effect, which the base target
    # cannot predict (on llama->llama that alone made the fit miss the identity by >100%).
    with pair.source.disable_adapter():
        info, _ = fit_closed_form(pair.ports, pair.source_inner, pair.target,
                                  [p.source_module for p, _ in pair.ports], batches.calib, None, ())
    if cfg.init == "zero-delta":
        # Across families CAST-0's delta can point the wrong way (below the base); with the output heads at
        # zero the port starts at the target base and the input heads still read what the source LoRA reads.
        zero_output_heads(pair.ports)
        info["zero_output_heads"] = True
    return info


def choose(cfg, pair: ModelPair, docs: list[str], log) -> tuple[str, dict | None]:
    """--teacher auto: from the two base models alone (before the heads attach), the blend when the source
    base is the weaker model on held-out text, else the source teacher."""
    if cfg.teacher != "auto" or cfg.steps == 0:
        return cfg.teacher, None
    texts = strength_texts(docs, cfg.seed, strength_budget(cfg.steps, cfg.batch_size, cfg.seq_len))
    teacher, info = choose_teacher(pair.source, pair.tok_s, pair.target, pair.tok_t, texts, int(cfg.seq_len * 1.5))
    info["measured_on"] = "strength_corpus" if cfg.strength_corpus else "corpus"
    log(f"teacher: {teacher} (the source base spends {info['source_bits_per_byte']} bits per byte on "
        f"{len(texts)} documents of --{'strength-' if cfg.strength_corpus else ''}corpus, the target base "
        f"{info['target_bits_per_byte']})")
    return teacher, info


def train(inp: PortInputs, pair: ModelPair, batches: Batches, teacher, init_info: dict):
    """Scale the start on held-out text, train the heads, and keep the end only if it fits held-out text
    better than the start did. Returns (loop state, the held-out KLs, the teacher cache's counts)."""
    cfg, log, workdir = inp.cfg, inp.log, inp.workdir
    loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, beta=cfg.beta, temperature=cfg.temperature,
                      objective=cfg.objective, backoff=cfg.backoff, warmup=min(20, max(1, cfg.steps // 10)),
                      checkpoint_every=cfg.checkpoint_every, amp=cfg.amp, checkpointing=cfg.gradient_checkpointing)

    def held_out():
        return held_out_kl(pair, batches.held, batches.vocab, loop, teacher)

    start_file = workdir / "start.json"
    start = _read_start(start_file) if cfg.resume else None
    if start is not None:  # measured before the interrupt: same data, same start
        if "output_scale" in start:
            set_output_scale(pair.ports, start["output_scale"])
    else:
        with held_out() as kl_at:
            start = scale_output_heads(pair.ports, kl_at) if cfg.init == "scaled" else {}
            start["held_out_kl"] = kl_at()
        if not math.isfinite(start["held_out_kl"]):
            raise CastloraError(f"the start's KL to the teacher is {start['held_out_kl']} on held-out text: the "
                                f"teacher or the start holds non-finite values (check --temperature "
                                f"{cfg.temperature:g} and the adapter's weights)")
        start_file.write_text(json.dumps(start))
    init_info.update({k: v for k, v in start.items() if k != "held_out_kl"})
    if "output_scale" in start:
        log(f"start: output heads at {start['output_scale']:g} x the closed form (KL to the teacher by scale: "
            f"{start['start_kl']})")
    start_heads_ = [{k: v.detach().clone() for k, v in port.state_dict().items()} for port, _ in pair.ports]
    cache = None
    if cfg.teacher_cache:
        cache = TeacherCache(cfg.teacher_cache, {
            "source": str(cfg.source), "adapter": inp.adapter.digest,
            "target": str(cfg.target) if teacher.needs_target else None,
            "teacher": teacher.name, "delta_weight": teacher.weight if teacher.name == "blend" else None,
            "teacher_lora": cfg.teacher_lora, "position_weight": "uniform", "temperature": cfg.temperature,
            "dtype": cfg.dtype, "amp": cfg.amp,
            "vocab": text_digest([str(batches.vocab.ids_s.tolist()), str(batches.vocab.ids_t.tolist())]),
            "kernels": [p.source_module for p, _ in pair.ports] if cfg.beta > 0 else None}, cfg.teacher_top_k)
    with (workdir / "train_log.jsonl").open("a") as lf:
        state = fit_heads(pair, batches.make, batches.vocab, loop, teacher, workdir, cfg.resume,
                          log=lambda r: (lf.write(json.dumps(r) + "\n"), lf.flush()), progress=cfg.progress,
                          cache=cache)
    # Never export heads that fit held-out text worse than where training started. From an exact start (a
    # model and itself) Adam's normalised steps on near-zero gradients only walk away from it; across
    # families training lowers the held-out KL by half or more.
    with held_out() as kl_at:
        end_kl = kl_at()
    kept = "trained" if end_kl <= start["held_out_kl"] else "start"
    if kept == "start":
        for (port, _), saved in zip(pair.ports, start_heads_):
            port.load_state_dict(saved)
        log(f"training raised the held-out KL ({start['held_out_kl']:.5g} -> {end_kl:.5g}): kept the start heads")
    held_out_info = {"start": start["held_out_kl"], "end": end_kl, "kept": kept,
                     "text": "samples from --prompts" if inp.prompts else "calibration (general) text"}
    cache_info = None
    if cache is not None:
        cache_info = {"teacher_cache": str(cfg.teacher_cache), "steps_read": cache.hits, "steps_computed": cache.misses}
        log(f"teacher cache: {cache.hits} steps read, {cache.misses} computed")
    return state, held_out_info, cache_info


def _read_start(path: Path) -> dict | None:
    """The start measured before an interrupt, when it is whole and finite (else it is measured again)."""
    try:
        start = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(start, dict) or not math.isfinite(float(start.get("held_out_kl", float("nan")))):
        return None
    return start


__all__ = ["port_cast", "build_batches", "build_ports", "start_heads", "choose", "train"]
