"""`castlora` command line: each subcommand is a library function and the dataclass of its arguments
(config.py); jsonargparse builds the flags, `--config FILE.yaml` and `--print_config` from the dataclass.
Logs go to stderr (-q: warnings only, -v: debug); stdout carries only results. Errors in user input print
one line (no traceback) and exit with 2."""

from __future__ import annotations

import json
import logging
import re
import sys
import warnings
from dataclasses import fields
from typing import get_origin

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, DefaultHelpFormatter

from ._version import __version__
from .bench import QUICK, BenchConfig
from .config import (MISSING, DemoConfig, EvalConfig, InspectConfig, TrainLoraConfig, TranslateConfig, build,
                     field_types, resolve_device)
from .errors import CastloraError
from .safe_io import is_disk_full

log = logging.getLogger("castlora")


def cmd_translate(cfg: TranslateConfig) -> int:
    from .translate import translate

    translate(config=cfg, log=log.info)
    return 0


def cmd_train_lora(cfg: TrainLoraConfig) -> int:
    from .train_lora import train_lora

    train_lora(cfg.model, cfg.data, cfg.out, steps=cfg.steps, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets,
               lr=cfg.lr, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
               device=resolve_device(cfg.device), dtype=cfg.dtype, overwrite=cfg.overwrite, schedule=cfg.schedule,
               log=log.info)
    return 0


