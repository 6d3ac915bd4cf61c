"""How close is each version of the target to CAST's teacher? A diagnostic for the weak cells.

CAST trains the target to match source+LoRA on general text. If the *retrained* target LoRA, the
port we would like to reach, is itself far from that teacher, the KL CAST minimises is a poor
stand-in for the task score: much of it is the two base models' difference, which no LoRA removes.

Prints, for the target base, the target with its retrained LoRA and each port given, the KL from the
teacher (source+LoRA, and source base) on aligned positions over the shared vocabulary, on general
validation text and on the task's validation text (the last training document, as in levers.py).

  OMP_NUM_THREADS=1 python benchmarks/kl_to_teacher.py shakespeare llama mistral runs/lev_lm lr3e-2 ...

DIR is a levers.py folder: DIR/loras/{model}_{task} and DIR/ports/NAME.
"""


import torch
from peft import PeftModel

from castlora.bench.tasks import get_task
from castlora.closed_form import gather_aligned
from castlora.corpus import make_chunks, read_corpus, read_documents
from castlora.losses import kl_divergence, shared_log_probs
from castlora.models import load_model
from castlora.tokens import encode_pair

from lever_folder import lever_folder

lf = lever_folder()
task, src, tgt, out, ports, shared, zoo = lf.task, lf.src, lf.tgt, lf.out, lf.ports, lf.shared, lf.zoo
tok_s, tok_t, vocab = lf.tok_s, lf.tok_t, lf.vocab
texts = {
    "general": make_chunks(read_corpus([str(shared / "data" / "general" / "valid.txt.gz")]), tok_s, 128, 32, seed=1),
    task: make_chunks(read_documents(get_task(task, shared, out / "tasks").train)[-1:], tok_s, 128, 32, seed=1),
}
batches = {k: [encode_pair(v[i:i + 8], tok_s, tok_t, 128, 192) for i in range(0, len(v), 8)] for k, v in texts.items()}


@torch.no_grad()
def log_probs(model, side: str) -> dict[str, list[torch.Tensor]]:
    ids = vocab.ids_s if side == "s" else vocab.ids_t
    res = {}
    for name, bs in batches.items():
        res[name] = []
        for b in bs:
            ids_in, mask, pos = (b.ids_s, b.mask_s, b.pos_s) if side == "s" else (b.ids_t, b.mask_t, b.pos_t)
            logits = model(input_ids=ids_in, attention_mask=mask).logits
            res[name].append(shared_log_probs(gather_aligned(logits, pos, b.pos_mask), ids))
    return res


source = PeftModel.from_pretrained(load_model(str(zoo / src)), str(out / "loras" / f"{src}_{task}")).eval()
teachers = {"source+LoRA": log_probs(source, "s")}
with source.disable_adapter():
    teachers["source base"] = log_probs(source, "s")
del source

students = {"target base": None, "target + retrained LoRA": out / "loras" / f"{tgt}_{task}",
            **{f"port {p}": out / "ports" / p for p in ports}}
cols = [f"KL({t} || .) on {k}" for t in teachers for k in batches]
print(f"{task} {src}->{tgt}; shared vocabulary {vocab.size}; {sum(len(v) for v in texts['general'])} general chars")
print("| target | " + " | ".join(cols) + " |")
print("|---|" + "---:|" * len(cols))
for name, adapter in students.items():
    model = load_model(str(zoo / tgt))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    lp = log_probs(model, "t")
    cells = []
    for t in teachers.values():
        for k in batches:
            kls = [kl_divergence(a, b).item() for a, b in zip(t[k], lp[k])]
            cells.append(f"{sum(kls) / len(kls):.3f}")
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
