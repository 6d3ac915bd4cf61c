"""How much of the gap could a port recover by matching its teacher exactly? The imitation ceiling.

CAST trains the target to match a teacher on general and generated text. If it matched the teacher
perfectly, its score on task text would be the teacher's own score there. This scores every teacher
castlora has,

    log p = (1 - w) log p_S + w log p_T + a (log p_S+LoRA - log p_S),   renormalised,

as a predictor of the target's next token on the task's validation text (the last training document,
as in levers.py), next to the target base and the target with its retrained LoRA, and prints the gap
each teacher would recover. All three are compared on the same footing: aligned positions whose next
target token is in the shared vocabulary, with every distribution renormalised over that vocabulary
(a teacher has no probability for the rest). Ports named after DIR (DIR/ports/NAME) are scored the
same way, so their distance to the ceiling is read in the same units, with their KL from the source
teacher and from the blend (as the retrained LoRA's).

  OMP_NUM_THREADS=1 python benchmarks/teacher_ceiling.py shakespeare neox llama runs/lev_nl [PORT...]

DIR holds DIR/loras/{model}_{task} (levers.py trains them there).
"""

import torch

from lever_folder import aligned_log_probs, lever_folder, validation_batches, with_adapter

W = (0.0, 0.25, 0.5, 0.75, 1.0)
A = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5)  # a = 0: the LoRA off, the imitation control's teacher

lf = lever_folder()
task, src, tgt, vocab = lf.task, lf.src, lf.tgt, lf.vocab
batches = {task: validation_batches(lf)[task]}

# The next target token at every aligned position, as an index into the shared vocabulary (-1: none).
shared_index = torch.full((len(lf.tok_t),), -1, dtype=torch.long)
shared_index[vocab.ids_t] = torch.arange(vocab.size)
nexts = []
for b in batches[task]:
    rows = torch.arange(b.pos_t.shape[0])[:, None].expand_as(b.pos_t)
    nxt = (b.pos_t + 1).clamp(max=b.ids_t.shape[1] - 1)
    real = b.mask_t.bool()[rows, nxt] & (b.pos_t + 1 < b.ids_t.shape[1])  # a real next token exists
    idx = torch.where(real, shared_index[b.ids_t[rows, nxt]], torch.full_like(nxt, -1))
    nexts.append(idx[b.pos_mask])
keep = [n >= 0 for n in nexts]
n_aligned, n_kept = sum(n.numel() for n in nexts), sum(int(k.sum()) for k in keep)


def loss(log_probs: list[torch.Tensor]) -> float:
    """Mean negative log-likelihood of the next target token, over the kept positions."""
    total = sum(-lp[k].gather(1, n[k][:, None]).sum().item() for lp, n, k in zip(log_probs, nexts, keep))
    return total / n_kept


source = with_adapter(lf, src)
lp_sl = aligned_log_probs(source, "s", batches, vocab)[task]
with source.disable_adapter():
    lp_s = aligned_log_probs(source, "s", batches, vocab)[task]
del source
target = with_adapter(lf, tgt)
lp_o = aligned_log_probs(target, "t", batches, vocab)[task]
with target.disable_adapter():
    lp_t = aligned_log_probs(target, "t", batches, vocab)[task]
del target
base, oracle = loss(lp_t), loss(lp_o)


def kl_from(w: float, a: float, log_probs: list[torch.Tensor]) -> float:
    """Mean KL(teacher (w, a) || model) over every aligned position."""
    total = sum((t.exp() * (t - lp)).sum().item() for t, lp in zip(teacher(w, a), log_probs))
    return total / n_aligned


def gap(value: float) -> float:
    return (base - value) / (base - oracle)


def teacher(w: float, a: float) -> list[torch.Tensor]:
    return [torch.log_softmax((1 - w) * s + w * t + a * (sl - s), dim=-1)
            for s, sl, t in zip(lp_s, lp_sl, lp_t)]


print(f"{task} {src}->{tgt}: next-token loss on {n_kept} of {n_aligned} aligned positions of the task's "
      f"validation text (next target token in the shared vocabulary of {vocab.size})")
print(f"target base {base:.3f}, target + retrained LoRA {oracle:.3f}; "
      f"source + LoRA {loss(lp_sl):.3f} (gap {gap(loss(lp_sl)):.3f}), source base {loss(lp_s):.3f}")
print(f"KL(source teacher || target) base {kl_from(0, 1, lp_t):.3f}, retrained {kl_from(0, 1, lp_o):.3f}; "
      f"KL(blend || target) base {kl_from(0.5, 1, lp_t):.3f}, retrained {kl_from(0.5, 1, lp_o):.3f}")
print("\ngap recovered by a port that matched the teacher exactly (loss in brackets)")
print("| w \\ a | " + " | ".join(f"{a:g}" for a in A) + " |")
print("|---|" + "---:|" * len(A))
for w in W:
    cells = []
    for a in A:
        value = loss(teacher(w, a))
        cells.append(f"{gap(value):.3f} ({value:.3f})")
    print(f"| {w:g} | " + " | ".join(cells) + " |", flush=True)

def additive(w: float, a: float, f: float) -> list[torch.Tensor]:
    """A teacher in probability space instead of log space: p = p_S + a (p_S+LoRA - p_S) + w (p_T - p_S),
    floored at f p_T and renormalised. At w = 1 and a = 0 it is p_T exactly, so none of it is the
    source base model (the log-space delta teacher, w = 1, is that too, but moves p_T by the LoRA's
    ratio, which session 12 found is not what the LoRA does on T); f = 1 keeps only the mass the LoRA adds."""
    out = []
    for s, sl, t in zip(lp_s, lp_sl, lp_t):
        p = torch.maximum(s.exp() + a * (sl.exp() - s.exp()) + w * (t.exp() - s.exp()), f * t.exp())
        out.append((p / p.sum(-1, keepdim=True)).log())
    return out


AA = (1.0, 2.0, 3.0)
print("\nthe same for the probability-space teachers (w, f) at a = " + ", ".join(f"{a:g}" for a in AA))
print("| w, f | " + " | ".join(f"a {a:g}" for a in AA) + " |")
print("|---|" + "---:|" * len(AA))
for w, f in ((0.75, 0.7), (0.75, 1.0), (1.0, 0.7), (1.0, 1.0)):
    print(f"| {w:g}, {f:g} | " + " | ".join(f"{gap(loss(additive(w, a, f))):.3f}" for a in AA) + " |", flush=True)
for name in lf.ports:
    port = with_adapter(lf, tgt, name)
    lp_port = aligned_log_probs(port, "t", batches, vocab)[task]
    value = loss(lp_port)
    print(f"port {name}: loss {value:.3f}, gap recovered {gap(value):.3f}; KL(source teacher || port) "
          f"{kl_from(0, 1, lp_port):.3f}, KL(blend || port) {kl_from(0.5, 1, lp_port):.3f}", flush=True)
    del port
