"""The shakespeare retention measurement of docs/results.md, for one pair.

  python benchmarks/retention_shakespeare.py llama->mistral runs/m1
  python benchmarks/retention_shakespeare.py llama->neox runs/m2
"""

import sys

from castlora.bench import BenchConfig, bench

pair, out = sys.argv[1], sys.argv[2]
bench(BenchConfig(out=out, pairs=[pair], tasks=["shakespeare"],
                  methods=["cast0", "random_heads", "weight_space", "cast_source", "imitation",
                           "cast_source_gen", "imitation_gen", "cast_delta", "cast_delta_gen"],
                  lora_steps=150, cast_steps=150, batch_size=8, seq_len=128, generate=400, mix=1 / 3,
                  eval_tokens=30000))  # --mix 1/3: the default of session 1
