"""Can the target estimate its own LoRA effect in context? The teacher is the limit (docs/results.md,
session 20): the base must be the target's, and the source LoRA's log-ratio does not carry to it. A
teacher that stands on the target's base and needs no task data is the target itself, prompted with text
the source generates with its LoRA (context distillation: the student learns to predict without the
prompt what the target predicts with it). This measures the ceiling of such a teacher before training
one: the target base's loss on the task's validation text (levers.py's, in windows of 128 target
tokens) after a prefix of P tokens of generated text, against a prefix of general text and none.

  OMP_NUM_THREADS=1 python benchmarks/context_probe.py shakespeare neox llama runs/lev_nl

DIR must hold the LoRAs (DIR/loras/{model}_{task}, as levers.py trains them)."""

import math
import random

import torch
import torch.nn.functional as F
from lever_folder import lever_folder, with_adapter

from castlora.bench.tasks import get_task
from castlora.corpus import read_corpus, read_documents
from castlora.evaluate import doc_start_id, text_windows
from castlora.generate import sample_texts
from castlora.models import load_model

PREFIXES = (64, 128, 256, 380)  # target tokens; with a 128-token window the longest fits the zoo's 512


def prefix_ids(pieces: list[list[int]], first: int, n: int) -> list[int]:
    """The last `n` tokens of pieces[first], pieces[first + 1], ... (each a text and a blank line, tokenized)."""
    ids, j = [], first
    while len(ids) < n:
        ids += pieces[j % len(pieces)]
        j += 1
    return ids[len(ids) - n:] if n else []


@torch.no_grad()
def prefixed_loss(model, tok, windows: list[list[int]], texts: list[str], n: int) -> float:
    """Mean loss on every window's tokens after the document start and `n` prefix tokens (3 texts apart per
    window, so windows see different prefixes)."""
    start, total, count = doc_start_id(tok), 0.0, 0
    pieces = tok([t + "\n\n" for t in texts], add_special_tokens=False)["input_ids"]  # once, not per window
    for i, w in enumerate(windows):
        head = [start] + prefix_ids(pieces, 3 * i, n)
        ids = torch.tensor([head + w])
        logits = model(input_ids=ids).logits[0, len(head) - 1:-1].float()
        total += float(F.cross_entropy(logits, ids[0, len(head):], reduction="sum"))
        count += len(w)
    return total / count


def main() -> None:
    lf = lever_folder()
    general = read_corpus([str(lf.shared / "data" / "general" / "train.txt.gz")])
    rng = random.Random(0)
    prompts = rng.sample(general, 64)  # translate's own prompts: the first 8 tokens of general documents
    generated = sample_texts(with_adapter(lf, lf.src), lf.tok_s, prompts, 48, max_new_tokens=128, progress=False)
    plain = rng.sample(general, 48)
    docs = read_documents(get_task(lf.task, lf.shared, lf.out / "tasks").train)[-1:]
    start = doc_start_id(lf.tok_t)
    windows = [w[1:] if w[0] == start else w for w in text_windows(lf.tok_t, docs, 128, max_tokens=6000)]
    base, retrained = load_model(str(lf.zoo / lf.tgt)).eval(), with_adapter(lf, lf.tgt)
    b0 = prefixed_loss(base, lf.tok_t, windows, generated, 0)
    r0 = prefixed_loss(retrained, lf.tok_t, windows, generated, 0)
    print(f"{lf.task} {lf.src}->{lf.tgt}: {len(windows)} validation windows of 128 tokens; no prefix: base {b0:.3f}, "
          f"retrained {r0:.3f}")
    print("| prefix tokens | base after generated text (ratio, gap recovered) | base after general text (ratio, "
          "gap) | retrained after generated text |")
    print("|---:|---:|---:|---:|")

    def scored(loss: float) -> str:  # against the retrained LoRA with no prefix, as levers.py scores a port
        return f"{loss:.3f} ({math.exp(r0 - loss):.3f}, {(b0 - loss) / (b0 - r0):.3f})"

    for n in PREFIXES:
        g = prefixed_loss(base, lf.tok_t, windows, generated, n)
        p = prefixed_loss(base, lf.tok_t, windows, plain, n)
        r = prefixed_loss(retrained, lf.tok_t, windows, generated, n)
        print(f"| {n} | {scored(g)} | {scored(p)} | {r:.3f} |", flush=True)


if __name__ == "__main__":
    main()
