"""Where does a port's loss gap sit: on tokens the two vocabularies share, or on the others?

CAST's KL compares the teacher and the student over the *shared* pieces only (CAST.md, step 5),
renormalised. A target token outside that set never appears in the loss: the student learns its
probability only indirectly. This prints, for the target base, its retrained LoRA and each port
given, the validation loss split by whether the next token is a shared piece, the probability mass
the model puts outside the shared set, and the gap recovered on each part.

Text: the task's validation text (the last training document, as in levers.py), never the test.

  OMP_NUM_THREADS=1 python benchmarks/vocab_gap.py shakespeare neox llama runs/lev_nl lr3e-2 ...

DIR is a levers.py folder: DIR/loras/{model}_{task} and DIR/ports/NAME.
"""


import torch
from peft import PeftModel

from castlora.bench.tasks import get_task
from castlora.corpus import read_documents
from castlora.evaluate import text_windows
from castlora.models import load_model

from lever_folder import lever_folder

lf = lever_folder()
task, src, tgt, out, ports, shared, zoo = lf.task, lf.src, lf.tgt, lf.out, lf.ports, lf.shared, lf.zoo
tok_s, tok_t, vocab = lf.tok_s, lf.tok_t, lf.vocab
docs = read_documents(get_task(task, shared, out / "tasks").train)[-1:]
windows = text_windows(tok_t, docs, 256, 20000)
in_shared = torch.zeros(max(len(tok_t), int(vocab.ids_t.max()) + 1), dtype=torch.bool)
in_shared[vocab.ids_t] = True
special = torch.tensor(sorted(set(tok_t.all_special_ids) - {tok_t.eos_token_id}))


@torch.no_grad()
def split_loss(adapter: str | None) -> dict:
    """Summed loss and count on shared / other next tokens, and the mean mass outside the shared set."""
    model = load_model(str(zoo / tgt))
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).eval()
    sums = {"shared": [0.0, 0], "other": [0.0, 0], "mass_other": [0.0, 0]}
    for i in range(0, len(windows), 8):
        chunk = windows[i:i + 8]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tok_t.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, w in enumerate(chunk):
            ids[b, :len(w)], mask[b, :len(w)] = torch.tensor(w), 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        targets, valid = ids[:, 1:], mask[:, 1:].bool() & ~torch.isin(ids[:, 1:], special)
        loss = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        shared_next = in_shared[targets]
        for name, sel in (("shared", valid & shared_next), ("other", valid & ~shared_next)):
            sums[name][0] += float(loss[sel].sum())
            sums[name][1] += int(sel.sum())
        outside = torch.ones(logp.shape[-1], dtype=torch.bool)  # the logits may be wider than the tokenizer
        outside[vocab.ids_t] = False
        mass = logp[..., outside].exp().sum(-1)
        sums["mass_other"][0] += float(mass[valid].sum())
        sums["mass_other"][1] += int(valid.sum())
    return {k: s / max(n, 1) for k, (s, n) in sums.items()} | {"n_shared": sums["shared"][1],
                                                                "n_other": sums["other"][1]}


rows = {"base": split_loss(None), "retrained": split_loss(str(out / "loras" / f"{tgt}_{task}"))}
rows.update({p: split_loss(str(out / "ports" / p)) for p in ports})
n_s, n_o = rows["base"]["n_shared"], rows["base"]["n_other"]
print(f"{task} {src}->{tgt}: {vocab.size} shared pieces; of {n_s + n_o} next tokens of the validation text, "
      f"{n_o} ({n_o / (n_s + n_o):.1%}) are outside the shared set")
print("| model | loss, shared tokens | loss, other tokens | mass outside the shared set | gap recovered: shared / other / all |")
print("|---|---:|---:|---:|---:|")
b = rows["base"]


def total(r):
    return (r["shared"] * n_s + r["other"] * n_o) / (n_s + n_o)


for name, r in rows.items():
    gaps = [(b[k] - r[k]) / (b[k] - rows["retrained"][k]) for k in ("shared", "other")]
    gaps.append((total(b) - total(r)) / (total(b) - total(rows["retrained"])))
    print(f"| {name} | {r['shared']:.3f} | {r['other']:.3f} | {r['mass_other']:.3f} | "
          f"{' / '.join(f'{g:.3f}' for g in gaps)} |", flush=True)
