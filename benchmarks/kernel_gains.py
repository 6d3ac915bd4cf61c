"""How steep a LoRA's kernels are: per module, the gains Sk of its r directions (the singular values
of B A) and their spread max/min, which `--balanced-kernels` evens out while training.

  python benchmarks/kernel_gains.py runs/lev_nl/loras/neox_shakespeare runs/lev_nl/loras/llama_shakespeare
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

for folder in sys.argv[1:]:
    sd = load_file(str(Path(folder) / "adapter_model.safetensors"))
    spreads = []
    for key in sorted(k for k in sd if "lora_A" in k):
        rank = sd[key].shape[0]
        gains = torch.linalg.svdvals(sd[key.replace("lora_A", "lora_B")].double() @ sd[key].double())[:rank]
        spreads.append((gains[0] / gains[-1]).item())
    print(f"{folder}: {len(spreads)} modules, spread max/min of the gains {min(spreads):.1f}-{max(spreads):.1f}, "
          f"median {sorted(spreads)[len(spreads) // 2]:.1f}")
