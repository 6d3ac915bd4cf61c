"""Typed configuration: one dataclass per command, each field with its help, its `--help` group and its
checks. The command line (cli.py) is generated from these dataclasses; YAML files (`--config`) and the
Python API fill the same fields. Every check of a value, alone or against another field, lives in the
dataclass's `__post_init__`, so the command line, a YAML file and `castlora.translate(...)` are refused
alike. "auto" is the one spelling of a value chosen per run; `TranslateConfig.resolved` says what it
became, without changing the config it was given."""

from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import CastloraError

AUTO = "auto"
Auto = Literal["auto"]

# --help groups of `castlora translate`, in the order they are printed
INPUTS, TRAINING, TEACHER, GENERATION, RUNTIME, SAFETY = (
    "inputs and output", "training", "teacher", "text generation", "scale and runtime", "safety")


def opt(default, help: str, group: str = "", required: bool = False):
    meta = {"help": help, "group": group, "required": required}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def choices_of(annotation) -> tuple | None:
    """The allowed strings of a Literal field (inside Optional/Union too), else None."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) is Union:
        found = [c for a in get_args(annotation) for c in (choices_of(a) or ())]
        return tuple(found) or None
    return None


def _type_ok(value, annotation) -> bool:
    origin = get_origin(annotation)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (int, str, bool):
        return isinstance(value, annotation) and (annotation is bool or not isinstance(value, bool))
    if origin is Literal:
        return value in get_args(annotation)
    if origin is Union:
        return any(_type_ok(value, a) for a in get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list or annotation is list:
        return isinstance(value, list) and all(isinstance(v, (str, Path)) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


def field_types(cls) -> dict:
    """Each field's type as a type (a module with postponed annotations holds them as strings)."""
    return get_type_hints(cls if isinstance(cls, type) else type(cls))


