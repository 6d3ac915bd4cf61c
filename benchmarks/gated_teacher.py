"""A teacher lever tried outside the library first: the blend's base weight set per position by how much
the source LoRA acts there. The blend, log p = log p_S+LoRA + w (log p_T - log p_S) with w 0.5, keeps half
the source base at every position; session 20 (docs/results.md) found that this half base costs about half
of the gap the blend misses (the oracle's effect on it loses 0.13). Where the LoRA does not act, the blend
teaches only the source base's habits (the imitation control's signal), and the best estimate of the
target with its LoRA there is the target itself. So here

    w = w0 + (w_idle - w0) exp(-e / (K mean(e))),   e = KL(S+LoRA || S) at the position,

w0 the blend's 0.5 (`--w0`), w_idle 1 (`--w-idle`): the target base where the LoRA does nothing, the blend
where it acts the most; K (`--scale`) says how fast, in units of the batch's mean effect. `--w-idle` below
w0 gates the other way: more of the source where the LoRA is idle. Arguments as levers.py, whose code
runs unchanged after the teacher is swapped; use `teacher=source` so auto does not measure the source:

  OMP_NUM_THREADS=1 python benchmarks/gated_teacher.py --scale 1 shakespeare neox llama runs/lev_nl \
      'gate_k1:teacher=source,generate=1200,mix=1'
"""

import torch

import castlora.train as train
from castlora.losses import delta_teacher, lora_effect
from lever_folder import levers_with_teacher, pop_option, teacher_parts

w0 = pop_option("--w0", 0.5)
w_idle = pop_option("--w-idle", 1.0)
scale = pop_option("--scale", 1.0)
source_side = train.teacher_outputs
seen = []  # the mean w of every teacher batch, printed at the end


def gated_outputs(source, source_inner, target, wrappers, ports, batch, cols, teacher, tau, want_z, *args, **kw):
    """The source side as CAST computes it, with the blend's w set per position by the LoRA's effect there."""
    with_lora, lp_base, lp_t = teacher_parts(source_side, source, source_inner, target, wrappers, ports, batch,
                                             cols, tau, want_z)
    with torch.no_grad():
        lp_lora = with_lora.logp.to(lp_t.device)
        effect = lora_effect(lp_lora, lp_base)
        w = w0 + (w_idle - w0) * torch.exp(-effect / (scale * effect.mean()).clamp_min(1e-12))
        seen.append(float(w.mean()))
        logp = delta_teacher(lp_t, lp_lora, lp_base, w.unsqueeze(-1))
    return train.TeacherOutput(logp=logp, z=with_lora.z)


levers_with_teacher(gated_outputs)
span = f"{min(seen):.3f}-{max(seen):.3f}" if seen else "nan"
print(f"gated teacher (w0 {w0:g}, w_idle {w_idle:g}, scale {scale:g}): mean w "
      f"{sum(seen) / max(1, len(seen)):.3f} over {len(seen)} teacher batches; {span}", flush=True)
