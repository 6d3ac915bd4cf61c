"""`translate`: port a LoRA from a source model to a target model, end to end.

check inputs -> load models -> kernels -> corpus (+ generated text) -> site map -> heads
(closed form) -> train -> export a PEFT adapter atomically, with castlora.json beside it.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import __version__
from .baselines.weight_space import weight_space_factors
from .adapters import PICKLE_NAMES, SAFETENSORS_NAME, load_adapter, read_adapter_folder
from .cast_module import PortedKernel, attached, balanced_kernels, input_device
from .closed_form import fit_closed_form, random_init, \
    zero_output_heads
from .config import TranslateConfig, build, to_dict
from .corpus import check_corpus_path, make_chunks, read_corpus, read_prompts
from .errors import CastloraError, CorpusError
from .export import export_peft, module_factors
from .families import UnsupportedArchitectureError, family_for, model_sites
from .generate import lora_effect_prompts, lora_scaled, sample_texts
from .labels import port_by_labels
from .models import check_model_path, load_model, load_tokenizer, local_model_type
from .safe_io import atomic_folder, write_text_atomic
from .site_map import cka_layer_map, map_sites, proportional_layer_map, residual_streams, uncovered_layers
from .tokens import encode_pair, shared_vocab
from .teacher_cache import TeacherCache, file_digest, text_digest
from .teacher_choice import choose_teacher, strength_budget, strength_texts
from .start_scale import OUTPUT_RIDGES, scale_output_heads, search_start, set_output_scale
from .train import LoopConfig, fit_heads, held_out_kl

MIN_ALIGNED_FRACTION = 0.2
# --generate-from lora-effect scores MINE_POOL candidate windows of MINE_WINDOW source tokens per text to
# generate (two source passes over each) and keeps the strongest: for 400 texts, 205,000 tokens, where a
# trigger as rare as one in 10,000 tokens of general text still turns up about twenty times
MINE_WINDOW, MINE_POOL = 64, 8
# texts sampled at once by --generate when --generate-batch-size is 0 (auto): on an accelerator decoding these
# models is launch-bound, so 128 texts cost about what 16 do per token; the CPU's 16 keeps older caches valid
GENERATE_BATCH_CPU, GENERATE_BATCH_ACCELERATOR = 16, 128
# --lr -1 (auto): 3e-2 on general and generated text (shakespeare validation: 3e-2 beat 1e-2 by +0.02 to
# +0.04 of the gap, session 5); 3e-3 with --prompts, where text sampled from the task's own prompts moves the
# heads far faster (greet validation names: 0.633 / 0.617 exact at 3e-3, 0.167 / 0.533 at 1e-2, 0 at 3e-2;
# docs/results.md, session 28)
LR_AUTO, LR_AUTO_PROMPTS = 3e-2, 3e-3
# --transfer labels trains an ordinary LoRA: the bench's exact-match LoRA recipe (lr 5e-3 decaying linearly, 800
# steps: on greet validation names llama->mistral 0.767 exact at 800 steps, 0.700 at 400, 0.567 at 300; session 29)
LR_AUTO_LABELS, STEPS_AUTO_LABELS = 5e-3, 800
STEPS_AUTO = 300  # CAST's head-training steps when --steps is -1 (auto)


@dataclass
class TranslateResult:
    out: Path
    record: dict


def check_inputs(cfg: TranslateConfig) -> None:
    """Everything that can be checked before a model is loaded."""
    for name in ("source", "adapter", "target", "out"):
        if not getattr(cfg, name):
            raise CastloraError(f"--{name} is required")
    if cfg.transfer == "labels":
        if not cfg.prompts or cfg.steps == 0:
            raise CastloraError("--transfer labels trains the target on the source's answers to the task's prompts: "
                                "give them as --prompts FILE, and --steps >= 1 (or -1, auto)")
        if cfg.device_map or cfg.resume:
            raise CastloraError("--transfer labels loads each model whole on --device and keeps no checkpoint: drop "
                                f"{'--device-map' if cfg.device_map else '--resume'} (or use --transfer cast)")
    elif not cfg.corpus:
        raise CastloraError("--corpus is required: one or more general-text files (.txt, .txt.gz, .jsonl)")
    check_model_path(cfg.source, cfg.allow_pickle, "source model")
    check_model_path(cfg.target, cfg.allow_pickle, "target model")
    for what in ("source", "target"):  # an unsupported architecture fails before loading any weights
        model_type = local_model_type(getattr(cfg, what))
        if model_type is not None:
            try:
                family_for(model_type)
            except UnsupportedArchitectureError as e:
                raise UnsupportedArchitectureError(f"{what} model {getattr(cfg, what)}: {e}") from None
    read_adapter_folder(cfg.adapter, cfg.allow_pickle)
    for c in [*cfg.corpus, *cfg.strength_corpus]:
        check_corpus_path(str(c))
    if cfg.prompts and cfg.transfer != "labels" and (cfg.steps == 0 or cfg.generate == 0 or cfg.mix == 0 or cfg.generate_from != "doc-start"):
        raise CastloraError("--prompts are what --generate samples from, and this run samples nothing from them "
                            f"(--steps {cfg.steps}, --generate {cfg.generate}, --mix {cfg.mix:g}, --generate-from "
                            f"{cfg.generate_from}): train (--steps > 0) with --generate -1 or > 0, --mix > 0 and "
                            "--generate-from doc-start, or drop --prompts")
    out = Path(cfg.out)
    if out.exists() and not (cfg.overwrite or cfg.resume):
        raise CastloraError(f"output folder {out} already exists: choose another --out or pass --overwrite")
    if cfg.resume and out.exists() and not out.with_name(f".{out.name}.castlora-work").exists():
        raise CastloraError(f"{out} is complete and there is no interrupted run to resume; "
                            "pass --overwrite instead of --resume to redo it")
    if not (cfg.lr == -1 or (math.isfinite(cfg.lr) and cfg.lr > 0)):
        raise CastloraError(f"--lr must be a number > 0, or -1 for auto ({LR_AUTO:g}; {LR_AUTO_PROMPTS:g} with "
                            f"--prompts), not {cfg.lr}")
    if cfg.steps < -1 or cfg.batch_size < 1 or cfg.seq_len < 8 or not cfg.max_epochs > 0:
        raise CastloraError("--steps must be >= 0 (or -1, auto), --batch-size >= 1, --seq-len >= 8 and --max-epochs > 0")
    if not math.isfinite(cfg.delta_weight):
        raise CastloraError(f"--delta-weight must be a finite number (with --teacher blend; 1 = the delta "
                            f"teacher, 0 = the source teacher), not {cfg.delta_weight}")
    if not (math.isfinite(cfg.lora_weight) and cfg.lora_weight >= 0):
        raise CastloraError(f"--lora-weight must be a finite number >= 0 (1 = the LoRA's whole effect, 0 = none), "
                            f"not {cfg.lora_weight}")
    if not (math.isfinite(cfg.backoff) and cfg.backoff >= 0):
        raise CastloraError(f"--backoff must be a finite number >= 0 (0 = off), not {cfg.backoff}")
    if cfg.balanced_kernels and cfg.head != "linear":
        raise CastloraError(f"--balanced-kernels needs linear heads; drop it or use --head linear (not {cfg.head})")
    if not (math.isfinite(cfg.unaligned_weight) and cfg.unaligned_weight >= 0):
        raise CastloraError(f"--unaligned-weight must be a finite number >= 0 (0 = no anchor), not {cfg.unaligned_weight}")
    if not 0 <= cfg.mix <= 1:
        raise CastloraError(f"--mix must be a fraction in [0, 1] (the most of the training texts that may be "
                            f"generated; 1 = all, 0 = none), not {cfg.mix}")
    if cfg.generate_batch_size < 0:
        raise CastloraError(f"--generate-batch-size must be >= 0 (0 = auto: 16 on the CPU, 128 on an accelerator), "
                            f"not {cfg.generate_batch_size}")
    if not (math.isfinite(cfg.generate_lora_weight) and cfg.generate_lora_weight >= 0):
        raise CastloraError(f"--generate-lora-weight must be a finite number >= 0 (1 = the LoRA as trained), "
                            f"not {cfg.generate_lora_weight}")
    if cfg.top_k < 0 or cfg.prompt_tokens < 1:
        raise CastloraError(f"--top-k must be >= 0 (0 = no top-k) and --prompt-tokens >= 1 (tokens of a general "
                            f"document that start each generated text), not {cfg.top_k} and {cfg.prompt_tokens}")
    if cfg.extra_rank < 0:
        raise CastloraError(f"--extra-rank must be an integer >= 0 (0 = the kernel's own r directions only), "
                            f"not {cfg.extra_rank}")


def resolve_auto(cfg: TranslateConfig, log=print) -> None:
    """Set `--steps -1`, `--init auto` and `--lr -1` to what they mean for this run, in `cfg` (castlora.json records the
    values used). CAST-0 stays the closed form. A trained run starts at the best-fitting scale of CAST-0, and
    with --prompts at the target base (zero-delta, the bench's prompts recipe: on greet validation names, lr
    3e-3, the scaled start answered 0.533 / 0.583 exactly on llama->mistral / mistral->llama, zero-delta 0.633 /
    0.617; docs/results.md, session 29)."""
    if cfg.steps == -1:
        cfg.steps = STEPS_AUTO_LABELS if cfg.transfer == "labels" else STEPS_AUTO
    if cfg.init == "auto":
        cfg.init = "closed-form" if cfg.steps == 0 else "zero-delta" if cfg.prompts else "scaled"
        if cfg.prompts and cfg.steps > 0 and cfg.transfer == "cast":
            log("--init auto with --prompts: the heads start at the target base (zero-delta)")
    if cfg.prompts and cfg.transfer == "cast":
        log("with --prompts, --transfer labels (a LoRA trained on the source's answers to them) ported better than "
            "CAST on every exact-match cell measured (docs/results.md, session 29)")
    if cfg.lr == -1:
        cfg.lr = LR_AUTO_LABELS if cfg.transfer == "labels" else LR_AUTO_PROMPTS if cfg.prompts else LR_AUTO
        if cfg.prompts:
            log(f"--lr auto with --prompts{' and --transfer labels' if cfg.transfer == 'labels' else ''}: {cfg.lr:g}")


def _device_map(spec: str, which: str):
    """'' -> None; 'auto' -> 'auto'; JSON -> a dict (either one map for both models, or
    {"source": {...}, "target": {...}}, where a model left out loads whole on --device)."""
    if not spec:
        return None
    if spec == "auto":
        return "auto"
    try:
        m = json.loads(spec)
    except json.JSONDecodeError as e:
        raise CastloraError(f"--device-map must be 'auto' or a JSON object: {e}") from e
    if isinstance(m, dict) and m and set(m) <= {"source", "target"}:
        return m.get(which)
    return m


def _source_with_adapter(cfg: TranslateConfig, source):
    from peft import PeftModel

    model = PeftModel.from_pretrained(source, cfg.adapter, is_trainable=False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _adapter_digest(folder: str) -> str:
    """sha256 of the adapter's weights file (safetensors, or the pickle the user allowed)."""
    for name in (SAFETENSORS_NAME, *PICKLE_NAMES):
        if (Path(folder) / name).is_file():
            return file_digest(Path(folder) / name)
    return ""


