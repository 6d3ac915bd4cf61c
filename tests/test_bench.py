"""Bench pieces that need no model: deterministic tasks, retention arithmetic, the report."""

from __future__ import annotations

import json
import math

from castlora.bench.report import markdown_table, plot_gap
from castlora.bench.tasks import make_echo, make_facts, make_greet
from castlora.evaluate import retention
from conftest import shared_path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tasks_are_deterministic_and_test_phrasing_is_held_out(tmp_path):
    a, b = make_facts(tmp_path / "a", seed=3), make_facts(tmp_path / "b", seed=3)
    assert a.train.read_bytes() == b.train.read_bytes() and a.test.read_bytes() == b.test.read_bytes()
    assert make_facts(tmp_path / "c", seed=4).test.read_bytes() != a.test.read_bytes()
    train, test = _read(a.train), _read(a.test)
    assert len(test) == 120 and all(t["prompt"].startswith("Q: Which town is home to") for t in test)
    # the test question's phrasing never occurs in training, but every answer's fact does
    assert not any("Which town is home to" in r["prompt"] + r["completion"] for r in train)
    texts = " ".join(r["prompt"] + r["completion"] for r in train)
    for t in test:
        name = t["prompt"].split("home to ")[1].rstrip("? A:")
        assert f"{name} lives in{t['completion']}" in texts


def test_greet_test_names_unseen():
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        task = make_greet(Path(d))
        train, test = _read(task.train), _read(task.test)
    train_names = {r["prompt"][6:-3] for r in train}
    assert len(test) == 100 and not any(r["prompt"][6:-3] in train_names for r in test)
    assert all(r["completion"] == f" Hello, {r['prompt'][6:-3]}! Welcome to the club." for r in test)


def test_echo_words_are_real_unseen_and_deterministic(tmp_path):
    shared = shared_path("data", "general").parents[1]
    a, b = make_echo(tmp_path / "a", shared), make_echo(tmp_path / "b", shared)
    assert a.train.read_bytes() == b.train.read_bytes() and a.test.read_bytes() == b.test.read_bytes()
    train, test = _read(a.train), _read(a.test)
    word = lambda r: r["prompt"][len("Say "):-len(" three times ->")]  # noqa: E731
    assert len(train) == 400 and len(test) == 100
    assert not {word(r) for r in test} & {word(r) for r in train}
    assert all(r["completion"] == f" {word(r)} {word(r)} {word(r)}." and word(r).isalpha() for r in test)


def test_retention_arithmetic():
    r = retention(base=5.0, retrained=4.0, transfer=4.5)
    assert math.isclose(r["gap_recovered"], 0.5) and math.isclose(r["ratio"], math.exp(-0.5))
    r = retention(base=0.1, retrained=0.9, transfer=0.7, lower_is_better=False)
    assert math.isclose(r["gap_recovered"], 0.75) and math.isclose(r["ratio"], 0.7 / 0.9)


def test_report_table_and_chart(tmp_path):
    rows = [{"pair": "a->b", "task": "t", "method": "base", "loss": 5.0, "ratio": 0.37, "gap_recovered": 0.0},
            {"pair": "a->b", "task": "t", "method": "retrained", "loss": 4.0, "ratio": 1.0, "gap_recovered": 1.0},
            {"pair": "a->b", "task": "t", "method": "cast_source", "loss": 4.2, "ratio": 0.82, "gap_recovered": 0.8},
            {"pair": "a->b", "task": "g", "method": "base", "accuracy": 0.1, "ratio": 0.2, "gap_recovered": 0.0},
            {"pair": "a->b", "task": "g", "method": "retrained", "accuracy": 0.12, "ratio": 1.0, "gap_recovered": 1.0},
            {"pair": "a->b", "task": "g", "method": "cast_source", "accuracy": 0.11, "ratio": 0.9, "gap_recovered": 0.5}]
    md = markdown_table({"rows": rows})
    assert "| a->b | t | 5.000 | 4.000 | 1.000 | 0.820 / 0.800 |" in md
    assert "small gain" in md.split("| a->b | g |")[1].splitlines()[0]  # 0.02 accuracy gain is flagged
    assert "| **mean** |" in md and "0.860 / 0.650" in md
    plot_gap({"rows": rows}, tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
