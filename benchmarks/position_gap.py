"""Gap recovered by position in the window: does a port lose the gap late in its context?

CAST trains on chunks of `seq_len` source tokens (128 in the bench and levers.py), and the task is
scored on windows of 256 target tokens. This scores the target base, the target with its retrained
LoRA and the named ports on levers.py's validation windows (the task's last training document,
256 tokens a window, 20,000 tokens), and prints each port's gap recovered by position bucket.
With SRC = TGT it prints the model's own LoRA gain by bucket (no ports needed): the source's own
profile, to compare with the ports'.

  OMP_NUM_THREADS=1 python benchmarks/position_gap.py shakespeare neox llama runs/lev_nl bl bl_s256b4
  OMP_NUM_THREADS=1 python benchmarks/position_gap.py shakespeare neox neox runs/lev_nl
"""

import torch
import torch.nn.functional as F

from castlora.bench.tasks import get_task
from castlora.corpus import read_documents
from castlora.evaluate import text_windows
from castlora.models import load_model
from lever_folder import lever_folder, with_adapter

BUCKETS = [(0, 32), (32, 64), (64, 128), (128, 192), (192, 256)]
lf = lever_folder()
docs = read_documents(get_task(lf.task, lf.shared, lf.out / "tasks").train)[-1:]
windows = torch.tensor([w for w in text_windows(lf.tok_t, docs, 256, 20000) if len(w) == 257])  # full windows only


@torch.no_grad()
def loss_by_position(model) -> torch.Tensor:
    """Mean next-token loss at each of the 256 positions of a window, over the windows."""
    out = []
    for i in range(0, len(windows), 8):
        ids = windows[i:i + 8]
        logits = model(input_ids=ids).logits[:, :-1].float()
        out.append(F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none"))
    return torch.cat(out).mean(0)


base = loss_by_position(load_model(str(lf.zoo / lf.tgt)))
retrained = loss_by_position(with_adapter(lf, lf.tgt))
ports = {p: loss_by_position(with_adapter(lf, lf.tgt, p)) for p in lf.ports}
print(f"{lf.task} {lf.src}->{lf.tgt}: {len(windows)} windows of 256 tokens; gap recovered by position")
print("| positions | base loss | retrained loss | LoRA gain |" + "".join(f" {p} |" for p in ports))
print("|---|---:|---:|---:|" + "---:|" * len(ports))
for a, b in [*BUCKETS, (0, 256)]:
    gain = base[a:b].mean() - retrained[a:b].mean()
    cells = "".join(f" {(base[a:b].mean() - p[a:b].mean()) / gain:.3f} |" for p in ports.values())
    print(f"| {a}-{b} | {base[a:b].mean():.3f} | {retrained[a:b].mean():.3f} | {gain:.3f} |{cells}")
