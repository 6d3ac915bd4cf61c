"""Replay `--backoff`'s rule (castlora.train.back_off) on the training KL curves of finished ports:
at which steps would it have halved the lr? A port that never backs off trains bit for bit as
without it.

  python benchmarks/backoff_replay.py runs/lev_nl/ports/*/castlora.json
"""

import json
import sys

from castlora.train import LoopConfig, LoopState, back_off

print("| port | backoff | backs off at step |")
print("|---|---:|---|")
for path in sys.argv[1:]:
    curve = [r["kl"] for r in json.load(open(path))["loss_curve"]]
    for backoff in (0.1, 0.15, 0.25):
        cfg, state, steps = LoopConfig(steps=len(curve), backoff=backoff), LoopState(), []
        for kl in curve:
            mean, low, scale = back_off(state, kl, cfg)
            if scale < state.lr_scale:
                steps.append(state.step)
            state.step += 1
            state.kl_mean, state.kl_low, state.lr_scale = mean, low, scale
        print(f"| {path} | {backoff} | {steps or 'never'} |")