def cmd_eval(cfg: EvalConfig) -> int:
    from .evaluate import evaluate_model

    result = evaluate_model(cfg, log=log.info)
    print(json.dumps(result) if cfg.json else "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in result.items()))
    return 0


def cmd_inspect(cfg: InspectConfig) -> int:
    from .inspect_adapter import inspect_adapter

    print(inspect_adapter(cfg.adapter, cfg.model, allow_pickle=cfg.allow_pickle))
    return 0


def cmd_demo(cfg: DemoConfig) -> int:
    from .demo import demo

    summary = demo(shared=cfg.shared, out=cfg.out, source=cfg.source, target=cfg.target, quick=cfg.quick,
                   log=log.info)
    print(summary["retention_line"])
    return 0


def cmd_bench(cfg: BenchConfig) -> int:
    from .bench import bench

    table = bench(cfg, log=log.info)
    if cfg.quick:
        bad = [r for r in table["rows"] if r["ratio"] is not None and not all(
            isinstance(r[k], float) and r[k] == r[k] and abs(r[k]) != float("inf")
            for k in ("score", "ratio", "gap_recovered"))]
        sanity = [r for r in table["rows"] if r["pair"] == "llama->llama" and r["method"] == "cast0"]
        if bad or any(r["gap_recovered"] < 0.9 for r in sanity):
            log.error(f"castlora bench --quick: FAILED (non-finite rows: {len(bad)}; sanity cast0 gap: "
                      f"{[round(r['gap_recovered'], 3) for r in sanity]})")
            return 1
    return 0


# subcommand -> (function, its arguments' dataclass, help, positional fields)
COMMANDS = {
    "translate": (cmd_translate, TranslateConfig, "port a LoRA from --source to --target", ()),
    "train-lora": (cmd_train_lora, TrainLoraConfig, "train an ordinary LoRA on text or prompt/completion data", ()),
    "eval": (cmd_eval, EvalConfig, "loss, perplexity and bits per byte on text, or exact match on "
                                   "prompt/completion jsonl", ()),
    "inspect": (cmd_inspect, InspectConfig, "print the modules of a PEFT LoRA adapter", ("adapter",)),
    "demo": (cmd_demo, DemoConfig, "port between the bundled zoo models and print the retention line", ()),
    "bench": (cmd_bench, BenchConfig, "the retention benchmark on the zoo models", ()),
}


class WideHelp(DefaultHelpFormatter):
    """Each option's help and its default (or "required"), on lines as wide as a usual terminal allows."""

    def __init__(self, prog, *args, **kw):
        kw.update(width=118, max_help_position=30)
        super().__init__(prog, *args, **kw)

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if isinstance(action, ActionConfigFile) or not action.option_strings or action.dest in ("help", "version"):
            return text
        if text.endswith("(required)"):
            return text
        default = action.default
        if default == "==SUPPRESS==":
            return text
        if default is None or default == "" or default == [] or default == {}:
            return text if "default" in text else f"{text} (default: none)"
        if isinstance(default, list):
            default = " ".join(map(str, default))
        return f"{text} (default: {default})"


USAGE = {"translate": "--source S --adapter A --target T --corpus FILE --out DIR [options]",
         "train-lora": "--model M --data FILE --out DIR [options]",
         "eval": "--model M (--data FILE | --lm-eval TASK...) [options]", "inspect": "ADAPTER [options]"}


def _add_fields(parser: ArgumentParser, cls, positional: tuple) -> None:
    groups, types = {}, field_types(cls)
    for f in fields(cls):
        kind = types[f.name]
        group_name = f.metadata.get("group") or ""
        if group_name and group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        target = groups.get(group_name, parser)
        help_ = f.metadata.get("help", "")
        if f.name in positional:
            target.add_argument(f.name, type=str, help=help_)
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        required = bool(f.metadata.get("required"))
        # required options are checked by the dataclass (a --config file may give them), so the parser takes none
        kw = dict(help=help_ + (" (required)" if required else ""), required=False)
        if kind is bool:
            target.add_argument(flag, action=ActionYesNo(no_prefix="no-"), default=default, **kw)
        elif get_origin(kind) is list:
            target.add_argument(flag, type=str, nargs="+", default=default, **kw)
        elif get_origin(kind) is dict or kind is dict:
            target.add_argument(flag, type=dict, default=default, **kw)
        else:
            target.add_argument(flag, type=kind, default=None if required else default, **kw)


def config_files(argv: list[str]) -> list[str]:
    """The --config files named on the command line."""
    return [a.split("=", 1)[1] if a.startswith("--config=") else argv[i + 1]
            for i, a in enumerate(argv) if a.startswith("--config=") or (a == "--config" and i + 1 < len(argv))]


def precheck_config_files(argv: list[str]) -> None:
    """Each --config file read as castlora reads YAML (safe_load, a mapping), and a list option given a
    scalar refused by name, before the parser sees it (its own message for that names no option)."""
    from .config import load_yaml

    name = next((a for a in argv if a in COMMANDS), None)
    if name is None:
        return
    types = field_types(COMMANDS[name][1])
    for path in config_files(argv):
        for key, value in load_yaml(path).items():
            if key in types and get_origin(types[key]) is list and not isinstance(value, list):
                raise CastloraError(f"option {key} must be a list, not {value!r} (in {path})")


def bench_quick(argv: list[str]) -> bool:
    """`castlora bench --quick` (or quick: true in its --config): QUICK's sizes become the defaults."""
    if "bench" not in argv:
        return False
    if "--quick" in argv:
        return True
    from .config import load_yaml

    for path in config_files(argv):
        try:
            if load_yaml(path).get("quick") is True:
                return True
        except CastloraError:
            pass
    return False


def build_parser(argv: list[str] | None = None) -> ArgumentParser:
    parser = ArgumentParser(prog="castlora", description="Port LoRA adapters between LLM architectures (CAST).",
                            exit_on_error=False, formatter_class=WideHelp)
    parser.add_argument("--version", action="version", version=f"castlora {__version__}")
    sub = parser.add_subcommands(dest="command", required=True)
    quick = bench_quick(argv or [])
    for name, (_, cls, help_, positional) in COMMANDS.items():
        p = ArgumentParser(description=help_, exit_on_error=False, formatter_class=WideHelp,
                           usage=f"castlora {name} {USAGE.get(name, '[options]')}")
        p.add_argument("--config", action=ActionConfigFile, help="YAML file of the options below; flags after it "
                                                                 "override it")
        p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
        p.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
        _add_fields(p, cls, positional)
        if name == "bench" and quick:  # defaults <- --quick's sizes <- YAML <- flags
            p.set_defaults(**QUICK)
        sub.add_subcommand(name, p, help=help_)
    return parser


def _one_line(e: BaseException) -> str:
    """jsonargparse's message on one line, options named as flags."""
    text = re.sub(r'(Parser )?[Kk]ey "([\w.]+)"', lambda m: "--" + m.group(2).split(".")[-1].replace("_", "-"), str(e))
    # jsonargparse refuses nan and inf as floats; say so in words
    text = re.sub(r":\s*Expected a <class 'float'>\. Got value: (\S+)", r" must be a finite number, not \1", text)
    return " ".join(text.split())[:600]


def setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    # library chatter that means nothing to a castlora user (their own warnings stay visible with -v)
    if not verbose:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft|torch)\b")
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    try:
        precheck_config_files(argv)
        ns = parser.parse_args(argv)
    except SystemExit:  # --help, --version, --print_config exit as argparse's do
        raise
    except CastloraError as e:
        print(f"castlora: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # jsonargparse's ArgumentError and the YAML loader's errors: the user's input
        print(f"castlora: error: {_one_line(e)}", file=sys.stderr)
        return 2
    name = ns.command
    func, cls, _, _ = COMMANDS[name]
    values = ns[name].as_dict()
    quiet, verbose = values.pop("quiet", False), values.pop("verbose", False)
    values.pop("config", None)
    values = {k: v for k, v in values.items() if not k.startswith("__")}
    setup_logging(quiet, verbose)
    try:
        cfg = build(cls, values)
        return func(cfg)
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


__all__ = ["main", "build_parser", "COMMANDS"]
