"""Text sampled from the TARGET with a port (or bare), as a training corpus for a second CAST round.

CAST's default corpus is text sampled from source+LoRA. Its continuations are the source's idea of the
LoRA's domain; where the source is the weaker model (neox->llama, mistral->llama) that is the weaker
text. Text sampled from target+port is what the student itself writes (on-policy, as in generalised
knowledge distillation): the teacher then corrects the student where the student goes. No task data:
the prompts are the first tokens of the same general documents --generate uses, in the same order.

  OMP_NUM_THREADS=1 python benchmarks/port_samples.py llama runs/lev_nl/ports/bl_mix1 1200 128 \
      runs/lev_nl/port_texts.jsonl      # PORT "-" samples the bare target

Then train on it: `benchmarks/levers.py ... 'onpol:teacher=blend,generate=0,corpus=runs/lev_nl/port_texts.jsonl'`.
"""

import json
import sys
import time

from peft import PeftModel

from castlora.corpus import read_documents
from castlora.demo import shared_dir
from castlora.generate import sample_texts
from castlora.models import load_model, load_tokenizer
from castlora.safe_io import write_text_atomic

target, port, n, new_tokens, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
shared = shared_dir(None)
model = load_model(str(shared / "zoo" / target))
if port != "-":
    model = PeftModel.from_pretrained(model, port)
model.eval()
tok = load_tokenizer(str(shared / "zoo" / target))
docs = read_documents(shared / "data" / "general" / "train.txt.gz")
t0 = time.perf_counter()
texts = sample_texts(model, tok, docs, n, max_new_tokens=new_tokens, seed=0, progress=False)
write_text_atomic(out, "".join(json.dumps({"text": t}) + "\n" for t in texts))
print(f"{len(texts)} texts ({sum(map(len, texts))} chars) from {target} + {port} in "
      f"{time.perf_counter() - t0:.0f} s -> {out}")
