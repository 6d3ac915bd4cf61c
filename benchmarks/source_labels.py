"""`castlora translate --transfer labels` on validation names, beside `--prompts` (CAST): with the task's prompts (not
their answers) the source with its LoRA answers every prompt and an ordinary LoRA is trained on the target on
those answers (sequence-level distillation). Not data-free, like --prompts.

    OMP_NUM_THREADS=1 python benchmarks/source_labels.py greet llama mistral runs/lev28 [STEPS] [train|fresh] [cast]

STEPS: the target LoRA's steps (default 800, the bench's `source_labels` row: the retrained LoRA's recipe; the other
settings are the bench's: batch 8, 128 tokens, lr auto = 5e-3 decaying linearly). `train` (default): the prompts are the training split's,
which the source LoRA was trained on (the bench's prompts rows use them); `fresh`: the prompts of 500 names drawn with
another seed less any in the training split, the test split or the validation prompts (377 for greet), which the source
answers as it would a user's new requests. `cast`: also port with CAST from the same prompts (`--prompts`, the
bench's recipe) for a side-by-side row.

The folder is a levers.py folder (its LoRAs in FOLDER/loras are reused, trained if missing); scores are on the
same validation prompts as levers.py (another seed's names, every training and test prompt left out), never the
test split. The true answers are read only to print how many of the source's answers are right.
"""

import json
import sys
import time
from pathlib import Path

from peft import PeftModel

from castlora.bench import BenchConfig
from castlora.bench.tasks import make_echo, make_greet, train_prompts
from castlora.demo import shared_dir
from castlora.evaluate import completion_loss, exact_match, load_examples
from castlora.models import load_model, load_tokenizer
from castlora.safe_io import write_text_atomic
from castlora.train_lora import train_lora
from castlora.translate import translate

from lever_folder import exact_split


def main(task: str, src: str, tgt: str, folder: str, steps: str = "800", which: str = "train", cast: str = "") -> None:
    shared, cfg, folder = shared_dir(None), BenchConfig(), Path(folder)
    zoo = lambda name: str(shared / "zoo" / name)  # noqa: E731
    train, val = exact_split(task, folder, shared)

    def lora(model: str) -> str:
        out = folder / "loras" / f"{model}_{task}"
        if not (out / "adapter_model.safetensors").exists():
            train_lora(zoo(model), str(train.train), str(out), **cfg.lora_recipe("exact"), overwrite=True,
                       progress=False, log=lambda *a: None)
        return str(out)

    def score(model: str, adapter: str | None) -> tuple[float, float]:
        m = load_model(zoo(model))
        m = PeftModel.from_pretrained(m, adapter).eval() if adapter else m.eval()
        tok = load_tokenizer(zoo(model))
        return exact_match(m, tok, val)["accuracy"], completion_loss(m, tok, val)["completion_loss"]

    if which == "fresh":  # names of another seed, none in the training or test split or the validation prompts
        seen = {e["prompt"] for e in load_examples(train.train) + load_examples(train.test) + val}
        make = {"echo": lambda d, seed: make_echo(d, shared, seed), "greet": make_greet}[task]
        other = make(folder / "fresh", 200)
        rows = [e for e in load_examples(other.train) + load_examples(other.test) if e["prompt"] not in seen][:400]
        prompts = folder / "fresh" / f"{task}_prompts.jsonl"
        write_text_atomic(prompts, "".join(json.dumps({"text": e["prompt"]}) + "\n" for e in rows))
        truth = {e["prompt"]: e["completion"] for e in rows}
    else:
        prompts = train_prompts(train, folder / "tasks")
        truth = {e["prompt"]: e["completion"] for e in load_examples(train.train)}
    common = dict(source=zoo(src), adapter=lora(src), target=zoo(tgt), prompts=[str(prompts)], steps=int(steps),
                  batch_size=8, seq_len=cfg.seq_len, overwrite=True, progress=False, log=lambda *a: None)
    (b_acc, b_cl), (r_acc, r_cl) = score(tgt, None), score(tgt, lora(tgt))
    print(f"{task} {src}->{tgt}, {which} prompts, labels {steps} steps (CAST {cfg.exact_cast_steps}); validation ({len(val)} prompts): base {b_acc:.3f} "
          f"(completion loss {b_cl:.3f}), retrained {r_acc:.3f} ({r_cl:.3f})", flush=True)
    print("| port | exact match (ratio) | completion loss (gap recovered) | s |")
    print("|---|---:|---:|---:|")
    runs = [("labels", dict(transfer="labels"))]
    if cast:  # the bench's cast_prompts_zd: --init and --lr auto (zero-delta, 3e-3) with --prompts, 400 steps
        runs.append(("cast --prompts", dict(corpus=[str(shared / "data" / "general" / "train.txt.gz")],
                                            strength_corpus=[str(shared / "data" / "general" / "valid.txt.gz")],
                                            steps=cfg.exact_cast_steps)))
    for name, opts in runs:
        out = folder / "ports" / f"{name.split()[0]}_{which}_{opts.get('steps', steps)}_{src}_{tgt}"
        t0 = time.perf_counter()
        rec = translate(out=str(out), **{**common, **opts}).record
        wall = time.perf_counter() - t0
        acc, cl = score(tgt, str(out))
        extra = ""
        if name == "labels":
            answers = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
            right = sum(a["completion"].strip() == truth[a["prompt"]].strip() for a in answers) / len(truth)
            extra = f" ({right:.3f} of the source's answers right)"
        print(f"| {name}{extra} | {acc:.3f} ({acc / max(r_acc, 1e-9):.3f}) | {cl:.3f} "
              f"({(b_cl - cl) / (b_cl - r_cl):.3f}) | {wall:.0f} |", flush=True)
        assert rec["task_prompts"] == len(truth)


if __name__ == "__main__":
    main(*sys.argv[1:])
