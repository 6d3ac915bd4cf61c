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


def test_lm_eval_bits_per_byte_of_a_ported_adapter_agree_with_castlora_eval(tmp_path, monkeypatch, capsys):
    """The same ported adapter, scored by `castlora eval` and by lm-eval-harness (its hf backend with peft=, a
    local task given by path): bits per byte agree within 1% on the same Shakespeare passages."""
    pytest.importorskip("lm_eval")
    from castlora.cli import main
    from castlora.corpus import read_documents

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    zoo = shared_path("zoo")
    docs = read_documents(shared_path("data", "domains", "shakespeare", "test.txt.gz"))
    text = " ".join(d.replace("\n", " ") for d in docs)
    passages = [text[i:i + 1200] for i in range(0, 1200 * 12, 1200)]  # each well within one 512-token window
    data = tmp_path / "passages.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages), encoding="utf-8")
    task = tmp_path / "tasks" / "passages.yaml"
    task.parent.mkdir()
    task.write_text(f"""task: castlora_passages
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: bits_per_byte
metadata:
  version: 1.0
""", encoding="utf-8")
    lora, port = tmp_path / "lora", tmp_path / "port"
    assert main(["train-lora", "--model", str(zoo / "llama"), "--data", str(shared_path("data", "domains",
                 "shakespeare", "train.txt.gz")), "--out", str(lora), "--steps", "5", "--seq-len", "64"]) == 0
    assert main(["translate", "--source", str(zoo / "llama"), "--adapter", str(lora), "--target", str(zoo / "mistral"),
                 "--corpus", str(shared_path("data", "general", "valid.txt.gz")), "--out", str(port), "--steps", "0",
                 "--seq-len", "64", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(zoo / "mistral"), "--adapter", str(port), "--data", str(data),
                 "--seq-len", "512", "--lm-eval", str(task), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ours, theirs = result["bits_per_byte"], result["lm_eval/castlora_passages/bits_per_byte"]
    assert math.isfinite(ours) and abs(ours - theirs) / theirs < 0.01, (ours, theirs)
