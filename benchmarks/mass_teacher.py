"""A teacher lever tried outside the library first: the source LoRA's effect added in probability,
not in log-probability. CAST's teachers add the LoRA's log-ratio, log p_S+LoRA - log p_S, to a base;
session 20 (docs/results.md) found that this log-ratio does not carry to the target's base (the delta
teacher is the worst teacher) and that the teacher's base must be the target's. A log-ratio is
largest where the source gives a piece almost nothing, so on another model's base it moves pieces
that base already rates; a change of mass moves only what the LoRA moves on the source. Here

    p = p_S+LoRA + W (p_T - p_S), floored at 1e-8 and renormalised

(W = 1: the target's distribution plus the mass the LoRA moves on the source; W = 0.5: the blend's
analogue). Arguments as levers.py, whose code runs unchanged after the teacher is swapped; use
`teacher=source` so auto does not measure the source:

  OMP_NUM_THREADS=1 python benchmarks/mass_teacher.py --weight 1 shakespeare neox llama runs/lev_nl \
      'mass_w1:teacher=source,generate=1200,mix=1'
"""

import torch

import castlora.train as train
from lever_folder import levers_with_teacher, pop_option, teacher_parts

weight = pop_option("--weight", 1.0)
source_side = train.teacher_outputs


def mass_outputs(source, source_inner, target, wrappers, ports, batch, cols, teacher, tau, want_z, *args, **kw):
    """The source side as CAST computes it, with the teacher p_S+LoRA + W (p_T - p_S)."""
    with_lora, lp_base, lp_t = teacher_parts(source_side, source, source_inner, target, wrappers, ports, batch,
                                             cols, tau, want_z)
    with torch.no_grad():
        p = with_lora.logp.exp().to(lp_t.device) + weight * (lp_t.exp() - lp_base.exp())
        p = p.clamp_min(1e-8)
        logp = (p / p.sum(-1, keepdim=True)).log()
    return train.TeacherOutput(logp=logp, z=with_lora.z)


levers_with_teacher(mass_outputs)
