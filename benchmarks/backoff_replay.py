"""Replay `--backoff`'s rule (castlora.train.back_off) on the training KL curves of finished ports:
at which steps would it have halved the lr? A port that never backs off trains bit for bit as
without it.

  python benchmarks/backoff_replay.py runs/lev_nl/ports/*/castlora.json
"""

import json
import sys

from castlora.train import replay_back_off

print("| port | backoff | backs off at step |")
print("|---|---:|---|")
for path in sys.argv[1:]:
    curve = [r["kl"] for r in json.load(open(path))["loss_curve"]]
    for backoff in (0.1, 0.15, 0.25):
        steps, _ = replay_back_off(curve, backoff)
        print(f"| {path} | {backoff} | {steps or 'never'} |")
