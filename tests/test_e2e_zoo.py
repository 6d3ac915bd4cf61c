"""End-to-end on the real zoo models (slow: minutes on 2 CPU cores). `.ci/run` runs these after
the fast suite: `python -m pytest -q -m slow`."""

from __future__ import annotations

import json
import math

import pytest

from conftest import SHARED, shared_path

pytestmark = pytest.mark.slow


def test_bench_quick_sanity_pair_and_finite(tmp_path):
    shared_path("zoo", "llama")
    from castlora.cli import main

    rc = main(["bench", "--quick", "--out", str(tmp_path / "bench"), "--shared", str(SHARED)])
    table = json.loads((tmp_path / "bench" / "results.json").read_text())
    rows = table["rows"]
    assert rc == 0
    assert {r["method"] for r in rows} >= {"base", "retrained", "cast0", "cast_source", "imitation",
                                           "weight_space", "random_heads"}
    for r in rows:
        assert math.isfinite(r["score"])
        if r["ratio"] is not None:
            assert math.isfinite(r["ratio"]) and math.isfinite(r["gap_recovered"])
    # the sanity pair: porting a LoRA onto its own base model must keep (nearly) all of it
    sanity = {r["method"]: r for r in rows if r["pair"] == "llama->llama"}
    assert sanity["cast0"]["gap_recovered"] >= 0.9
    assert sanity["cast_source"]["gap_recovered"] >= 0.9
    assert (tmp_path / "bench" / "results.md").read_text().count("|") > 10
    assert (tmp_path / "bench" / "gap_recovered.png").stat().st_size > 1000
