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

from castlora.losses import kl_divergence
from castlora.models import load_model

from lever_folder import aligned_log_probs, lever_folder, validation_batches

lf = lever_folder()
task, src, tgt, out, ports, zoo, vocab = lf.task, lf.src, lf.tgt, lf.out, lf.ports, lf.zoo, lf.vocab
batches = validation_batches(lf)


def log_probs(model, side: str) -> dict[str, list[torch.Tensor]]:
    return aligned_log_probs(model, side, batches, vocab)


source = PeftModel.from_pretrained(load_model(str(zoo / src)), str(out / "loras" / f"{src}_{task}")).eval()
teachers = {"source+LoRA": log_probs(source, "s")}
with source.disable_adapter():
    teachers["source base"] = log_probs(source, "s")
del source

students = {"target base": None, "target + retrained LoRA": out / "loras" / f"{tgt}_{task}",
            **{f"port {p}": out / "ports" / p for p in ports}}
cols = [f"KL({t} || .) on {k}" for t in teachers for k in batches]
print(f"{task} {src}->{tgt}; shared vocabulary {vocab.size}; "
      f"{sum(b.num_aligned for b in batches['general'])} aligned general positions")
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
