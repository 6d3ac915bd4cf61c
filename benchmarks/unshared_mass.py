"""How much probability does each target put on tokens outside the shared vocabulary?

CAST's KL renormalises both distributions over the shared vocabulary, so a port's mass on the
target's other tokens is never trained. The retrained LoRA moves mass off them on task text; this
prints the mean log of the mass on the shared vocabulary (0 = all of it) for the target base, the
target with its retrained LoRA and the named ports, on the general and the task validation text of
lever_folder.validation_batches (every target position).

  cd benchmarks && OMP_NUM_THREADS=1 python unshared_mass.py shakespeare neox llama ../runs/lev_nl PORT [PORT...]
"""

import torch

from lever_folder import lever_folder, validation_batches, with_adapter

lf = lever_folder()
batches = validation_batches(lf)
ids = lf.vocab.ids_t


@torch.no_grad()
def shared_mass(model) -> dict[str, float]:
    res = {}
    for name, bs in batches.items():
        total = count = 0.0
        for b in bs:
            lp = torch.log_softmax(model(input_ids=b.ids_t, attention_mask=b.mask_t).logits.float(), -1)
            mass = torch.logsumexp(lp.index_select(-1, ids), -1)[b.mask_t.bool()]
            total, count = total + mass.sum().item(), count + mass.numel()
        res[name] = total / count
    return res


def row(name: str, values: dict[str, float]) -> str:
    return f"| {name} | " + " | ".join(f"{v:.3f}" for v in values.values()) + " |"


target = with_adapter(lf, lf.tgt)
retrained = shared_mass(target)
with target.disable_adapter():
    base = shared_mass(target)
del target
print(f"{lf.task} {lf.src}->{lf.tgt}: mean log mass on the {lf.vocab.size} shared tokens, per target position")
print("| target | " + " | ".join(f"{k} text" for k in base) + " |")
print("|---|" + "---:|" * len(base))
print(row("base", base))
print(row("retrained LoRA", retrained))
for name in lf.ports:
    port = with_adapter(lf, lf.tgt, name)
    print(row(f"port {name}", shared_mass(port)), flush=True)
    del port