def check_types(cfg) -> None:
    """Refuse a field of the wrong type or outside its choices, by name: a YAML slip (`tasks: greet`,
    `steps: ten`) would otherwise fail deep in a run, or run the wrong thing."""
    for name, kind in field_types(cfg).items():
        value = getattr(cfg, name)
        if not _type_ok(value, kind):
            flag = "--" + name.replace("_", "-")
            choices = choices_of(kind)
            want = f"one of {', '.join(map(str, choices))}" if choices and get_origin(kind) is Literal else \
                {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind) or \
                ("a list" if get_origin(kind) is list else f"of type {kind}")
            if get_origin(kind) is Union and choices:
                want = " or ".join(["a number" if float in get_args(kind) else "an integer", *map(repr, choices)])
            raise CastloraError(f"{flag} must be {want}, not {value!r}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def need(ok: bool, message: str) -> None:
    if not ok:
        raise CastloraError(message)


@dataclass
class TranslateConfig:
    # inputs and output
    source: str = opt("", "source model: local folder or hub id", INPUTS, required=True)
    adapter: str = opt("", "PEFT LoRA trained on the source model: local folder or hub id", INPUTS, required=True)
    target: str = opt("", "target model: local folder or hub id", INPUTS, required=True)
    out: str = opt("", "output folder: the target's PEFT adapter, heads.safetensors and castlora.json", INPUTS,
                   required=True)
    corpus: list[str] = opt([], "general text: .txt, .txt.gz (documents apart by two blank lines) or .jsonl (`text` "
                                "field) files, or a `datasets` name. Needed by --transfer cast", INPUTS)
    prompts: list[str] = opt([], "the task's unlabelled prompts (.txt or .jsonl with a `prompt` or `text` field; answers "
                                 "are never read). Task data: the port is no longer data-free", INPUTS)
    adapter_revision: Optional[str] = opt(None, "revision (branch, tag or commit) of a hub --adapter", INPUTS)
    overwrite: bool = opt(False, "replace --out if it exists (never an input)", INPUTS)
    push_to_hub: Optional[str] = opt(None, "after writing --out, upload it to this hub repo (created if missing; "
                                           "your hub token)", INPUTS)
    resume: bool = opt(False, "continue an interrupted run with the same --out and the same settings", INPUTS)
    # training
    transfer: str = opt("cast", "how to port: cast (learned heads, data-free), weight-space (the data-free SVD "
                                "baseline), labels (needs --prompts: a LoRA trained on the source's answers)", TRAINING)
    steps: Union[int, Auto] = opt(AUTO, "training steps; 0 = the closed-form transfer alone (CAST-0). auto: 300, "
                                        "800 with --transfer labels", TRAINING)
    batch_size: int = opt(8, "texts per step", TRAINING)
    seq_len: int = opt(256, "source tokens per text", TRAINING)
    lr: Union[float, Auto] = opt(AUTO, "peak learning rate (warmup, then cosine decay). auto: 3e-2; 3e-3 with "
                                       "--prompts; 5e-3 with --transfer labels", TRAINING)
    init: Union[Literal["closed-form", "zero-delta", "scaled", "random"], Auto] = opt(
        AUTO, "start of the heads: closed-form (CAST-0), zero-delta (CAST-0's input heads, output heads zero), "
              "scaled (CAST-0's output heads at the scale that fits the teacher best on held-out text), random. "
              "auto: closed-form with --steps 0, zero-delta with --prompts, else scaled", TRAINING)
    head: Literal["linear", "mlp"] = opt("linear", "projection head: linear, or mlp (a linear head plus a residual "
                                                   "MLP branch)", TRAINING)
    layer_map: Literal["proportional", "cka"] = opt("proportional", "source-to-target layer map: proportional "
                                                                    "depth, or CKA between residual streams", TRAINING)
    beta: float = opt(0.1, "weight of the relative-MSE term beside the KL (CAST's L = KL + beta * MSE)", TRAINING)
    temperature: float = opt(1.0, "distillation temperature tau of the KL", TRAINING)
    backoff: float = opt(0.0, "halve the lr whenever the KL's running mean climbs this fraction above its lowest "
                              "value (a guard for LoRAs the default lr is too high for); 0 = off", TRAINING)
    calib_batches: int = opt(4, "held-out batches for the closed-form fit, the start and the end check", TRAINING)
    max_epochs: float = opt(4.0, "refuse a run whose training stream repeats the corpus more than this", TRAINING)
    checkpoint_every: int = opt(100, "save a resumable checkpoint every N steps", TRAINING)
    seed: int = opt(0, "seed of data order, sampling and random heads", TRAINING)
    max_rank: Optional[int] = opt(None, "SVD-truncate every exported module above this rank (serving engines cap "
                                        "it, e.g. vLLM --max-lora-rank 16); default: no cap", TRAINING)
    # teacher
    teacher: Literal["auto", "source", "blend", "delta"] = opt(
        AUTO, "teacher: log p_S+LoRA + w (log p_T - log p_S), renormalised. source: w = 0; delta: w = 1; blend: "
              "w = --delta-weight; auto: blend when the source base is the weaker model on --strength-corpus, "
              "else source", TEACHER)
    delta_weight: float = opt(0.5, "w of --teacher blend", TEACHER)
    teacher_lora: bool = opt(True, "the teacher runs the source with its LoRA; --no-teacher-lora is the imitation "
                                   "control (same training, the LoRA off)", TEACHER)
    objective: str = opt("kl", "what the student minimises against the teacher (teachers.OBJECTIVES)", TEACHER)
    strength_corpus: list[str] = opt([], "held-out text where --teacher auto compares the two base models "
                                         "(default: documents of --corpus)", TEACHER)
    # text generation
    generate: Union[int, Auto] = opt(AUTO, "texts sampled from source+LoRA to train on; auto: every training text; "
                                           "0: general text only", GENERATION)
    top_k: int = opt(50, "top-k of the sampling (0 = the whole distribution)", GENERATION)
    generate_batch_size: Union[int, Auto] = opt(AUTO, "texts sampled at once; auto: 16 on the CPU, 128 on an "
                                                      "accelerator", GENERATION)
    # scale and runtime
    device: str = opt(AUTO, "torch device; auto: cuda when present, else cpu", RUNTIME)
    device_map: str = opt("", "shard both models through accelerate: 'auto', or a JSON module->device map (one "
                              "for both, or {\"source\": {...}, \"target\": {...}})", RUNTIME)
    dtype: str = opt("float32", "model dtype (bfloat16 on a GPU)", RUNTIME)
    amp: Literal["auto", "bf16", "fp16", "off"] = opt(AUTO, "autocast the forward passes; auto: bf16 on CUDA, off "
                                                           "elsewhere", RUNTIME)
    gradient_checkpointing: bool = opt(False, "recompute the target's blocks in the backward (less memory)", RUNTIME)
    teacher_cache: str = opt("", "folder that stores the teacher's side of every step for later runs", RUNTIME)
    teacher_top_k: int = opt(128, "with --teacher-cache: teacher pieces kept per position", RUNTIME)
    progress: bool = opt(True, "progress bars", RUNTIME)
    # safety
    allow_drop: bool = opt(False, "drop (and list) adapter modules the target cannot host instead of failing", SAFETY)
    allow_pickle: bool = opt(False, "allow pickle (.bin/.pt) weights: they can execute code", SAFETY)
    trust_remote_code: bool = opt(False, "run model code from the model folder or hub", SAFETY)

    def __post_init__(self):
        from .teachers import OBJECTIVES

        check_types(self)
        need(self.transfer in TRANSFER_NAMES, f"--transfer must be one of {', '.join(TRANSFER_NAMES)}, not "
                                              f"{self.transfer!r}")
        need(self.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}, not "
                                           f"{self.objective!r}")
        need(self.steps == AUTO or self.steps >= 0, f"--steps must be >= 0 or auto, not {self.steps}")
        need(self.lr == AUTO or (_finite(self.lr) and self.lr > 0), f"--lr must be a number > 0 or auto, not {self.lr}")
        need(self.batch_size >= 1 and self.seq_len >= 8, f"--batch-size must be >= 1 and --seq-len >= 8, not "
                                                         f"{self.batch_size} and {self.seq_len}")
        need(_finite(self.max_epochs) and self.max_epochs > 0, f"--max-epochs must be > 0, not {self.max_epochs}")
        need(self.calib_batches >= 1, f"--calib-batches must be >= 1 (the held-out batches), not {self.calib_batches}")
        need(self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, not {self.checkpoint_every}")
        need(_finite(self.beta) and self.beta >= 0, f"--beta must be a finite number >= 0, not {self.beta}")
        need(_finite(self.temperature) and self.temperature > 0,
             f"--temperature must be a finite number > 0 (1 = the models' own distributions), not {self.temperature}")
        need(_finite(self.delta_weight), f"--delta-weight must be a finite number (1 = the delta teacher, 0 = the "
                                         f"source teacher), not {self.delta_weight}")
        need(_finite(self.backoff) and self.backoff >= 0, f"--backoff must be a finite number >= 0 (0 = off), "
                                                          f"not {self.backoff}")
        need(self.generate == AUTO or self.generate >= 0, f"--generate must be >= 0 or auto, not {self.generate}")
        need(self.generate_batch_size == AUTO or self.generate_batch_size >= 1,
             f"--generate-batch-size must be >= 1 or auto, not {self.generate_batch_size}")
        need(self.top_k >= 0 and self.teacher_top_k >= 1, f"--top-k must be >= 0 and --teacher-top-k >= 1, not "
                                                          f"{self.top_k} and {self.teacher_top_k}")
        need(self.max_rank is None or self.max_rank >= 1, f"--max-rank must be >= 1, not {self.max_rank}")
        check_device(self.device)
        need(self.push_to_hub is None or self.push_to_hub.count("/") == 1,
             f"--push-to-hub must be a hub repo id, OWNER/NAME, not {self.push_to_hub!r}")
        self.corpus = [str(c) for c in self.corpus]
        self.prompts = [str(p) for p in self.prompts]
        self.strength_corpus = [str(c) for c in self.strength_corpus]
        if self.transfer == "labels":
            need(bool(self.prompts) and self.steps != 0, "--transfer labels trains the target on the source's "
                                                         "answers to the task's prompts: give them as --prompts "
                                                         "FILE, and --steps >= 1 (or auto)")
            need(not (self.device_map or self.resume), "--transfer labels loads each model whole on --device and "
                                                       "keeps no checkpoint: drop --device-map and --resume (or "
                                                       "use --transfer cast)")
        elif self.transfer == "cast":
            need(not self.prompts or (self.steps != 0 and self.generate != 0),
                 f"--prompts are what the port samples its training text from, and this run samples nothing "
                 f"(--steps {self.steps}, --generate {self.generate}): train (--steps > 0) with --generate auto "
                 f"or > 0, or drop --prompts")
        elif self.transfer == "weight-space":
            need(not self.prompts, "--transfer weight-space reads no text: drop --prompts")

    def check_required(self) -> None:
        """The inputs a run needs (a config may be built without them, to be completed later)."""
        for f in fields(self):
            if f.metadata.get("required") and not getattr(self, f.name):
                raise CastloraError(f"--{f.name.replace('_', '-')} is required")
        need(self.transfer != "cast" or bool(self.corpus),
             "--corpus is required: one or more general-text files (.txt, .txt.gz, .jsonl)")

    def resolved(self, accelerator: bool = False) -> "TranslateConfig":
        """A copy with every "auto" replaced by what it means for this run (castlora.json records it)."""
        labels, cast = self.transfer == "labels", self.transfer == "cast"
        steps = 0 if self.transfer == "weight-space" else (
            self.steps if self.steps != AUTO else 800 if labels else 300)
        init = self.init if self.init != AUTO else \
            "closed-form" if steps == 0 else "zero-delta" if self.prompts else "scaled"
        lr = self.lr if self.lr != AUTO else 5e-3 if labels else 3e-3 if self.prompts else 3e-2
        n_texts = max(steps, 1) * self.batch_size
        generate = 0 if not cast or steps == 0 else min(self.generate, n_texts) if self.generate != AUTO else n_texts
        device = resolve_device(self.device) if self.device != AUTO else "cuda" if accelerator else "cpu"
        gen_batch = self.generate_batch_size if self.generate_batch_size != AUTO else \
            16 if device == "cpu" else 128
        amp = self.amp if self.amp != AUTO else "bf16" if device.startswith("cuda") else "off"
        return replace(self, steps=steps, init=init, lr=lr, generate=generate, device=device,
                       generate_batch_size=gen_batch, amp=amp)


# The transfer methods' names (transfers.TRANSFERS registers their code under the same names)
TRANSFER_NAMES = ("cast", "weight-space", "labels")


def load_yaml(path: str | Path) -> dict:
    """A YAML file of option: value (safe_load: no tags that build Python objects)."""
    path = Path(path)
    if not path.is_file():
        raise CastloraError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CastloraError(f"config file {path} is not valid UTF-8 YAML ({' '.join(str(e).split())[:160]}): "
                            "fix it or pass the options as flags") from None
    if not isinstance(data, dict):
        raise CastloraError(f"config file {path} must hold a mapping of option: value")
    return data


def build(cls, *layers: dict | None):
    """The dataclass from its defaults, then each layer of values over the one before (None: not given)."""
    known = {f.name for f in fields(cls)}
    values = {}
    for layer in layers:
        layer = {k: v for k, v in (layer or {}).items() if v is not None}
        unknown = set(layer) - known
        if unknown:
            raise CastloraError(f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        values.update(layer)
    try:
        return cls(**values)
    except TypeError as e:
        raise CastloraError(str(e)) from None


def to_dict(cfg) -> dict:
    return asdict(cfg)


def has_default(f) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def resolve_device(device: str) -> str:
    """"auto": cuda when present, else cpu; a device this machine lacks is refused by name."""
    import torch

    if device == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise CastloraError(f"--device {device}: this machine has no CUDA device; use --device cpu (or auto)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise CastloraError(f"--device {device}: this machine has no MPS device; use --device cpu (or auto)")
    return device


def check_device(device: str) -> None:
    """A device name torch understands (or auto)."""
    import torch

    if device == AUTO:
        return
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise CastloraError(f"--device must be auto, cpu, cuda, cuda:N or another torch device, not {device!r}") from None


@dataclass
class TrainLoraConfig:
    model: str = opt("", "base model: local folder or hub id", required=True)
    data: list[str] = opt([], "training text (.txt/.txt.gz/.jsonl) or prompt/completion .jsonl (the loss on the "
                              "completions only)", required=True)
    out: str = opt("", "output folder (a PEFT LoRA adapter)", required=True)
    steps: int = opt(200, "optimizer steps")
    rank: int = opt(8, "LoRA rank r")
    alpha: float = opt(16.0, "LoRA alpha (scale alpha / r)")
    targets: list[str] = opt(["q", "v"], "roles (q k v o gate up down) or module names")
    lr: float = opt(1e-3, "peak learning rate (AdamW, 10-step warmup)")
    schedule: Literal["constant", "linear", "cosine"] = opt("constant", "the lr after the warmup")
    batch_size: int = opt(8, "examples per step")
    seq_len: int = opt(256, "tokens per example")
    seed: int = opt(0, "seed of data order and LoRA init")
    device: str = opt(AUTO, "torch device; auto: cuda when present, else cpu")
    dtype: str = opt("float32", "model dtype")
    overwrite: bool = opt(False, "replace --out if it exists")

    def __post_init__(self):
        check_types(self)
        need(self.steps >= 1 and self.rank >= 1 and self.batch_size >= 1 and self.seq_len >= 8,
             "--steps, --rank and --batch-size must be >= 1 and --seq-len >= 8")
        need(_finite(self.lr) and self.lr > 0 and _finite(self.alpha) and self.alpha > 0,
             f"--lr and --alpha must be finite numbers > 0, not {self.lr} and {self.alpha}")
        need(bool(self.targets), "--targets is empty: name the roles or modules to adapt")
        check_device(self.device)


@dataclass
class EvalConfig:
    model: str = opt("", "model: local folder or hub id", required=True)
    data: str = opt("", "test text (.txt/.txt.gz/.jsonl: loss, perplexity, bits per byte) or prompt/completion "
                        ".jsonl (exact match); needed unless --lm-eval is given")
    adapter: str = opt("", "PEFT adapter to apply (local folder or hub id); default: the base model alone")
    json: bool = opt(False, "print one JSON object instead of key=value")
    seq_len: int = opt(256, "tokens per scored window")
    batch_size: int = opt(8, "windows per forward pass")
    max_tokens: Optional[int] = opt(None, "score at most this many tokens; default: all")
    lm_eval: list[str] = opt([], "lm-eval-harness tasks to run too (task names, or task YAML files or folders by "
                                 "path); needs pip install \"castlora[lm-eval]\"")
    limit: Optional[int] = opt(None, "with --lm-eval: at most this many documents per task")
    device: str = opt(AUTO, "torch device; auto: cuda when present, else cpu")
    dtype: str = opt("float32", "model dtype")
    allow_pickle: bool = opt(False, "allow pickle (.bin/.pt) weights: they can execute code")

    def __post_init__(self):
        check_types(self)
        need(self.seq_len >= 2 and self.batch_size >= 1, "--seq-len must be >= 2 and --batch-size >= 1")
        need(self.max_tokens is None or self.max_tokens >= 1, f"--max-tokens must be >= 1, not {self.max_tokens}")
        need(self.limit is None or self.limit >= 1, f"--limit must be >= 1, not {self.limit}")
        check_device(self.device)


@dataclass
class InspectConfig:
    adapter: str = opt("", "PEFT LoRA adapter folder", required=True)
    model: Optional[str] = opt(None, "base model to map modules to (layer, site); default: the adapter's own when "
                                     "it is a local folder")
    allow_pickle: bool = opt(False, "allow pickle (.bin/.pt) weights: they can execute code")

    def __post_init__(self):
        check_types(self)


@dataclass
class DemoConfig:
    shared: Optional[str] = opt(None, "folder with zoo/ and data/; default: $CASTLORA_SHARED, else ../shared")
    out: str = opt("runs/demo", "output folder (LoRAs, the port, demo.json)")
    source: str = opt("llama", "zoo model the LoRA is trained on")
    target: str = opt("mistral", "zoo model the LoRA is ported to")
    quick: bool = opt(False, "a smoke run with few steps")

    def __post_init__(self):
        check_types(self)
