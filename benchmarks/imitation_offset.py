"""Train a port on top of its imitation control, and keep only what the LoRA adds (VALIDATION data).

The imitation control (teacher_lora=False) is the rank-r LoRA on the target that best imitates the
teacher without the source LoRA: the part of the teacher that is the other base model. CAST's port
spends some of its rank on that part too, and it is why the ports sit at their objective's floor
(docs/results.md, sessions 12-13). Here the control is merged into the target first, CAST trains a
second port toward the full teacher on top of it, and the second port alone is scored on the plain
target: the LoRA's effect carried through hidden states, with the imitation left behind in the
control. Also scored: target + port + lam x control for lam in LAMBDAS (lam 1 is the two stacked).

  OMP_NUM_THREADS=1 python benchmarks/imitation_offset.py shakespeare neox llama runs/lev_nl \
      bl_mix1_ctl 'off_bl:teacher=blend,generate=1200,mix=1'

CTL is a port folder under DIR/ports (made by benchmarks/levers.py with teacher_lora=False and the
same options); DIR/loras holds the LoRAs (levers.py trains them). LM tasks only.
"""

import math
import shutil
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel

from castlora.bench.tasks import get_task
from castlora.corpus import read_documents
from castlora.demo import shared_dir
from castlora.evaluate import text_loss
from castlora.models import load_model, load_tokenizer
from castlora.translate import translate

from lever_folder import variant

LAMBDAS = (0.0, 0.5, 1.0)


task, src, tgt, out, ctl = sys.argv[1:6]
variants = sys.argv[6:]
shared, out = shared_dir(None), Path(out)
zoo_tgt = shared / "zoo" / tgt
val_docs = read_documents(get_task(task, shared, out / "tasks").train)[-1:]
tok = load_tokenizer(str(zoo_tgt))
base_sd = {k: v.clone() for k, v in load_model(str(zoo_tgt)).state_dict().items()}
control = PeftModel.from_pretrained(load_model(str(zoo_tgt)), str(out / "ports" / ctl)).merge_and_unload().eval()
control_delta = {k: v - base_sd[k] for k, v in control.state_dict().items() if not torch.equal(v, base_sd[k])}


def with_control(lam: float):
    """The target with lam x the control's delta merged into its weights."""
    m = load_model(str(zoo_tgt))
    m.load_state_dict({k: base_sd[k] + lam * d for k, d in control_delta.items()}, strict=False)
    return m.eval()


def val_loss(model, adapter: str | None) -> float:
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).eval()
    return text_loss(model, tok, val_docs, seq_len=256, max_tokens=20000)["mean_loss"]


merged = out / "merged" / ctl  # the target with the control merged in, a model folder CAST can load
if not (merged / "model.safetensors").exists():
    tmp = merged.with_name(merged.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(zoo_tgt, tmp)
    control.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(merged)

base = val_loss(load_model(str(zoo_tgt)), None)
ret = val_loss(load_model(str(zoo_tgt)), str(out / "loras" / f"{tgt}_{task}"))


def score(loss: float) -> str:
    return f"{loss:.3f} ({math.exp(ret - loss):.3f}, {(base - loss) / (base - ret):.3f})"


print(f"{task} {src}->{tgt}; target base {base:.3f}, retrained {ret:.3f}; control {ctl}: "
      f"{score(val_loss(control, None))}", flush=True)
print("| variant | " + " | ".join(f"target + port + {lam} x control" for lam in LAMBDAS) + " | run s |")
print("|---|" + "---:|" * (len(LAMBDAS) + 1))
for v in variants:
    name, opts = variant(v, 150)
    t0 = time.perf_counter()
    port = out / "ports" / name
    translate(source=str(shared / "zoo" / src), adapter=str(out / "loras" / f"{src}_{task}"), target=str(merged),
              corpus=[str(shared / "data" / "general" / "train.txt.gz")], out=str(port),
              overwrite=True, progress=False, log=lambda *a: None, **opts)
    cells = [score(val_loss(with_control(lam), str(port))) for lam in LAMBDAS]
    print(f"| {name} | " + " | ".join(cells) + f" | {time.perf_counter() - t0:.0f} |", flush=True)
