"""How much a source LoRA gains on its own model, in the units a port is judged in: bits per byte of the same text.

A port's gap recovered is the target's gain from the port over the gain of the LoRA retrained on the target. The
port has nothing to carry but what the source's LoRA does on the source, so this prints that gain next to the
retrained one, on the same bytes of the task's test split (its first 100 kB): each model reads the text in its own
tokens (every token scored, documents following BOS/EOS), so per-byte losses compare across tokenizers where
per-token ones do not. For each bench run folder (results.json, loras/, ports/) it prints, per cell:

- the source LoRA's own gain over the retrained LoRA's gain (both bits per byte): the share of the target's gap
  that the source's LoRA covers on its own model;
- the port's gap recovered on this text, and the share of the source LoRA's own gain the port delivers ("kept").

  OMP_NUM_THREADS=1 python benchmarks/source_gain.py runs/m45a runs/m45b runs/m45e runs/m45f
"""

import json
import math
import sys
from functools import cache
from pathlib import Path

from peft import PeftModel

from castlora.bench.tasks import get_task
from castlora.corpus import read_documents
from castlora.demo import shared_dir
from castlora.evaluate import text_loss
from castlora.models import load_model, load_tokenizer

MAX_BYTES = 100_000  # the test split's first bytes, cut at a line end (~30k tokens, about what the bench scores)
shared = shared_dir(None)


@cache
def test_text(task: str) -> tuple[str, ...]:
    """The test split's documents in order, the last one cut at the line end before MAX_BYTES."""
    docs, left = [], MAX_BYTES
    for doc in read_documents(get_task(task, shared, Path("runs/source_gain_tasks")).test):
        if len(doc.encode()) > left:
            doc = doc.encode()[:left].decode(errors="ignore").rpartition("\n")[0]
            if doc:
                docs.append(doc)
            break
        docs.append(doc)
        left -= len(doc.encode())
    return tuple(docs)


@cache
def bits_per_byte(model: str, adapter: str | None, task: str) -> float:
    m = load_model(str(shared / "zoo" / model))
    if adapter:
        m = PeftModel.from_pretrained(m, adapter).eval()
    docs = list(test_text(task))
    out = text_loss(m, load_tokenizer(str(shared / "zoo" / model)), docs, seq_len=256, doc_start=True)
    return out["mean_loss"] * out["tokens"] / math.log(2) / sum(len(d.encode()) for d in docs)


rows = []
for folder in map(Path, sys.argv[1:]):
    cell = json.loads((folder / "results.json").read_text())["rows"][0]
    (src, tgt), task = cell["pair"].split("->"), cell["task"]
    base_s, lora_s = bits_per_byte(src, None, task), bits_per_byte(src, str(folder / "loras" / f"{src}_{task}"), task)
    base_t, ret_t = bits_per_byte(tgt, None, task), bits_per_byte(tgt, str(folder / "loras" / f"{tgt}_{task}"), task)
    for port in sorted((folder / "ports").iterdir()):
        p = bits_per_byte(tgt, str(port), task)
        gain_t, gain_s = base_t - ret_t, base_s - lora_s
        rows.append(f"| {task} {src}→{tgt} | {port.name} | {base_s:.4f} / {lora_s:.4f} | {base_t:.4f} / {ret_t:.4f} "
                    f"| {p:.4f} | {gain_s / gain_t:.3f} | {(base_t - p) / gain_t:.3f} | {(base_t - p) / gain_s:.3f} |")
    print(f"{folder}: done", flush=True)

print(f"\nbits per byte on the first {MAX_BYTES:,} bytes of each test split (cut at a line end)")
print("| cell | port | source base / + its LoRA | target base / retrained | target + port "
      "| source LoRA's gain / retrained gain | port's gap recovered | kept of the source LoRA's gain |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
print("\n".join(rows))
