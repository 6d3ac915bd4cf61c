"""Tables and a chart from results.json: ratio and gap recovered per (pair, task) and method."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _value(row: dict) -> float:
    """The measured quantity: test loss for LM tasks, accuracy for exact-match tasks."""
    return row["loss"] if "loss" in row else row["accuracy"]


def markdown_table(table: dict) -> str:
    rows = table["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] not in ("base", "retrained", "source")))
    cells = list(dict.fromkeys((r["pair"], r["task"]) for r in rows))
    by = {(r["pair"], r["task"], r["method"]): r for r in rows}
    lines = ["| pair | task | base | retrained | LoRA gain | " + " | ".join(methods) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(methods)]
    for pair, task in cells:
        base, ret = by.get((pair, task, "base")), by.get((pair, task, "retrained"))
        gain = abs(_value(base) - _value(ret)) if base and ret else None
        flag = " ⚠ small gain" if gain is not None and gain < 0.05 else ""
        vals = []
        for m in methods:
            r = by.get((pair, task, m))
            vals.append(f"{_fmt(r['ratio'])} / {_fmt(r['gap_recovered'])}" if r else "")
        lines.append(f"| {pair} | {task} | {_fmt(base and _value(base))} | {_fmt(ret and _value(ret))} | "
                     f"{_fmt(gain)}{flag} | " + " | ".join(vals) + " |")
    means = defaultdict(list)
    for r in rows:
        if r["method"] in methods and r["gap_recovered"] is not None:
            means[r["method"]].append((r["ratio"], r["gap_recovered"]))
    lines.append("| **mean** | | | | | " + " | ".join(
        f"{_fmt(sum(a for a, _ in means[m]) / len(means[m]))} / {_fmt(sum(b for _, b in means[m]) / len(means[m]))}"
        if means[m] else "" for m in methods) + " |")
    not_free = list(dict.fromkeys(r["method"] for r in rows if r.get("task_prompts")))
    sets = sorted({r.get("prompt_set", "train") for r in rows if r.get("task_prompts")})  # older rows: train
    which = " or ".join({"train": "training", "fresh": "fresh (in neither split)"}[x] for x in sets)
    text = ("Cells: ratio / gap recovered. base / retrained: test loss (shakespeare, kjv) or exact-match "
            "accuracy (greet, echo, facts); LoRA gain = |base - retrained|, flagged below 0.05."
            + (f" Not data-free (they read the task's unlabelled {which} prompts, `--prompts`: CAST's text sampled "
               "from them, or, `--transfer labels`, the source's answers to them; the true answers never read): "
               f"{', '.join(not_free)}." if not_free else "")
            + "\n\n") + "\n".join(lines) + "\n"
    return text + _completion_table(rows, methods) + _bits_table(rows, methods)


def _bits_table(rows: list[dict], methods: list[str]) -> str:
    """LM tasks: bits per byte of the test text for every row, the source with its LoRA included: unlike the loss
    per token, it compares models with different tokenizers."""
    measured = [r for r in rows if r.get("bits_per_byte") is not None]
    if not measured:
        return ""
    columns = ["source", "base", "retrained", *methods]
    by = {(r["pair"], r["task"], r["method"]): r["bits_per_byte"] for r in measured}
    cells = list(dict.fromkeys((r["pair"], r["task"]) for r in measured))
    lines = ["| pair | task | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for pair, task in cells:
        lines.append(f"| {pair} | {task} | " + " | ".join(_fmt(by.get((pair, task, m))) for m in columns) + " |")
    return "\nBits per byte of the test text (lower is better; comparable across tokenizers):\n\n" + \
        "\n".join(lines) + "\n"


def _completion_table(rows: list[dict], methods: list[str]) -> str:
    """Exact-match tasks: the gap recovered on the completion loss (teacher-forced), which shows
    partial transfer where exact match is all or nothing."""
    graded = [r for r in rows if r.get("completion_loss") is not None]
    if not graded:
        return ""
    by = {(r["pair"], r["task"], r["method"]): r for r in graded}
    cells = list(dict.fromkeys((r["pair"], r["task"]) for r in graded))
    lines = ["", "Exact-match tasks, graded: completion loss of base / retrained, and each method's gap recovered "
             "on it.", "", "| pair | task | base | retrained | " + " | ".join(methods) + " |",
             "|---|---|---:|---:|" + "---:|" * len(methods)]
    for pair, task in cells:
        base, ret = by.get((pair, task, "base")), by.get((pair, task, "retrained"))
        vals = [_fmt(by[(pair, task, m)]["completion_gap_recovered"]) if (pair, task, m) in by else "" for m in methods]
        lines.append(f"| {pair} | {task} | {_fmt(base and base['completion_loss'])} | "
                     f"{_fmt(ret and ret['completion_loss'])} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def bar_heights(rows: list[dict], method: str, cells: list[str]) -> list[float]:
    """Gap recovered of `method` per cell, clipped to [-1, 1.5]; NaN (no bar) where the cell lacks the method.
    (min/max with a NaN return the bound, which once drew every missing cell as a full 1.5 bar.)"""
    vals = {f"{r['pair']}\n{r['task']}": r["gap_recovered"] for r in rows if r["method"] == method}
    out = []
    for c in cells:
        v = vals.get(c)
        out.append(float("nan") if v is None or v != v else max(-1.0, min(1.5, v)))
    return out


def plot_gap(table: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in table["rows"] if r["method"] not in ("base", "retrained", "source")]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cells = list(dict.fromkeys(f"{r['pair']}\n{r['task']}" for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cells)), 4))
    w = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        ax.bar([x + i * w for x in range(len(cells))], bar_heights(rows, m, cells), w, label=m)
    ax.axhline(0.9, color="k", ls="--", lw=0.8)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xticks([x + 0.4 - w / 2 for x in range(len(cells))], cells, fontsize=8)
    ax.set_ylabel("gap recovered (clipped to [-1, 1.5])")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(table: dict, out: Path) -> None:
    from ..safe_io import write_text_atomic
    write_text_atomic(Path(out) / "results.md", markdown_table(table))
    plot_gap(table, Path(out) / "gap_recovered.png")