def _training_texts(cfg, docs, tok_s, source, n_needed, log, task_prompts=()) -> tuple[list[str], dict]:
    """Chunks of general text, mixed with text sampled from source+LoRA when --generate is set (from the
    starts of general documents, or from the whole of each of `task_prompts` when --prompts gives them)."""
    info = {}
    share = int(round(n_needed * cfg.mix))
    count = share if cfg.generate < 0 else cfg.generate
    n_gen = min(count, share) if cfg.steps > 0 else 0  # CAST-0 trains nothing: no text to generate
    if 0 < share < count and cfg.steps > 0:
        log(f"--generate {count} is capped at {share} texts: --mix {cfg.mix:g} of the {n_needed} training texts "
            f"(raise --mix to generate more)")
    info["general_needed"] = n_needed - n_gen
    general = make_chunks(docs, tok_s, cfg.seq_len, n_needed - n_gen + cfg.calib_batches * cfg.batch_size,
                          seed=cfg.seed)
    if not general:
        raise CorpusError("the corpus yields no text chunk of at least 16 tokens")
    texts = general
    info["general_chunks"] = max(0, len(general) - cfg.calib_batches * cfg.batch_size)
    # With --prompts the training text is the task's, not general text: the heads' start and end are judged on
    # fresh samples from the same prompts, held out of training (on general text such a port ends farther from
    # the teacher than its start, and would be thrown away: docs/results.md, session 28)
    n_held = cfg.calib_batches * cfg.batch_size if task_prompts and n_gen else 0
    if n_gen:
        t0 = time.perf_counter()
        saved = Path(cfg.teacher_cache) / "generated.json" if cfg.teacher_cache else None
        on_cpu = next(source.parameters()).device.type == "cpu"
        gen_batch = cfg.generate_batch_size or (GENERATE_BATCH_CPU if on_cpu else GENERATE_BATCH_ACCELERATOR)
        key = {"source": str(cfg.source), "adapter": _adapter_digest(cfg.adapter), "n": n_gen + n_held,
               "seq_len": cfg.seq_len, "top_k": cfg.top_k, "seed": cfg.seed,
               "prompts": text_digest(list(task_prompts) or docs), **({"task_prompts": True} if task_prompts else {}),
               **({"generate_from": cfg.generate_from} if cfg.generate_from != "doc-start" else {}),
               **({"prompt_tokens": cfg.prompt_tokens} if cfg.prompt_tokens != 8 else {}),
               **({"generate_lora_weight": cfg.generate_lora_weight} if cfg.generate_lora_weight != 1 else {}),
               **({"generate_batch_size": gen_batch} if gen_batch != GENERATE_BATCH_CPU else {}),
               } if saved else None
        gen = None
        if saved and saved.exists():
            rec = json.loads(saved.read_text())
            gen = rec["texts"] if rec.get("key") == key else None
        if gen is None:
            prompts, prompt_tokens = docs, cfg.prompt_tokens
            if task_prompts:  # whole prompts: the source writes the answers its LoRA gives them
                prompts, prompt_tokens = list(task_prompts), cfg.seq_len
            elif cfg.generate_from == "lora-effect":  # windows of general text where the LoRA acts the most
                windows = make_chunks(docs, tok_s, MINE_WINDOW, MINE_POOL * n_gen, seed=cfg.seed + 1)
                prompts, effects = lora_effect_prompts(source, tok_s, windows, n_gen, window=MINE_WINDOW,
                                                       progress=cfg.progress)
                if not prompts:
                    raise CorpusError("--generate-from lora-effect found no window of the corpus where the LoRA "
                                      "changes the source's prediction; use --generate-from doc-start")
                prompt_tokens = MINE_WINDOW
                info.update({"mined_windows": len(windows), "prompt_effect": {
                    "max": effects[0], "median": effects[len(effects) // 2], "min": effects[-1]}})
            with lora_scaled(source, cfg.generate_lora_weight):
                gen = sample_texts(source, tok_s, prompts, n_gen + n_held, max_new_tokens=cfg.seq_len,
                                   top_k=cfg.top_k, prompt_tokens=prompt_tokens, batch_size=gen_batch, seed=cfg.seed,
                                   progress=cfg.progress)
            if saved:
                saved.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(saved, json.dumps({"key": key, "texts": gen}))
        if n_held:
            gen, info["held_out_texts"] = gen[:-n_held], gen[-n_held:]
        if task_prompts:  # the record and the log say plainly that this port saw task data
            info["task_prompts"] = len(task_prompts)
            log(f"trained on text sampled from {len(task_prompts)} task prompts (--prompts): this port is not data-free")
        info.update({"generated_texts": len(gen), "generated_chars": sum(map(len, gen)),
                     "generate_batch_size": gen_batch, **({"held_out_generated": n_held} if n_held else {}),
                     "generation_seconds": round(time.perf_counter() - t0, 1)})
        log(f"generated {len(gen)} texts ({info['generated_chars']} chars) in {info['generation_seconds']} s"
            + (f", and {n_held} more held out" if n_held else ""))
        rng = random.Random(cfg.seed)
        n_general = max(0, n_needed - n_gen)
        stream = [gen[i % len(gen)] for i in range(n_gen)] + general[:n_general]
        rng.shuffle(stream)
        texts = general[n_general:n_general + cfg.calib_batches * cfg.batch_size] + stream
        texts = texts if texts else general
    return texts, info


def translate(source: str = "", adapter: str = "", target: str = "", corpus: list | str = (), out: str = "",
              config: TranslateConfig | None = None, log=print, **options) -> TranslateResult:
    """Port the LoRA in `adapter` (trained on `source`) to `target`; write a PEFT adapter to `out`.

    Options are the fields of TranslateConfig (steps, teacher, head, layer_map, ...).
    """
    base = to_dict(config) if config else {}
    given = dict(source=source, adapter=adapter, target=target, out=out,
                 corpus=[corpus] if isinstance(corpus, (str, Path)) else list(corpus), **options)
    given = {k: str(v) if isinstance(v, Path) else v for k, v in given.items()}  # folders may come as Paths
    cfg = build(TranslateConfig, base, {k: v for k, v in given.items() if v not in ("", [], ())})
    check_inputs(cfg)
    resolve_auto(cfg, log)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    workdir = out.with_name(f".{out.name}.castlora-work")  # created when training starts (checkpoints)

    task_prompts = read_prompts(cfg.prompts) if cfg.prompts else []  # a missing file fails here, before any model
    if cfg.transfer == "labels":  # no heads, no general text: the target learns the source's answers
        return TranslateResult(out, port_by_labels(cfg, task_prompts, log))
    docs = read_corpus(cfg.corpus)  # empty, unreadable or non-UTF-8 text fails before any model loads
    strength_docs = read_corpus(cfg.strength_corpus) if cfg.strength_corpus else []

    log(f"loading {cfg.source} and {cfg.target}")
    src_base = load_model(cfg.source, cfg.dtype, cfg.device, device_map=_device_map(cfg.device_map, "source"),
                          allow_pickle=cfg.allow_pickle,
                          trust_remote_code=cfg.trust_remote_code)
    tgt = load_model(cfg.target, cfg.dtype, cfg.device, device_map=_device_map(cfg.device_map, "target"),
                     allow_pickle=cfg.allow_pickle,
                     trust_remote_code=cfg.trust_remote_code)
    tok_s = load_tokenizer(cfg.source, cfg.trust_remote_code)
    tok_t = load_tokenizer(cfg.target, cfg.trust_remote_code)
    s_sites, t_sites = model_sites(src_base), model_sites(tgt)
    lora = load_adapter(cfg.adapter, s_sites, cfg.allow_pickle)
    source = _source_with_adapter(cfg, src_base)
    source_inner = source.base_model.model

    n_needed = max(cfg.steps, 1) * cfg.batch_size
    texts, gen_info = _training_texts(cfg, docs, tok_s, source, n_needed, log, task_prompts)
    n_calib = min(len(texts), cfg.calib_batches * cfg.batch_size)
    calib_texts, train_texts = texts[:n_calib], texts[n_calib:] or texts
    held_texts = gen_info.pop("held_out_texts", None)  # --prompts: samples from the prompts, held out of training
    n_general, general_needed = gen_info.pop("general_chunks"), gen_info.pop("general_needed")
    if cfg.steps > 0 and general_needed > 0 and n_general * cfg.max_epochs < general_needed:
        raise CorpusError(
            f"the corpus is too short for {cfg.steps} steps of batch {cfg.batch_size}: it yields "
            f"{n_general} training chunks of up to {cfg.seq_len} source tokens ({n_calib} more go to "
            f"calibration), and the {general_needed} general texts of the training stream would repeat it "
            f"{general_needed / max(1, n_general):.1f} times, more than --max-epochs {cfg.max_epochs:g}. It needs "
            f"at least {math.ceil(general_needed / cfg.max_epochs)} chunks: add text to --corpus, lower --steps or "
            "--batch-size, or raise --max-epochs.")
    vocab = shared_vocab(tok_s, tok_t)
    max_len_t = int(cfg.seq_len * 1.5)  # the target tokenizer may need more tokens for the same text

    def make_batch(step: int, pool=train_texts):
        idx = [(step * cfg.batch_size + i) % len(pool) for i in range(cfg.batch_size)]
        return encode_pair([pool[i] for i in idx], tok_s, tok_t, cfg.seq_len, max_len_t)

    calib = [make_batch(i, calib_texts).to(cfg.device) for i in range(max(1, n_calib // cfg.batch_size))]
    held = [make_batch(i, held_texts).to(cfg.device) for i in range(max(1, len(held_texts) // cfg.batch_size))
            ] if held_texts else calib
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
    if len(train_texts) < cfg.batch_size:
        raise CorpusError(f"the corpus yields {len(train_texts)} training chunks of {cfg.seq_len} tokens, "
                          f"fewer than one batch ({cfg.batch_size})")

    # Layer map: proportional depth, or CKA between residual streams on the calibration batches.
    cka_info = None
    if cfg.layer_map == "cka":
        streams = residual_streams(source, source_inner, tgt, s_sites.layer_paths, t_sites.layer_paths, calib)
        layer_map, sim = cka_layer_map(*streams)
        del streams
        cka_info = [[round(v, 4) for v in row] for row in sim]
    else:
        layer_map = proportional_layer_map(s_sites.num_layers, t_sites.num_layers)
    extra = uncovered_layers(layer_map, t_sites.num_layers) if cfg.cover_layers else []
    pairs, dropped = map_sites(lora.kernels, t_sites, layer_map, cfg.allow_drop, extra)
    if not pairs:
        raise CastloraError("no adapter site could be ported to the target")
    for d in dropped:
        log(f"dropped {d['source']} ({d['source_module']}): {d['reason']}")
    # Free directions only train: CAST-0 and the weight-space baseline would export them as zeros.
    extra_rank = cfg.extra_rank if cfg.steps > 0 and cfg.transfer == "cast" else 0
    ports = [(PortedKernel(p.kernel, p.target, cfg.head, extra_rank).to(cfg.device), p.target) for p in pairs]

    if cfg.transfer == "weight-space":
        init_info = {"transfer": "weight-space"}
        cfg.steps = 0
    elif cfg.init in ("closed-form", "zero-delta", "scaled", "scaled-ridge"):
        # The heads map between the *base* models' spaces: with the LoRA on, the source's activations
        # downstream of its first adapted layer carry the LoRA's own effect, which the base target
        # cannot predict (on llama->llama that alone made the fit miss the identity by >100%).
        with source.disable_adapter():  # --init scaled-ridge searches the output heads at OUTPUT_RIDGES too
            init_info, at_ridge = fit_closed_form(ports, source_inner, tgt, [p.source_module for p, _ in ports], calib,
                                                  None if cfg.ridge < 0 else cfg.ridge,
                                                  OUTPUT_RIDGES if cfg.init == "scaled-ridge" else ())
        if cfg.init == "zero-delta":
            # Across families CAST-0's delta can point the wrong way (below the base, docs/results.md);
            # with the output heads at zero the port starts at the target base and the input heads
            # still read what the source LoRA reads.
            zero_output_heads(ports)
            init_info["zero_output_heads"] = True
    else:
        random_init(ports, cfg.seed)
        init_info = {"random_seed": cfg.seed}
    if extra_rank:
        g = torch.Generator().manual_seed(cfg.seed)
        for port, _ in ports:
            port.init_extra(g)
        init_info["extra_rank"] = extra_rank

    log(f"porting {len(ports)} kernels onto {len({s.path for _, s in ports})} target modules; "
        f"{sum(p.numel() for port, _ in ports for p in port.parameters())} head parameters")
    history, state, teacher_info, held_out_info = [], None, None, None
    teacher, choice_info = cfg.teacher, None
    if cfg.teacher == "auto" and cfg.steps > 0:  # from the base models alone, before the heads attach
        texts_for_choice = strength_texts(strength_docs or docs, cfg.seed,
                                          strength_budget(cfg.steps, cfg.batch_size, cfg.seq_len))
        teacher, choice_info = choose_teacher(source, tok_s, tgt, tok_t, texts_for_choice, max_len_t)
        choice_info["measured_on"] = "strength_corpus" if cfg.strength_corpus else "corpus"
        log(f"teacher: {teacher} (the source base spends {choice_info['source_bits_per_byte']} bits per byte on "
            f"{len(texts_for_choice)} documents of --{'strength-' if cfg.strength_corpus else ''}corpus, "
            f"the target base {choice_info['target_bits_per_byte']})")
    log_file = workdir / "train_log.jsonl"
    with attached(tgt, ports) as wrappers:
        if cfg.steps > 0:
            amp = cfg.amp if cfg.amp != "auto" else ("bf16" if input_device(tgt).type == "cuda" else "off")
            loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, alpha=cfg.alpha, beta=cfg.beta,
                              temperature=cfg.temperature, teacher=teacher, delta_weight=cfg.delta_weight,
                              lora_weight=cfg.lora_weight, teacher_lora=cfg.teacher_lora,
                              other_bucket=cfg.other_bucket,
                              unaligned_weight=cfg.unaligned_weight, backoff=cfg.backoff,
                              position_weight=cfg.position_weight,
                              warmup=min(20, max(1, cfg.steps // 10)), checkpoint_every=cfg.checkpoint_every,
                              amp=amp, checkpointing=cfg.gradient_checkpointing)
            # The calibration batches are held out of training: the start (and, for --init scaled, its
            # scale) is judged on text training never sees, and so is the end (below).
            def held_out():
                return held_out_kl(source, source_inner, tgt, wrappers, ports, held, vocab, loop)

            start_file = workdir / "start.json"
            if cfg.resume and start_file.exists():  # measured before the interrupt: same data, same start
                start = json.loads(start_file.read_text())
                if "output_scale" in start:
                    ridge = start.get("candidate", "closed-form")
                    set_output_scale(ports, start["output_scale"], None if ridge == "closed-form" else
                                     at_ridge[float(ridge)])
            else:
                with held_out() as kl_at:
                    start = {}
                    if cfg.init == "scaled":
                        start = scale_output_heads(ports, kl_at)
                    elif cfg.init == "scaled-ridge":  # the output heads' ridge is searched too (start_scale.py)
                        candidates = {"closed-form": [p.p_out.linear_part().detach().clone() for p, _ in ports]}
                        candidates.update({str(lam): at_ridge[lam] for lam in OUTPUT_RIDGES})
                        start = search_start(ports, kl_at, candidates)
                    start["held_out_kl"] = kl_at()
                workdir.mkdir(parents=True, exist_ok=True)
                start_file.write_text(json.dumps(start))
            init_info.update({k: v for k, v in start.items() if k != "held_out_kl"})
            if "output_scale" in start:
                ridge = f" at output ridge {start['candidate']}" if "candidate" in start else ""
                log(f"start: output heads at {start['output_scale']:g} x the closed form{ridge} "
                    f"(KL to the teacher by scale: {start['start_kl']})")
            start_heads = [{k: v.detach().clone() for k, v in port.state_dict().items()} for port, _ in ports]
            cache = None
            if cfg.teacher_cache:
                cache = TeacherCache(cfg.teacher_cache, {
                    "source": str(cfg.source), "adapter": _adapter_digest(cfg.adapter),
                    "target": str(cfg.target) if teacher in ("delta", "blend") else None,
                    "teacher": teacher, "delta_weight": cfg.delta_weight if teacher == "blend" else None,
                    **({"lora_weight": cfg.lora_weight} if cfg.lora_weight != 1 else {}),  # older caches: a = 1
                    **({"other_bucket": True} if cfg.other_bucket else {}),
                    "teacher_lora": cfg.teacher_lora,
                    "position_weight": cfg.position_weight, "temperature": cfg.temperature, "dtype": cfg.dtype, "amp": amp,
                    "vocab": text_digest([str(vocab.ids_s.tolist()), str(vocab.ids_t.tolist())]),
                    "kernels": [p.source_module for p, _ in ports] if cfg.beta > 0 else None}, cfg.teacher_top_k)
            workdir.mkdir(parents=True, exist_ok=True)
            # --balanced-kernels: the heads train (and checkpoint) in balanced coordinates and come back
            # to the kernel's own before they are judged and exported
            balance = balanced_kernels(ports) if cfg.balanced_kernels else contextlib.nullcontext()
            with log_file.open("a") as lf, balance:
                state = fit_heads(source, source_inner, tgt, wrappers, ports, make_batch, vocab, loop, workdir,
                                  cfg.resume, log=lambda r: (lf.write(json.dumps(r) + "\n"), lf.flush()),
                                  progress=cfg.progress, target_blocks=t_sites.layer_paths, cache=cache)
            history = state.history
            # Never export heads that fit held-out text worse than where training started. From an
            # exact start (a model and itself) Adam's normalised steps on near-zero gradients only
            # walk away from it; across families training lowers the held-out KL by half or more.
            with held_out() as kl_at:
                end_kl = kl_at()
            kept = "trained" if end_kl <= start["held_out_kl"] else "start"
            if kept == "start":
                for (port, _), saved in zip(ports, start_heads):
                    port.load_state_dict(saved)
                log(f"training raised the held-out KL ({start['held_out_kl']:.5g} -> {end_kl:.5g}): kept the start heads")
            held_out_info = {"start": start["held_out_kl"], "end": end_kl, "kept": kept,
                             "text": "samples from --prompts" if held_texts else "calibration (general) text"}
            if cache is not None:
                teacher_info = {"teacher_cache": str(cfg.teacher_cache), "steps_read": cache.hits,
                                "steps_computed": cache.misses}
                log(f"teacher cache: {cache.hits} steps read, {cache.misses} computed")
        # Non-linear heads are exported by a least-squares fit on the target's activations as they run (deltas on).
        factors, fit_errors = module_factors(ports, tgt, calib)
    if cfg.transfer == "weight-space":  # the baseline ignores the heads: SVD subspace transfer
        factors, fit_errors = weight_space_factors(pairs, s_sites, src_base, tgt), {}

    record = {
        "castlora_version": __version__, "source": cfg.source, "target": cfg.target, "adapter": cfg.adapter,
        "source_family": s_sites.family.name, "target_family": t_sites.family.name,
        "layer_map": layer_map, "layer_map_kind": cfg.layer_map, "layer_copies": [list(e) for e in extra], "cka": cka_info,
        "site_map": [p.describe() for p in pairs], "dropped": dropped,
        "config": to_dict(cfg), "teacher": choice_info or {"teacher": teacher}, "init": init_info,
        "held_out_kl": held_out_info, "loss_curve": history,
        "corpus_tokens_seen": state.tokens_seen if state else 0, "train_seconds": round(state.seconds, 2) if state else 0,
        "alignment": {"calibration_aligned_fraction": round(frac, 4), "shared_vocab": vocab.size},
        "corpus_docs": len(docs), **gen_info, "teacher_cache": teacher_info, "export_fit_error": fit_errors,
        "exported_rank": max(a.shape[0] for a, _ in factors.values()),
        "hardware": {"device": cfg.device, "torch": torch.__version__, "platform": platform.platform(),
                     "threads": torch.get_num_threads()},
    }
    with atomic_folder(out, overwrite=cfg.overwrite or cfg.resume) as tmp:
        tgt = export_peft(tgt, factors, tmp, t_sites.family.transposed, base_model_name=cfg.target)
        save_file({f"{port.source_key}->{port.target_key}.{k}": v.detach().cpu().contiguous()
                   for port, _ in ports for k, v in port.state_dict().items()}, str(tmp / "heads.safetensors"))
        record["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        (tmp / "castlora.json").write_text(json.dumps(record, indent=2))
        # The final log comes from the loop's history: a resumed run lists every step once.
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    shutil.rmtree(workdir, ignore_errors=True)
    log(f"wrote {out} ({SAFETENSORS_NAME}, heads.safetensors, castlora.json) in {record['wall_seconds']} s")
    return TranslateResult(out, record)
