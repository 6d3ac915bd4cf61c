"""`castlora demo`: the whole story on the bundled zoo models, in a few CPU minutes.

1. train a LoRA on Shakespeare for the source model (the adapter a user would hold);
2. retrain the same LoRA on the target with the task data (the reference castlora aims at);
3. port the source LoRA to the target with CAST on general text and text the source model
   generates with its LoRA (no Shakespeare data);
4. score base / retrained / ported on held-out Shakespeare and print the retention line.
Steps 1-2 are cached in --out, so a second run only re-ports.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .safe_io import write_text_atomic
from .shared import shared_dir


def demo(shared: str | None = None, out: str = "runs/demo", source: str = "llama", target: str = "mistral",
         quick: bool = False, task: str = "shakespeare", log=print, progress: bool = True) -> dict:
    """Returns demo.json's summary; its "retention_line" is what `castlora demo` prints on stdout."""
    from peft import PeftModel

    from .evaluate import retention, text_loss
    from .corpus import read_documents
    from .models import load_model, load_tokenizer
    from .train_lora import train_lora
    from .translate import translate

    root = shared_dir(shared)
    out_dir = Path(out)
    src, tgt = str(root / "zoo" / source), str(root / "zoo" / target)
    train_data = str(root / "data" / "domains" / task / "train.txt.gz")
    test_docs = read_documents(root / "data" / "domains" / task / "test.txt.gz")
    general = str(root / "data" / "general" / "train.txt.gz")
    held_out = str(root / "data" / "general" / "valid.txt.gz")  # where --teacher auto compares the two models
    lora_steps, cast_steps, eval_tokens = (20, 10, 4000) if quick else (100, 100, 20000)
    t0 = time.perf_counter()

    def lora(model_dir: str, name: str) -> str:
        path = out_dir / f"lora_{name}_{task}"
        if (path / "adapter_model.safetensors").exists():
            log(f"reusing the {name} LoRA trained by an earlier run in {path} (delete it to train it again)")
        else:
            log(f"training a {task} LoRA on {name} ({lora_steps} steps)")
            train_lora(model_dir, train_data, str(path), steps=lora_steps, rank=8, alpha=16, targets=["q", "v"],
                       lr=2e-3, batch_size=8, seq_len=128, overwrite=True, progress=progress, log=log)
        return str(path)

    src_lora = lora(src, source)
    ref_lora = lora(tgt, target)
    port_dir = out_dir / f"port_{source}_to_{target}"
    result = translate(source=src, adapter=src_lora, target=tgt, corpus=[general], out=str(port_dir),
                       strength_corpus=[held_out], steps=cast_steps, batch_size=8, seq_len=128, overwrite=True,
                       progress=progress, log=log)

    tok = load_tokenizer(tgt)
    scores = {}
    for name, adapter in (("base", None), ("retrained", ref_lora), ("ported", str(port_dir))):
        log(f"scoring the {name} model on {eval_tokens} tokens of {task}/test")
        model = load_model(tgt)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter).eval()
        scores[name] = text_loss(model, tok, test_docs, seq_len=256, max_tokens=eval_tokens,
                                 progress=progress)["mean_loss"]
    r = retention(scores["base"], scores["retrained"], scores["ported"])
    summary = {"pair": f"{source}->{target}", "task": task, "losses": scores, **r,
               "cast_steps": cast_steps, "wall_seconds": round(time.perf_counter() - t0, 1),
               "train_seconds": result.record["train_seconds"]}
    summary["retention_line"] = (
        f"retention {source}->{target} on {task}/test: loss base {scores['base']:.4f}  "
        f"retrained {scores['retrained']:.4f}  ported {scores['ported']:.4f}  |  ratio {r['ratio']:.3f}  "
        f"gap recovered {r['gap_recovered']:.3f}  ({summary['wall_seconds']:.0f} s)")
    write_text_atomic(out_dir / "demo.json", json.dumps(summary, indent=2))
    test_file = root / "data" / "domains" / task / "test.txt.gz"
    log(f"the ported loss again: castlora eval --model {tgt} --adapter {port_dir} --data {test_file} "
        f"--seq-len 256 --max-tokens {eval_tokens}")
    return summary
