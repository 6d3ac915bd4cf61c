"""Which teacher is closest to the port we would like to reach? A diagnostic for the teacher.

CAST pulls the target towards a teacher; the port we want is the target with a LoRA retrained on
the task (the "oracle", which CAST never sees). Every teacher castlora has is one point of

    log p = (1 - w) log p_S + w log p_T + a (log p_S+LoRA - log p_S),   renormalised,

w: how much of the source base is swapped for the target's (0 = source teacher, 0.5 = the blend,
1 = the delta teacher), a: how much of the LoRA's effect on the source is applied (1 in every
teacher so far). This prints KL(oracle || teacher) over a grid of (w, a), on aligned positions over
the shared vocabulary, on general validation text and on the task's validation text (the last
training document, as in levers.py). A teacher closer to the oracle is a better target for the
heads, if the heads can follow it; the levers.py scores of trained ports say whether they do.

  OMP_NUM_THREADS=1 python benchmarks/teacher_oracle.py shakespeare neox llama runs/lev_nl

DIR holds DIR/loras/{model}_{task} (levers.py trains them there).
"""

import torch

from castlora.losses import kl_divergence

from lever_folder import aligned_log_probs, lever_folder, validation_batches, with_adapter

W = (0.0, 0.25, 0.5, 0.75, 1.0)
A = (0.5, 0.75, 1.0, 1.5, 2.0)

lf = lever_folder()
task, src, tgt, vocab = lf.task, lf.src, lf.tgt, lf.vocab
batches = validation_batches(lf)


def log_probs(model, side: str) -> dict[str, list[torch.Tensor]]:
    return aligned_log_probs(model, side, batches, vocab)


source = with_adapter(lf, src)
lp_sl = log_probs(source, "s")
with source.disable_adapter():
    lp_s = log_probs(source, "s")
del source
target = with_adapter(lf, tgt)
oracle = log_probs(target, "t")
with target.disable_adapter():
    lp_t = log_probs(target, "t")
del target


def kl_to_oracle(name: str, w: float, a: float) -> float:
    kls = []
    for o, s, sl, t, b in zip(oracle[name], lp_s[name], lp_sl[name], lp_t[name], batches[name]):
        teacher = torch.log_softmax((1 - w) * s + w * t + a * (sl - s), dim=-1)
        kls.append(kl_divergence(o, teacher).item() * b.num_aligned)
    return sum(kls) / sum(b.num_aligned for b in batches[name])


print(f"{task} {src}->{tgt}: KL(target + retrained LoRA || teacher); shared vocabulary {vocab.size}")
for name in batches:
    base = sum(kl_divergence(o, t).item() * b.num_aligned for o, t, b in zip(oracle[name], lp_t[name], batches[name]))
    print(f"\n{name} text ({sum(b.num_aligned for b in batches[name])} aligned positions); "
          f"KL(oracle || target base) = {base / sum(b.num_aligned for b in batches[name]):.3f}")
    print("| w \\ a | " + " | ".join(f"{a:g}" for a in A) + " |")
    print("|---|" + "---:|" * len(A))
    for w in W:
        print(f"| {w:g} | " + " | ".join(f"{kl_to_oracle(name, w, a):.3f}" for a in A) + " |", flush=True)
