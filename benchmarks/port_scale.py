"""Does a port carry too little of the LoRA's effect? Scale each port's LoRA and score it again.

A port trained on general text may learn a weaker version of the LoRA's effect than the task needs.
This multiplies every LoRA layer's scaling of each port (and of the retrained target LoRA, for
reference) by s and prints the validation loss (the last training document, as in levers.py) and
its gap recovered. A diagnostic on validation text only: it reads no test split.

  OMP_NUM_THREADS=1 python benchmarks/port_scale.py shakespeare neox llama runs/lev_nl dw0.5 bl_a75

DIR is a levers.py folder: DIR/loras/{model}_{task} and DIR/ports/NAME.
"""

import contextlib

from peft import PeftModel
from peft.tuners.lora import LoraLayer

from castlora.bench.tasks import get_task
from castlora.corpus import read_documents
from castlora.evaluate import text_loss
from castlora.models import load_model

from lever_folder import lever_folder

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)

lf = lever_folder()
task, tgt, out, shared, zoo, tok_t = lf.task, lf.tgt, lf.out, lf.shared, lf.zoo, lf.tok_t
val_docs = read_documents(get_task(task, shared, out / "tasks").train)[-1:]


def loss(model) -> float:
    return text_loss(model, tok_t, val_docs, seq_len=256, max_tokens=20000)["mean_loss"]


@contextlib.contextmanager
def scaled(model, s: float):
    """Every LoRA layer's scaling times s, restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [dict(m.scaling) for m in layers]
    try:
        for m in layers:
            for k in m.scaling:
                m.scaling[k] *= s
        yield model
    finally:
        for m, sc in zip(layers, saved):
            m.scaling.update(sc)


base = loss(load_model(str(zoo / tgt)))
retrained_path = out / "loras" / f"{tgt}_{task}"
retrained = loss(PeftModel.from_pretrained(load_model(str(zoo / tgt)), str(retrained_path)).eval())
print(f"{task} {lf.src}->{tgt}: validation loss, base {base:.3f}, retrained {retrained:.3f}; "
      f"cells: loss (gap recovered) with the LoRA scaled by s")
print("| LoRA | " + " | ".join(f"s = {s:g}" for s in SCALES) + " |")
print("|---|" + "---:|" * len(SCALES))
for name, path in [("retrained", retrained_path)] + [(f"port {p}", out / "ports" / p) for p in lf.ports]:
    model = PeftModel.from_pretrained(load_model(str(zoo / tgt)), str(path)).eval()
    cells = []
    for s in SCALES:
        with scaled(model, s):
            v = loss(model)
        cells.append(f"{v:.3f} ({(base - v) / (base - retrained):.3f})")
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
