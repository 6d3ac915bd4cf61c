"""What `--teacher auto` sees: each zoo base model's bits per byte, measured as translate measures
them (teacher_choice.py: whole documents, each from the model's document-start token, STRENGTH_CHARS
characters in a seeded order), and the teacher the rule picks for each pair, on
- general/train, the bench's --corpus (what auto reads without --strength-corpus), and
- general/valid, which the zoo models did not train on (what the bench and the demo pass as
  --strength-corpus).

  OMP_NUM_THREADS=1 python benchmarks/teacher_strength.py

The documents do not depend on the tokenizer, so each model is measured once per text and seed, and
every pair reads the same numbers. Seeds 0, 1, 2 show how much the document sample moves them.
"""

from castlora.corpus import read_corpus
from castlora.demo import shared_dir
from castlora.models import load_model, load_tokenizer
from castlora.teacher_choice import bits_per_byte, pick_teacher, strength_texts

MODELS = ("llama", "mistral", "neox")
PAIRS = (("mistral", "llama"), ("neox", "llama"), ("llama", "mistral"), ("llama", "neox"))
SEEDS = (0, 1, 2)

root = shared_dir(None)
texts = {(split, seed): strength_texts(read_corpus([str(root / "data" / "general" / f"{split}.txt.gz")]), seed)
         for split in ("train", "valid") for seed in SEEDS}
bpb = {}
for name in MODELS:
    model, tok = load_model(str(root / "zoo" / name)).eval(), load_tokenizer(str(root / "zoo" / name))
    for key, docs in texts.items():
        bpb[(name, *key)] = bits_per_byte(model, tok, docs, 192)  # 192: translate's target length at seq_len 128

print("| text | seed | docs | " + " | ".join(MODELS) + " |")
print("|---|---:|---:|" + "---:|" * len(MODELS))
for (split, seed), docs in texts.items():
    cells = " | ".join(f"{bpb[m, split, seed]:.4f}" for m in MODELS)
    print(f"| general/{split} | {seed} | {len(docs)} | {cells} |")
print()
print("| pair | text | source / target − 1, seeds " + ", ".join(map(str, SEEDS)) + " | teacher |")
print("|---|---|---|---|")
for src, tgt in PAIRS:
    for split in ("train", "valid"):
        rel = [bpb[src, split, s] / bpb[tgt, split, s] - 1 for s in SEEDS]
        picks = sorted({pick_teacher(bpb[src, split, s], bpb[tgt, split, s]) for s in SEEDS})
        print(f"| {src}->{tgt} | general/{split} | " + ", ".join(f"{r:+.1%}" for r in rel) + f" | {'/'.join(picks)} |")
