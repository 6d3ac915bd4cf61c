"""The retention benchmark: tasks, pairs, methods, the runner and its report."""

from .runner import METHODS, PAIRS, TASKS, BenchConfig, bench

__all__ = ["bench", "BenchConfig", "METHODS", "PAIRS", "TASKS"]
