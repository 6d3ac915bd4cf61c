"""A diagnostic, not a method: CAST trained with the ORACLE as its teacher, the target with the LoRA
retrained on task data (DIR/loras/{TGT}_{TASK}, which CAST never sees). Same heads, start, corpus
(the text generated from the source with its LoRA), steps and scoring as levers.py; only the
teacher's distribution changes.

Why: the ported delta is a rank-r LoRA on the target, and the retrained LoRA is one of them (same
sites, same rank), so with this teacher the answer is inside what the heads can reach. If such a
port recovers ~all of the gap, the teacher is what limits CAST; if it stops where CAST stops, the
training signal (the text, the KL on it, the steps) does, and no better teacher can lift it.

  OMP_NUM_THREADS=1 python benchmarks/oracle_teacher.py shakespeare neox llama runs/lev_nl \
      'oracle:teacher=source,generate=1200,mix=1'

`--source-base W`: the oracle's effect on a base that is W of the source's, log p = (1 - W) log p_T +
W log p_S + (log p_T+LoRA_T - log p_T), renormalised. W = 1 is the mirror of CAST's delta teacher (log
p_T + the source LoRA's effect on S), W = 0.5 the base of CAST's blend. It asks whether the source
base under the teacher is what costs CAST its gap, or the LoRA's effect itself.

Arguments as levers.py (whose code runs unchanged after the teacher is swapped); use
`teacher=source` so the source side runs once a step (for the MSE term's inputs) and auto does not
measure the source. The imitation control and the held-out KL (which keeps the start when the
port ends farther from the teacher) see the oracle too.
"""

import contextlib
import sys
from pathlib import Path

import torch
from peft import PeftModel

import castlora.train as train
from castlora.demo import shared_dir
from castlora.losses import delta_teacher, shared_log_probs
from castlora.models import load_model, load_tokenizer
from castlora.tokens import shared_vocab
from lever_folder import levers_with_teacher, pop_option

source_base = pop_option("--source-base", 0.0)
on_source = source_base != 0
task, src, tgt, out = sys.argv[1:5]
zoo = shared_dir(None) / "zoo"
oracle_lora = Path(out) / "loras" / f"{tgt}_{task}"
if not (oracle_lora / "adapter_model.safetensors").exists():
    raise SystemExit(f"{oracle_lora} holds no retrained LoRA: run levers.py on {out} first (it trains it)")
oracle = PeftModel.from_pretrained(load_model(str(zoo / tgt)), str(oracle_lora)).eval()
# the shared vocabulary in the order translate() builds it: the teacher's columns must be the student's
ids_t = shared_vocab(load_tokenizer(str(zoo / src)), load_tokenizer(str(zoo / tgt))).ids_t
source_side = train.teacher_outputs


def oracle_outputs(source, source_inner, target, wrappers, ports, batch, cols, teacher, tau, want_z, *args, **kw):
    """The source side as CAST computes it (for the MSE term's z), with the oracle's log-probs as the teacher
    (`--source-base`: the oracle's effect on a base that is part the source's)."""
    side = source_side(source, source_inner, target, wrappers, ports, batch, cols,
                       "source_base" if on_source else "source", tau, want_z) if want_z or on_source else None

    def target_logp(lora: bool) -> torch.Tensor:
        with torch.no_grad(), (contextlib.nullcontext() if lora else oracle.disable_adapter()):
            logits = oracle(input_ids=batch.ids_t, attention_mask=batch.mask_t).logits
        return shared_log_probs(batch.gather(logits, "t"), ids_t.to(logits.device), tau)

    logp = target_logp(True)
    if on_source:  # log p_T+LoRA_T + W (log p_S - log p_T): delta_teacher with the roles of S and T swapped
        logp = delta_teacher(side.logp.to(logp.device), logp, target_logp(False), source_base)
    return train.TeacherOutput(logp=logp, z=side.z if want_z else None)


levers_with_teacher(oracle_outputs)
