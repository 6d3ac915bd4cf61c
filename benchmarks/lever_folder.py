"""The command line of the diagnostics that read a levers.py folder: TASK SRC TGT DIR [PORT...].
DIR holds DIR/loras/{model}_{task} and DIR/ports/NAME; the zoo and data come from CASTLORA_SHARED."""

import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from peft import PeftModel

import castlora.train as train
from castlora.cast_module import deltas_off
from castlora.bench.tasks import get_task
from castlora.corpus import make_chunks, read_corpus, read_documents
from castlora.demo import shared_dir
from castlora.evaluate import text_loss
from castlora.losses import shared_log_probs
from castlora.models import load_model, load_tokenizer
from castlora.tokens import encode_pair, shared_vocab


def exact_split(task: str, folder: Path, shared: Path, n: int = 60):
    """An exact-match task's bench training split (seed 0) in folder/tasks, and `n` VALIDATION prompts: made
    with another seed in folder/val, every train and test prompt of seed 0 left out."""
    from castlora.bench.tasks import make_echo, make_greet
    from castlora.evaluate import load_examples

    make = {"echo": lambda d, seed: make_echo(d, shared, seed), "greet": make_greet}[task]
    train = make(folder / "tasks", 0)
    seen = {e["prompt"] for e in load_examples(train.train)} | {e["prompt"] for e in load_examples(train.test)}
    val = make(folder / "val", 100)
    return train, [e for e in load_examples(val.test) + load_examples(val.train) if e["prompt"] not in seen][:n]


def parse(value: str):
    """A variant's option value as the bool, int or float it spells, else the string."""
    if value in ("True", "False"):
        return value == "True"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def variant(spec: str, steps: int) -> tuple[str, dict]:
    """NAME:key=value,... -> (NAME, translate options): 8 x 128 batches, at most 400 generated texts at --mix
    1/3 (the stream of sessions 1-13, so older commands reproduce), seed 0, then the spec's own options."""
    name, _, opts_spec = spec.partition(":")
    opts = {"steps": steps, "batch_size": 8, "seq_len": 128, "generate": 400, "mix": 1 / 3, "seed": 0}
    opts.update({k: parse(x) for k, x in (kv.split("=") for kv in opts_spec.split(",") if kv)})
    return name, opts


def lever_folder(argv=None) -> SimpleNamespace:
    task, src, tgt, out = (argv or sys.argv)[1:5]
    shared = shared_dir(None)
    zoo = shared / "zoo"
    tok_s, tok_t = load_tokenizer(str(zoo / src)), load_tokenizer(str(zoo / tgt))
    return SimpleNamespace(task=task, src=src, tgt=tgt, out=Path(out), ports=(argv or sys.argv)[5:], shared=shared,
                           zoo=zoo, tok_s=tok_s, tok_t=tok_t, vocab=shared_vocab(tok_s, tok_t))


def validation_batches(lf: SimpleNamespace) -> dict:
    """32 chunks of 128 source tokens of general/valid and of the task's validation text (its last
    training document, as in levers.py), as aligned pair batches of 8."""
    texts = {
        "general": make_chunks(read_corpus([str(lf.shared / "data" / "general" / "valid.txt.gz")]), lf.tok_s, 128, 32,
                               seed=1),
        lf.task: make_chunks(read_documents(get_task(lf.task, lf.shared, lf.out / "tasks").train)[-1:], lf.tok_s, 128,
                             32, seed=1),
    }
    return {k: [encode_pair(v[i:i + 8], lf.tok_s, lf.tok_t, 128, 192) for i in range(0, len(v), 8)]
            for k, v in texts.items()}


def aligned_logp(model, batch, side: str, vocab) -> torch.Tensor:
    """`model`'s log-probs over the shared vocabulary at the aligned positions of one pair batch, read on the
    source (`side` "s") or target ("t") side; with gradients, for whoever trains `model`."""
    ids_in, mask, cols = (batch.ids_s, batch.mask_s, vocab.ids_s) if side == "s" else \
        (batch.ids_t, batch.mask_t, vocab.ids_t)
    logits = model(input_ids=ids_in, attention_mask=mask).logits
    return shared_log_probs(batch.gather(logits, side), cols)


@torch.no_grad()
def aligned_log_probs(model, side: str, batches: dict, vocab) -> dict[str, list[torch.Tensor]]:
    """aligned_logp for every batch of every named list of batches."""
    return {name: [aligned_logp(model, b, side, vocab) for b in bs] for name, bs in batches.items()}


def validation_loss(lf: SimpleNamespace, model) -> float:
    """`model`'s mean next-token loss on the task's validation text (its last training document, 20,000 target
    tokens in windows of 256), the levers.py measure."""
    docs = read_documents(get_task(lf.task, lf.shared, lf.out / "tasks").train)[-1:]
    return text_loss(model, lf.tok_t, docs, seq_len=256, max_tokens=20000)["mean_loss"]


def with_adapter(lf: SimpleNamespace, model_name: str, port: str | None = None):
    """The zoo model `model_name` with its task LoRA (DIR/loras/{model}_{task}), or with the port
    DIR/ports/`port`."""
    path = lf.out / "ports" / port if port else lf.out / "loras" / f"{model_name}_{lf.task}"
    return PeftModel.from_pretrained(load_model(str(lf.zoo / model_name)), str(path)).eval()


def pop_string(flag: str, default: str | None) -> str | None:
    """`flag VALUE` taken out of sys.argv (so the rest is levers.py's command line): VALUE, else `default`."""
    if flag not in sys.argv:
        return default
    i = sys.argv.index(flag)
    value = sys.argv[i + 1]
    del sys.argv[i:i + 2]
    return value


def pop_option(flag: str, default: float) -> float:
    """pop_string for a number."""
    value = pop_string(flag, None)
    return default if value is None else float(value)


def run_levers() -> None:
    """Run levers.py on sys.argv in this process, so that whatever the caller patched first applies."""
    levers = str(Path(__file__).with_name("levers.py"))
    sys.argv = [levers] + sys.argv[1:]
    runpy.run_path(levers, run_name="__main__")


def levers_with_teacher(teacher_outputs) -> None:
    """Run levers.py on sys.argv with `castlora.train.teacher_outputs` swapped for `teacher_outputs` (same
    signature): every step, the start's scale and the held-out KL then see that teacher; nothing else changes."""
    train.teacher_outputs = teacher_outputs
    run_levers()


def teacher_parts(source_side, source, source_inner, target, wrappers, ports, batch, cols, tau, want_z):
    """The three distributions every CAST teacher is made of, at the aligned positions over the shared vocabulary:
    (source+LoRA's TeacherOutput, with the kernels' inputs z when `want_z`; the source base's log-probs; the target
    base's, its ported deltas off). `source_side` is the library's teacher_outputs. The LoRA side runs twice
    (teacher_outputs returns one distribution): for the diagnostics that build a teacher from the parts."""
    with_lora = source_side(source, source_inner, target, wrappers, ports, batch, cols, "source", tau, want_z)
    base = source_side(source, source_inner, target, wrappers, ports, batch, cols, "source_base", tau, False)
    with torch.no_grad(), deltas_off(wrappers):
        logits = target(input_ids=batch.ids_t, attention_mask=batch.mask_t).logits
        lp_t = shared_log_probs(batch.gather(logits, "t"), cols.ids_t, tau)
    return with_lora, base.logp.to(lp_t.device), lp_t
