"""A teacher lever tried outside the library first: the source LoRA's effect applied to another base with
its size kept. CAST's teachers add the LoRA's log-ratio f = log p_S+LoRA - log p_S to a base; on the target's
base the same f moves the distribution by a different amount than on the source's (a piece the source gives
almost nothing gets a large f, which on a base that already rates it overshoots), and session 20
(docs/results.md) found the delta teacher (f on the target's base) the worst teacher. Here, per position,

    log p = log p_B + a f, renormalised,   p_B ∝ p_S^(1-w) p_T^w,
    a >= 0 such that KL(p || p_B) = KL(p_S+LoRA || p_S),

so the teacher moves its base exactly as far as the LoRA moves the source there (found by bisection;
KL(p || p_B) grows with a). w = 0 is the source teacher (a = 1), w = 1 (`--w`) the delta teacher with the
LoRA's size calibrated, w = 0.5 the blend's base. `--toward 1` moves the target's base toward p_S+LoRA
instead, log p = (1 - a) log p_T + a log p_S+LoRA with a in [0, 1] at the same size (w and --a-max unused):
the target where the LoRA is idle, S+LoRA's own distribution where it acts the most. Arguments as levers.py,
whose code runs unchanged after the teacher is swapped; use `teacher=source` so auto does not measure the source:

  OMP_NUM_THREADS=1 python benchmarks/calibrated_teacher.py --w 1 shakespeare neox llama runs/lev_nl \
      'cal_w1:teacher=source,generate=1200,mix=1'
"""

import torch

import castlora.train as train
from castlora.losses import lora_effect
from lever_folder import levers_with_teacher, pop_option, teacher_parts

w = pop_option("--w", 1.0)
a_max = pop_option("--a-max", 4.0)
toward = bool(pop_option("--toward", 0.0))
if toward:
    w, a_max = 1.0, 1.0
source_side = train.teacher_outputs
seen = []  # the mean a of every teacher batch, printed at the end


def kl_from(logp_base: torch.Tensor, effect: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per position: KL(p_a || p_base) where log p_a = log_softmax(log p_base + a f)."""
    logp = torch.log_softmax(logp_base + a.unsqueeze(-1) * effect, dim=-1)
    return (logp.exp() * (logp - logp_base)).sum(-1)


def calibrated_scale(logp_base: torch.Tensor, effect: torch.Tensor, size: torch.Tensor,
                     steps: int = 18) -> torch.Tensor:
    """Per position, the a in [0, a_max] at which KL(p_a || p_base) = size (a_max where even that falls short)."""
    lo = torch.zeros_like(size)
    hi = torch.full_like(size, a_max)
    for _ in range(steps):
        mid = (lo + hi) / 2
        short = kl_from(logp_base, effect, mid) < size
        lo = torch.where(short, mid, lo)
        hi = torch.where(short, hi, mid)
    return (lo + hi) / 2


def calibrated_outputs(source, source_inner, target, wrappers, ports, batch, cols, teacher, tau, want_z,
                       *args, **kw):
    """The source side as CAST computes it, with the LoRA's effect put on p_B at the size it has on the source."""
    with_lora, lp_base, lp_t = teacher_parts(source_side, source, source_inner, target, wrappers, ports, batch,
                                             cols, tau, want_z)
    with torch.no_grad():
        lp_lora = with_lora.logp.to(lp_t.device)
        lp_s = lp_base.to(lp_t.device)
        logp_b = torch.log_softmax((1 - w) * lp_s + w * lp_t, dim=-1)
        effect = lp_lora - logp_b if toward else lp_lora - lp_s
        a = calibrated_scale(logp_b, effect, lora_effect(lp_lora, lp_s))
        seen.append(float(a.mean()))
        logp = torch.log_softmax(logp_b + a.unsqueeze(-1) * effect, dim=-1)
    return train.TeacherOutput(logp=logp, z=with_lora.z)


levers_with_teacher(calibrated_outputs)
span = f"{min(seen):.3f}-{max(seen):.3f}" if seen else "nan"
mean_a = sum(seen) / max(1, len(seen))
print(f"calibrated teacher (w {w:g}, a_max {a_max:g}, toward {toward}): mean a {mean_a:.3f} over {len(seen)} teacher "
      f"batches; {span}", flush=True)
