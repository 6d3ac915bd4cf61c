"""The retention benchmark: tasks, pairs, methods, the runner and its report."""

from .runner import METHODS, PAIRS, QUICK, TASKS, BenchConfig, bench, check_config

__all__ = ["bench", "BenchConfig", "check_config", "METHODS", "PAIRS", "QUICK", "TASKS"]
