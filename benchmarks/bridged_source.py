"""A new teacher, tried as a lever: CAST from a BRIDGED source S'. The source model is first fine-tuned (every
weight, no LoRA) to imitate the target base, KL(T || S') on aligned positions over the shared vocabulary, on text
that needs no task data; then the frozen source LoRA is applied on S' and CAST runs unchanged with S' as its source.

Why: session 20 found the teacher's base is what limits CAST (the oracle's effect on the source base recovers 0.40
of the gap, on half of it 0.80, on the target's own 0.93), and every mix of p_S, p_S+LoRA and p_T at the output
tops out at the blend. S' moves the source base toward the target inside the network, so the LoRA's effect is
still computed by the weights it was trained with, on a base closer to the target's.

Measured in session 22 (docs/results.md): no gain. The bridge halves KL(T || S) on CAST's text but cuts the LoRA's
gain on the task's text from 0.63 to 0.27-0.54 nats, and CAST from S' ties or trails the blend from S.

  OMP_NUM_THREADS=1 python benchmarks/bridged_source.py --bridge-steps 200 --bridge-lr 1e-4 \
      shakespeare neox llama runs/lev_nl 'br_src:teacher=source,generate=1200,mix=1'

`--bridge-params REGEX` trains only the parameters whose names match (e.g. the last block and the final norm).
`--bridge-text generated` (default): texts sampled from the source with its LoRA (seed 1, not the CAST stream's
seed 0); `general`: chunks of general/train. S' is saved as DIR/bridged/SRC_to_TGT_<text>_<steps>_<lr> (a model
folder with the source's tokenizer) and reused. The rest of the command line is levers.py's; the source+LoRA line
it prints is the original source's, the variants run from S'.
"""

import json
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel

from castlora.corpus import make_chunks, read_corpus, read_documents
from castlora.demo import shared_dir
from castlora.evaluate import text_loss
from castlora.generate import sample_texts
from castlora.losses import kl_divergence
from castlora.models import load_model, load_tokenizer
from castlora.safe_io import write_text_atomic
from castlora.tokens import encode_pair, shared_vocab
from castlora.bench.tasks import get_task
from castlora.translate import translate  # noqa: F401  (loads the module patched below)
from lever_folder import aligned_logp, pop_option, pop_string, run_levers

BATCH, SEQ = 8, 128
steps = int(pop_option("--bridge-steps", 200))
lr = pop_option("--bridge-lr", 1e-4)


part = pop_string("--bridge-params", "")  # a regex over the source's parameter names; "" = every weight
text_kind = pop_string("--bridge-text", "generated")
if text_kind not in ("generated", "general"):
    raise SystemExit(f"--bridge-text is generated or general, not {text_kind!r}")
task, src, tgt, out = sys.argv[1:5]
shared = shared_dir(None)
zoo, out = shared / "zoo", Path(out)
folder = out / "bridged" / (f"{src}_to_{tgt}_{text_kind}_{steps}_{lr:g}"
                            + (f"_{re.sub('[^A-Za-z0-9]+', '-', part).strip('-')}" if part else ""))
tok_s, tok_t = load_tokenizer(str(zoo / src)), load_tokenizer(str(zoo / tgt))
vocab = shared_vocab(tok_s, tok_t)


@torch.no_grad()
def held_out_kl(student, target, batches) -> float:
    kls = [kl_divergence(aligned_logp(target, b, "t", vocab), aligned_logp(student, b, "s", vocab)).item()
           for b in batches]
    return sum(kls) / len(kls)


def bridge() -> None:
    lora = out / "loras" / f"{src}_{task}"
    if not (lora / "adapter_model.safetensors").exists():
        raise SystemExit(f"{lora} holds no source LoRA: run levers.py on {out} first (it trains it)")
    docs = read_corpus([str(shared / "data" / "general" / "train.txt.gz")])
    n = steps * BATCH + 4 * BATCH  # the last 4 batches are held out
    t0 = time.perf_counter()
    saved = out / "bridged" / f"{src}_{task}_generated_{n}.json"  # sampling is most of a bridge's CPU time
    if text_kind == "generated" and saved.exists():
        texts = json.loads(saved.read_text())
    elif text_kind == "generated":
        src_lora = PeftModel.from_pretrained(load_model(str(zoo / src)), str(lora)).eval()
        texts = sample_texts(src_lora, tok_s, docs, n, max_new_tokens=SEQ, seed=1, batch_size=64,
                             progress=False)
        del src_lora
        saved.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(saved, json.dumps(texts))
    else:
        texts = make_chunks(docs, tok_s, SEQ, n, seed=1)
    random.Random(1).shuffle(texts)
    print(f"bridge text: {len(texts)} {text_kind} texts in {time.perf_counter() - t0:.0f} s", flush=True)
    batches = [encode_pair(texts[i:i + BATCH], tok_s, tok_t, SEQ, SEQ + 64) for i in range(0, len(texts), BATCH)]
    train_b, held = batches[:-4], batches[-4:]
    valid = make_chunks(read_corpus([str(shared / "data" / "general" / "valid.txt.gz")]), tok_s, SEQ, 32, seed=1)
    general_held = [encode_pair(valid[i:i + BATCH], tok_s, tok_t, SEQ, SEQ + 64) for i in range(0, len(valid), BATCH)]
    target = load_model(str(zoo / tgt)).eval()
    student = load_model(str(zoo / src)).train().requires_grad_(True)  # load_model freezes
    trained = [p for n, p in student.named_parameters() if re.search(part, n)]
    print(f"bridge trains {sum(p.numel() for p in trained):,} of {sum(p.numel() for p in student.parameters()):,}"
          f" parameters", flush=True)
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    print(f"held-out KL(T || S): {text_kind} {held_out_kl(student, target, held):.3f}, "
          f"general/valid {held_out_kl(student, target, general_held):.3f}", flush=True)
    t0 = time.perf_counter()
    for i, b in enumerate(train_b):
        with torch.no_grad():
            lp_t = aligned_logp(target, b, "t", vocab)
        loss = kl_divergence(lp_t, aligned_logp(student, b, "s", vocab))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if i % 50 == 0 or i == len(train_b) - 1:
            print(f"  bridge step {i}: KL {loss.item():.3f}", flush=True)
    student.eval()
    print(f"held-out KL(T || S'): {text_kind} {held_out_kl(student, target, held):.3f}, "
          f"general/valid {held_out_kl(student, target, general_held):.3f}; {time.perf_counter() - t0:.0f} s",
          flush=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(str(tmp), safe_serialization=True)
    tok_s.save_pretrained(str(tmp))
    tmp.rename(folder)


if not (folder / "config.json").exists():
    bridge()
val_docs = read_documents(get_task(task, shared, out / "tasks").train)[-1:]
for name, path in (("S", zoo / src), ("S'", folder)):
    loss = [text_loss(m, tok_s, val_docs, seq_len=256, max_tokens=20000)["mean_loss"] for m in (
        load_model(str(path)), PeftModel.from_pretrained(load_model(str(path)), str(out / "loras" / f"{src}_{task}")))]
    print(f"{name}: validation loss (source tokens) base {loss[0]:.3f}, with the LoRA {loss[1]:.3f}", flush=True)

translate_module = sys.modules["castlora.translate"]  # the package's `translate` attribute is the function
original = translate_module.translate


def from_bridged(*args, **kw):
    """translate() with S' as the source model (levers.py passes source= by keyword)."""
    kw["source"] = str(folder)
    return original(*args, **kw)


translate_module.translate = from_bridged
run_levers()
