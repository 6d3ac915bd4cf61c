"""`castlora` command line: each subcommand is a thin face over the library function of the same
name and arguments. Errors in user input print one clear line (no traceback) and exit with 2."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from . import __version__
from .bench import BenchConfig
from .config import TranslateConfig, build, load_yaml
from .errors import CastloraError
from .safe_io import is_disk_full


def _add_config_flags(p: argparse.ArgumentParser, cls) -> None:
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if f.type in (bool, "bool"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif f.type in (list, "list"):
            p.add_argument(flag, dest=f.name, nargs="+", default=None, help=help_)
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=typ, default=None, choices=f.metadata.get("choices"),
                           help=f"{help_} (default: {f.default})")


def cmd_inspect(args) -> int:
    from .inspect_adapter import inspect_adapter

    print(inspect_adapter(args.adapter_dir, args.model, allow_pickle=args.allow_pickle))
    return 0


def cmd_translate(args) -> int:
    from .translate import translate

    yaml_values = load_yaml(args.config) if args.config else {}
    overrides = {f.name: getattr(args, f.name) for f in fields(TranslateConfig)}
    cfg = build(TranslateConfig, yaml_values, overrides)
    translate(config=cfg)
    return 0


def cmd_train_lora(args) -> int:
    from .train_lora import train_lora

    train_lora(args.model, args.data, args.out, steps=args.steps, rank=args.rank, alpha=args.alpha,
               targets=args.targets, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
               seed=args.seed, device=args.device, dtype=args.dtype, overwrite=args.overwrite,
               schedule=args.schedule)
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate
    from .models import load_model, load_tokenizer

    model = load_model(args.model, args.dtype, args.device)
    if args.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, args.adapter).eval()
    result = evaluate(model, load_tokenizer(args.model), args.data, seq_len=args.seq_len,
                      batch_size=args.batch_size, max_tokens=args.max_tokens)
    print(json.dumps(result) if args.json else "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in result.items()))
    return 0


def cmd_demo(args) -> int:
    from .demo import demo

    demo(shared=args.shared, out=args.out, source=args.source, target=args.target, quick=args.quick)
    return 0


def cmd_bench(args) -> int:
    from .bench import QUICK, BenchConfig, bench

    yaml_values = load_yaml(args.config) if args.config else {}
    overrides = {f.name: getattr(args, f.name) for f in fields(BenchConfig)}
    # defaults <- --quick's sizes <- YAML <- flags
    cfg = build(BenchConfig, {**(QUICK if args.quick else {}), **yaml_values}, overrides)
    table = bench(cfg)
    if args.quick:
        bad = [r for r in table["rows"] if r["ratio"] is not None and not all(
            isinstance(r[k], float) and r[k] == r[k] and abs(r[k]) != float("inf") for k in ("score", "ratio", "gap_recovered"))]
        sanity = [r for r in table["rows"] if r["pair"] == "llama->llama" and r["method"] == "cast0"]
        if bad or any(r["gap_recovered"] < 0.9 for r in sanity):
            print(f"castlora bench --quick: FAILED (non-finite rows: {len(bad)}; sanity cast0 gap: "
                  f"{[round(r['gap_recovered'], 3) for r in sanity]})", file=sys.stderr)
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="castlora", description="Port LoRA adapters between LLM architectures (CAST).")
    parser.add_argument("--version", action="version", version=f"castlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print the modules of a PEFT LoRA adapter")
    p.add_argument("adapter_dir")
    p.add_argument("--model", help="base model to map modules to (layer, site); default: the adapter's own")
    p.add_argument("--allow-pickle", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("translate", help="port a LoRA from --source to --target (CAST)")
    p.add_argument("--config", help="YAML file with any of the options below; flags override it")
    _add_config_flags(p, TranslateConfig)
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("train-lora", help="train an ordinary LoRA on text or prompt/completion data")
    p.add_argument("--model", required=True)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", nargs="+", default=["q", "v"], help="roles (q k v o gate up down) or module names")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="constant",
                   help="the lr after a 10-step warmup: constant, or a linear / cosine decay toward zero")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train_lora)

    p = sub.add_parser("eval", help="loss/perplexity on text, or exact match on prompt/completion jsonl")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--data", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="end-to-end port between the bundled zoo models; prints the retention line")
    p.add_argument("--shared", default=None, help="folder with zoo/ and data/ (default: $CASTLORA_SHARED or ../shared)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--source", default="llama")
    p.add_argument("--target", default="mistral")
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke test)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("bench", help="the retention benchmark on the zoo models (results.json, results.md, PNG)")
    p.add_argument("--config", help="YAML file with any of the options below; flags override it")
    p.add_argument("--quick", action="store_true", help="a small smoke run (< 15 CPU minutes); other options "
                                                        "override its sizes")
    _add_config_flags(p, BenchConfig)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CastloraError as e:
        print(f"castlora: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment, not castlora: a permission, a full disk, a vanished file
        hint = " (disk full: free some space and run again)" if is_disk_full(e) else ""
        print(f"castlora: error: {e}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("castlora: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
