"""Typed configuration: dataclass fields carry their help text; YAML files override defaults and
command-line flags override YAML. The resolved config is saved beside every output."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .errors import CastloraError


def opt(default, help: str, choices: tuple | None = None):
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TranslateConfig:
    source: str = opt("", "source model: local folder or hub id")
    adapter: str = opt("", "PEFT LoRA folder trained on the source model")
    target: str = opt("", "target model: local folder or hub id")
    corpus: list = opt([], "general text: .txt/.txt.gz/.jsonl files or a `datasets` name")
    out: str = opt("", "output folder (PEFT adapter + heads + castlora.json)")
    transfer: str = opt("cast", "cast: learned heads; weight-space: the data-free Cross-LoRA style baseline; labels "
                                "(needs --prompts, not data-free): the source with its LoRA answers every prompt and a "
                                "LoRA of the same shape is trained on the target on those answers (--steps, --lr, "
                                "--batch-size, --seq-len are its; docs/results.md, session 29)",
                        ("cast", "weight-space", "labels"))
    steps: int = opt(-1, "head-training steps; 0 = the closed-form transfer alone (CAST-0); -1 = auto: 300, or with "
                         "--transfer labels the LoRA's 800")
    batch_size: int = opt(8, "texts per step")
    seq_len: int = opt(256, "source tokens per text")
    lr: float = opt(-1.0, "peak learning rate of the heads (AdamW, warmup then cosine); -1 = auto: 3e-2, or 3e-3 "
                          "with --prompts, 5e-3 with --transfer labels. On shakespeare validation text 1e-2 beat 2e-3 by +0.06 to +0.14 of the gap, "
                          "and 3e-2 beat 1e-2 by +0.02 to +0.04; on greet validation names with --prompts 3e-3 "
                          "answered 0.633 / 0.617 exactly, 1e-2 0.167 / 0.533 (docs/results.md, sessions 5 and 28)")
    alpha: float = opt(1.0, "weight of the KL term")
    beta: float = opt(0.1, "weight of the relative-MSE term. On shakespeare validation text (blend) 0 gave +0.017 "
                           "(neox->llama) and +0.000 (mistral->llama) of the gap, 1 gave -0.010 (docs/results.md)")
    temperature: float = opt(1.0, "distillation temperature tau. On shakespeare validation text (neox->llama, "
                                   "blend) 0.5 lost 0.141 of the gap and 0.75 lost 0.039 (docs/results.md)")
    teacher: str = opt("auto", "teacher distribution: log p_S+LoRA + w (log p_T - log p_S), renormalised. "
                               "source: w = 0 (source+LoRA itself); delta: w = 1 (the target's own base, tilted "
                               "by the LoRA); blend: w = --delta-weight; source_base: the source without its "
                               "LoRA (= source with --no-teacher-lora); auto: blend when the source base is the "
                               "weaker model (1 percent more bits per byte on documents of --strength-corpus, "
                               "else of --corpus), else source. On "
                               "shakespeare validation text blend beat source from the weaker models (neox->llama "
                               "0.606 against 0.391 of the gap) and lost from the stronger (llama->mistral 0.771 "
                               "against 0.839; docs/results.md)",
                       ("auto", "source", "blend", "delta", "source_base"))
    delta_weight: float = opt(0.5, "w of --teacher blend: how much of the source base the teacher swaps for the "
                                   "target's own base")
    lora_weight: float = opt(1.0, "a: the teacher applies a x the LoRA's effect on the source, log p = (1 - w) "
                                  "log p_S + w log p_T + a (log p_S+LoRA - log p_S) (w: 0 for the source teacher, "
                                  "--delta-weight for blend). On shakespeare validation text (blend, neox->llama) a = 0.75 "
                                  "lost 0.065 of the gap, 1.25 gained 0.022 (one seed moves a cell 0.02) and 1.5 lost "
                                  "0.042 (docs/results.md, session 9)")
    other_bucket: bool = opt(False, "compare teacher and student over the shared vocabulary plus one bucket that "
                                    "holds each model's mass on its unshared tokens, instead of renormalising over "
                                    "the shared vocabulary (which leaves the student's unshared mass untrained). "
                                    "Computes every output column (slower). On shakespeare validation text (blend, "
                                    "neox->llama) 0.606 of the gap, as without it (docs/results.md, session 10)")
    backoff: float = opt(0.0, "halve the lr for the rest of the run whenever the training KL's running mean (about "
                              "the last 10 steps) climbs this fraction above its lowest value: the lr "
                              "that suits one LoRA diverges on another. On greet validation prompts (llama->mistral, lr "
                              "3e-2) 0.1 took the completion-loss gap from -0.084 to 0.165 (lr 1e-2: 0.259); the KL "
                              "jumps within a step, so it halves the lr after the damage (docs/results.md, session "
                              "11). 0 = off")
    unaligned_weight: float = opt(0.0, "weight of KL(target base || student) at the target positions that align "
                                       "with no source position (inside a word the target splits and the source "
                                       "does not: no teacher there), summed over them per aligned position; holds "
                                       "the target to its own prediction where it cannot be taught. One more target "
                                       "pass per step. At 1 on shakespeare validation text (neox->llama) 0.612 of "
                                       "the gap against 0.606: it wins the unaligned positions and loses as much at "
                                       "the aligned ones (docs/results.md, session 11)")
    balanced_kernels: bool = opt(False, "train the output heads in coordinates where each of the kernel's r "
                                        "directions has the same gain (the same ported delta, the same heads at "
                                        "export): Adam otherwise moves a steep LoRA's weak directions slowly. Linear "
                                        "heads only. On shakespeare validation text (neox->llama) 0.604 of the gap "
                                        "against 0.606 (docs/results.md, session 11)")
    strength_corpus: list = opt([], "held-out text on which --teacher auto measures which base model is the "
                                    "stronger (files or a `datasets` name, like --corpus): text neither model "
                                    "trained on measures it best. Default: documents of --corpus")
    teacher_lora: bool = opt(True, "the teacher's source side runs with the LoRA. --no-teacher-lora is the "
                                   "imitation control: the same teacher and training with the LoRA switched off")
    position_weight: str = opt("uniform", "weight of each aligned position in the KL. lora-effect: its "
                                          "KL(source+LoRA || source), over the batch mean, so training dwells where "
                                          "the LoRA acts (one more source pass per step). It lost on shakespeare "
                                          "validation text, neox->llama 0.241 of the gap against 0.391 "
                                          "(docs/results.md)",
                               ("uniform", "lora-effect"))
    head: str = opt("linear", "head type. mlp lost to linear on both validation pairs and diverged on one "
                              "(docs/results.md)", ("linear", "mlp"))
    extra_rank: int = opt(0, "free directions per ported kernel beside its r: a fresh rank-k LoRA on each target site "
                             "(read side random, written side zero) trained by the same KL, so the exported "
                             "adapter has rank r + k. Not the source LoRA's directions: its imitation control gets "
                             "them too. On shakespeare validation text 8 more moved neox->llama (blend) 0.606 -> "
                             "0.613 of the gap and llama->mistral 0.839 -> 0.823, and the held-out KL to the "
                             "teacher by under 0.01 nats; 24 more climbed at lr 3e-2 (-0.168, 0.751). The ports are "
                             "not short of directions (docs/results.md, session 13). 0 = off")
    layer_map: str = opt("proportional", "source->target layer map. cka lost to proportional on both validation "
                                        "pairs (docs/results.md)", ("proportional", "cka"))
    cover_layers: bool = opt(False, "every target layer hosts the LoRA: where the layer map leaves a target layer "
                                    "without a kernel (a deeper target), it gets a copy of the kernels of the source "
                                    "layer at the nearest relative depth, with heads of its own, so the port has as "
                                    "many adapted layers as a LoRA trained on the target. On shakespeare validation "
                                    "text (mistral->llama, 4 -> 6 layers, blend) 0.666 of the gap against 0.646 "
                                    "(docs/results.md, session 10)")
    init: str = opt("auto", "head initialisation. closed-form = CAST-0; zero-delta = CAST-0's input heads with "
                            "zero output heads, so training starts at the target base (as a LoRA's B = 0); scaled "
                            "= CAST-0 with the output heads scaled by the factor in {0, 1/4, 1/2, 3/4, 1} that "
                            "fits the teacher best on the held-out calibration text; scaled-ridge = scaled, with "
                            "the output heads' ridge also searched (cross-validated or 1e-3, 1e-2, 1e-1) by the same "
                            "KL; auto = closed-form when --steps 0, zero-delta when training with --prompts, else scaled",
                   ("auto", "closed-form", "zero-delta", "scaled", "scaled-ridge", "random"))
    ridge: float = opt(-1.0, "relative ridge penalty of the closed-form start; -1 = chosen per head by 2-fold "
                             "cross-validation on the calibration text")
    calib_batches: int = opt(4, "batches of activations for the closed-form start and the CKA map")
    generate: int = opt(-1, "sample this many texts from source+LoRA and train on them (no task data); "
                            "-1 = auto (--mix of the training texts), 0 = general text only")
    mix: float = opt(1.0, "at most this fraction of the training texts is generated (1 = every one). Measured: a "
                          "third against none lifted gap recovered from 0.54 to 0.68 on llama->mistral; all against a "
                          "third gained on validation text in all nine runs (three pairs, two domains, two seeds: "
                          "+0.008 to +0.049), so 1 is the default since session 14 (docs/results.md)")
    top_k: int = opt(50, "top-k of the sampling for --generate (0 = no top-k: sample the whole distribution)")
    generate_lora_weight: float = opt(1.0, "the LoRA's scale while --generate samples (1 = as trained; above 1 the "
                                           "text leans further toward what the LoRA does). The teacher keeps "
                                           "--lora-weight")
    generate_batch_size: int = opt(0, "texts sampled at once by --generate; 0 = auto: 16 on the CPU, 128 on an "
                                      "accelerator (decoding small models is launch-bound there, so a wider batch "
                                      "costs about the same per token). The batch seeds the sampler, so another "
                                      "size samples other (equally likely) texts")
    prompt_tokens: int = opt(8, "with --generate-from doc-start: how many tokens of each general document start a "
                                "generated text (the rest of its --seq-len tokens the source writes with its LoRA)")
    generate_from: str = opt("doc-start", "prompts of --generate. doc-start: the first --prompt-tokens tokens "
                                          "of general documents; lora-effect: windows of general text where the "
                                          "LoRA moves the source the most (KL(source+LoRA || source)), each cut right after that "
                                          "position, so sampling continues where the LoRA acts. It finds line ends "
                                          "and format breaks, not the task: on validation text 0.589 of the gap "
                                          "against 0.606 (shakespeare neox->llama) and 0.212 against 0.259 (greet "
                                          "llama->mistral) (docs/results.md, session 11)",
                             ("doc-start", "lora-effect"))
    prompts: list = opt([], "unlabelled prompts of the task (.txt/.txt.gz documents, or .jsonl with a `prompt` or `text` "
                            "field; answers are never read): --generate samples every text from a whole prompt instead "
                            "of a general document start, so the teacher shows the LoRA on the inputs it was trained "
                            "for. Prompts are task data, so such a port is no longer data-free (castlora.json: "
                            "task_prompts). --corpus still gives the calibration and strength text. With it --init "
                            "auto and --lr -1 (auto) mean the bench's recipe, chosen on validation prompts: "
                            "--init zero-delta --lr 3e-3 (docs/results.md, sessions 28-29)")
    device: str = opt("cpu", "torch device")
    device_map: str = opt("", "load both models sharded through accelerate: 'auto' (all GPUs, then CPU) or a "
                              "JSON module->device map, one for both models or {\"source\": {...}, \"target\": "
                              "{...}} (a model left out loads whole on --device); empty = everything on --device")
    dtype: str = opt("float32", "model dtype (float32 on CPU; bfloat16 on GPU)")
    amp: str = opt("auto", "autocast the forward passes: auto = bf16 on CUDA, off elsewhere",
                   ("auto", "bf16", "fp16", "off"))
    gradient_checkpointing: bool = opt(False, "recompute the target's blocks in the backward pass: activation "
                                              "memory stops growing with depth, for about one more target forward")
    teacher_cache: str = opt("", "folder for a precomputed teacher: filled on the first run, then read by later runs "
                                 "with the same teacher (skips the source forward and the text generation)")
    teacher_top_k: int = opt(128, "with --teacher-cache: keep the teacher's top-k pieces per position (the rest of "
                                  "the mass as one bucket). The tail carries part of the LoRA: k 128 cost 0.02-0.04 "
                                  "of the gap on validation cells, k 1024 0.02 (docs/performance.md)")
    seed: int = opt(0, "seed for data order, sampling and random heads")
    max_epochs: float = opt(4.0, "error out when the training stream would repeat the corpus more than this many times")
    checkpoint_every: int = opt(100, "save a resumable checkpoint every N steps")
    resume: bool = opt(False, "continue from the last checkpoint of an interrupted run with the same --out")
    overwrite: bool = opt(False, "replace --out if it exists")
    allow_drop: bool = opt(False, "drop (and list) adapter sites the target cannot host instead of failing")
    allow_pickle: bool = opt(False, "allow loading pickle (.bin/.pt) weights; they can execute code")
    trust_remote_code: bool = opt(False, "allow model code from the model folder/hub")
    progress: bool = opt(True, "show a progress bar")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CastloraError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise CastloraError(f"config file {path} must hold a mapping of option: value")
    return data


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "list": list}


def build(cls, yaml_values: dict | None = None, overrides: dict | None = None):
    """Defaults <- YAML <- overrides (None values in overrides mean 'not given')."""
    known = {f.name for f in fields(cls)}
    values = {}
    for src in (yaml_values or {}, {k: v for k, v in (overrides or {}).items() if v is not None}):
        unknown = set(src) - known
        if unknown:
            raise CastloraError(f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        values.update(src)
    return check_values(cls(**values))


def check_values(cfg):
    """Refuse a field of the wrong type or outside its choices, by name; returns `cfg`. A YAML slip
    (`tasks: greet`, `steps: ten`) would otherwise fail deep in a run, or run the wrong thing."""
    for f in fields(cfg):
        value, want = getattr(cfg, f.name), _TYPES.get(str(f.type))
        if want and (not isinstance(value, want) or (want is not bool and isinstance(value, bool))):
            raise CastloraError(f"option {f.name} must be {str(f.type).replace('list', 'a list')}, not {value!r}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise CastloraError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, not {value!r}")
    return cfg


def to_dict(cfg) -> dict:
    return asdict(cfg)


def has_default(f) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING
