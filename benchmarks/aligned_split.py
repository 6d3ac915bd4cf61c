"""Where does a port lose the gap: at the positions CAST trains on, or between them?

CAST's KL only sees aligned positions (both models have read the same prefix). Between them, inside
a word that the target splits and the source does not, the target gets no teacher signal. This
scores the target base, the target with its retrained LoRA and the named ports on the task's
validation text (the last training document, as in levers.py), with the full target vocabulary,
and splits each one's next-token loss into aligned and unaligned target positions.

  OMP_NUM_THREADS=1 python benchmarks/aligned_split.py shakespeare neox llama runs/lev_nl PORT [PORT...]

DIR holds DIR/loras/{model}_{task} and DIR/ports/NAME (levers.py writes them there).
"""

import torch
import torch.nn.functional as F

from lever_folder import lever_folder, validation_batches, with_adapter

lf = lever_folder()
batches = validation_batches(lf)[lf.task]

# Per target position p (predicting token p + 1): is there a real next token, and is p aligned?
real, aligned = zip(*(b.target_positions() for b in batches))


@torch.no_grad()
def losses(model) -> list[torch.Tensor]:
    out = []
    for b in batches:
        logits = model(input_ids=b.ids_t, attention_mask=b.mask_t).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), b.ids_t[:, 1:], reduction="none")
        out.append(F.pad(nll, (0, 1)))
    return out


def split(nll: list[torch.Tensor]) -> tuple[float, float]:
    a = sum(n[m].sum().item() for n, m in zip(nll, aligned))
    u = sum(n[r & ~m].sum().item() for n, r, m in zip(nll, real, aligned))
    return a, u


n_a = sum(int(m.sum()) for m in aligned)
n_u = sum(int((r & ~m).sum()) for r, m in zip(real, aligned))
target = with_adapter(lf, lf.tgt)
ret = split(losses(target))
with target.disable_adapter():
    base = split(losses(target))
del target
print(f"{lf.task} {lf.src}->{lf.tgt}: {n_a} aligned and {n_u} unaligned target positions of the task's validation text")
print(f"share of the retrained LoRA's gain (summed loss) at aligned positions: "
      f"{(base[0] - ret[0]) / (base[0] - ret[0] + base[1] - ret[1]):.3f}")
print(f"mean loss aligned: base {base[0] / n_a:.3f}, retrained {ret[0] / n_a:.3f}; "
      f"unaligned: base {base[1] / n_u:.3f}, retrained {ret[1] / n_u:.3f}")
print("| port | gap aligned | gap unaligned | gap all |")
print("|---|---:|---:|---:|")
for name in lf.ports:
    port = with_adapter(lf, lf.tgt, name)
    p = split(losses(port))
    print(f"| {name} | {(base[0] - p[0]) / (base[0] - ret[0]):.3f} | {(base[1] - p[1]) / (base[1] - ret[1]):.3f} | "
          f"{(sum(base) - sum(p)) / (sum(base) - sum(ret)):.3f} |", flush=True)
    del port
