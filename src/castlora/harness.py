"""`castlora eval --lm-eval TASKS`: lm-eval-harness (an optional extra: pip install "castlora[lm-eval]") on the
model with its adapter, through the harness's own hf backend and its `peft=` argument, so the numbers are the
ones any lm-eval user gets for the same folders. TASKS are the harness's task names, or task YAML files (or
folders of them) given by path, for tasks of your own on local data."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CastloraError


def task_names(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(task names, folders to include): a YAML file given by path adds its folder and its `task:` name, a folder
    adds every task YAML in it; anything else is a task name the harness knows."""
    names, include = [], []
    for t in tasks:
        p = Path(t)
        files = sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml")) if p.is_dir() else \
            [p] if p.suffix in (".yaml", ".yml") else []
        if p.suffix in (".yaml", ".yml") and not p.is_file():
            raise CastloraError(f"--lm-eval task file {p} does not exist")
        if not files:
            names.append(t)
            continue
        include.append(str(p if p.is_dir() else p.parent))
        for f in files:  # the harness's YAML may hold tags (!function) that a plain YAML reader refuses
            m = re.search(r"(?m)^task:\s*['\"]?([\w.\-]+)", f.read_text(encoding="utf-8"))
            if m is None:
                raise CastloraError(f"--lm-eval task file {f} names no task (a `task: NAME` line)")
            names.append(m.group(1))
    return names, include


def run_lm_eval(model: str, adapter: str | None, tasks: list[str], device: str, dtype: str = "float32",
                batch_size: int = 8, limit: int | None = None) -> dict:
    """Each task's numeric metrics, as {"lm_eval/TASK/METRIC": value}."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CastloraError("--lm-eval needs lm-eval-harness: pip install \"castlora[lm-eval]\"") from None
    names, include = task_names(tasks)
    manager = TaskManager(include_path=include or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise CastloraError(f"lm-eval knows no task {', '.join(unknown)}: give a harness task name or a task YAML "
                            "file by path")
    args = f"pretrained={model},dtype={dtype}" + (f",peft={adapter}" if adapter else "")
    out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=names, task_manager=manager, device=device,
                                  batch_size=batch_size, limit=limit)
    return {f"lm_eval/{task}/{metric.split(',')[0]}": float(value)
            for task, metrics in out["results"].items() for metric, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in metric}
