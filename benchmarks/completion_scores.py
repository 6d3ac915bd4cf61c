"""Add the graded score of exact-match tasks (completion loss, and its gap recovered) to a bench
folder whose results.json predates it. `castlora bench` records it itself now; this re-scores the
saved LoRAs and ports of older runs on the same test examples, then rewrites results.md.

  OMP_NUM_THREADS=1 python benchmarks/completion_scores.py runs/m7 runs/m9
"""

import json
import sys
from pathlib import Path

from peft import PeftModel

from castlora.bench.report import write_report
from castlora.demo import shared_dir
from castlora.evaluate import completion_loss, load_examples, retention
from castlora.models import load_model, load_tokenizer
from castlora.safe_io import write_text_atomic

for folder in map(Path, sys.argv[1:]):
    table = json.loads((folder / "results.json").read_text())
    cfg = table["config"]
    zoo = shared_dir(cfg.get("shared")) / "zoo"
    ref = {}
    for r in table["rows"]:
        test = folder / "tasks" / r["task"] / "test.jsonl"
        if "accuracy" not in r or not test.exists():
            continue
        src, tgt = r["pair"].split("->")
        adapter = {"base": None, "retrained": folder / "loras" / f"{tgt}_{r['task']}"}.get(
            r["method"], folder / "ports" / f"{src}_to_{tgt}_{r['task']}_{r['method']}")
        model = load_model(str(zoo / tgt))
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter)).eval()
        examples = load_examples(test)[:cfg.get("eval_examples", 100)]
        r["completion_loss"] = completion_loss(model, load_tokenizer(str(zoo / tgt)), examples)["completion_loss"]
        ref[(r["pair"], r["task"], r["method"])] = r["completion_loss"]
    for r in table["rows"]:
        if "completion_loss" in r:
            base, ret = ref[(r["pair"], r["task"], "base")], ref[(r["pair"], r["task"], "retrained")]
            r["completion_gap_recovered"] = retention(base, ret, r["completion_loss"])["gap_recovered"]
            print(f"{r['pair']:16s} {r['task']:6s} {r['method']:16s} completion loss {r['completion_loss']:.3f}  "
                  f"gap {r['completion_gap_recovered']:.3f}", flush=True)
    write_text_atomic(folder / "results.json", json.dumps(table, indent=1))
    write_report(table, folder)
