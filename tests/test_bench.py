"""Bench pieces that need no model: deterministic tasks, retention arithmetic, the report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from castlora.bench import BenchConfig, bench
from castlora.bench.report import bar_heights, markdown_table, plot_gap
from castlora.bench.tasks import fresh_prompts, make_echo, make_facts, make_greet, train_prompts
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


def test_train_prompts_hold_every_training_prompt_and_no_answer(tmp_path):
    from castlora.corpus import read_corpus, read_prompts

    task = make_greet(tmp_path / "g", seed=0)
    path = train_prompts(task, tmp_path / "g")
    train = _read(task.train)
    # the same prompts through --prompts and --corpus; the answers' text is nowhere in the file
    assert read_prompts([str(path)]) == read_corpus([str(path)]) == [r["prompt"] for r in train]
    assert "Welcome to the club" not in path.read_text() and "Welcome to the club" in task.train.read_text()


def test_fresh_prompts_are_of_the_tasks_form_and_in_neither_split(tmp_path):
    shared = shared_path()
    for task in (make_greet(tmp_path / "t", 0), make_echo(tmp_path / "t", shared, 0)):
        path = fresh_prompts(task, tmp_path / "t", shared)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        prompts = [r["text"] for r in rows]
        seen = {json.loads(line)["prompt"] for f in (task.train, task.test) for line in f.read_text().splitlines()}
        assert len(prompts) == len(set(prompts)) == 400 and not set(prompts) & seen
        assert all(set(r) == {"text"} for r in rows)  # prompts only, no answer
        form = "Greet " if task.name == "greet" else "Say "
        assert all(p.startswith(form) and p.endswith("->") for p in prompts)
        assert fresh_prompts(task, tmp_path / "t", shared).read_text() == path.read_text()  # deterministic
    assert fresh_prompts(make_facts(tmp_path / "t", 0), tmp_path / "t", shared) is None


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
    assert "| **mean** |" in md and "0.860 / 0.650" in md and "Not data-free" not in md
    # a row that sampled its text from the task's prompts is named as not data-free under the table
    md = markdown_table({"rows": [*rows, {**rows[2], "method": "cast_prompts_zd", "task_prompts": 400}]})
    assert "Not data-free (they read the task's unlabelled training prompts" in md
    assert "answers never read): cast_prompts_zd." in md
    md = markdown_table({"rows": [*rows, {**rows[2], "method": "source_labels", "task_prompts": 400,
                                          "prompt_set": "fresh"}]})
    assert "the task's unlabelled fresh (in neither split) prompts" in md
    plot_gap({"rows": rows}, tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    # a method run on one cell only draws no bar in the others (not a full 1.5 bar), and values are clipped
    rows.append({"pair": "a->b", "task": "t", "method": "cast0", "loss": 9.0, "ratio": 0.01, "gap_recovered": -4.0})
    heights = bar_heights(rows, "cast0", ["a->b\nt", "a->b\ng"])
    assert heights[0] == -1.0 and math.isnan(heights[1])
    assert bar_heights(rows, "cast_source", ["a->b\nt", "a->b\ng"]) == [0.8, 0.5]


def test_completion_loss_is_the_mean_loss_of_the_completion_tokens(tiny, zoo):
    """The graded score of exact-match tasks: batched and right-padded, it must equal the loss of
    each completion (EOS included) given its prompt, computed one unpadded example at a time."""
    from transformers import AutoTokenizer

    from castlora.evaluate import completion_example, completion_loss
    tok = AutoTokenizer.from_pretrained(zoo("llama"))
    model = tiny("llama", vocab_size=len(tok))
    examples = [{"prompt": "Greet Kalo ->", "completion": " Hello, Kalo! Welcome to the club."},
                {"prompt": "Say house three times ->", "completion": " house house house."},
                {"prompt": "Q: Which town is home to Mirentas? A:", "completion": " Ashford"}]
    total, count = 0.0, 0
    for e in examples:
        ids, labels = completion_example(tok, e)
        n_prompt = labels.count(-100)
        assert ids[n_prompt:] == labels[n_prompt:] and ids[-1] == tok.eos_token_id
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        total -= sum(float(logp[i - 1, ids[i]]) for i in range(n_prompt, len(ids)))
        count += len(ids) - n_prompt
    got = completion_loss(model, tok, examples, batch_size=2)
    assert got["tokens"] == count
    assert math.isclose(got["completion_loss"], total / count, rel_tol=1e-5)


def test_completion_tokens_are_those_of_the_whole_text_in_every_zoo_tokenizer(zoo):
    """A completion is tokenized as part of the text the model reads: no tokenizer gets a second space
    before it (a completion tokenized apart got one from sentencepiece's dummy prefix, and llama and
    mistral split that double space differently), and all three zoo families label the same words."""
    from transformers import AutoTokenizer

    from castlora.evaluate import completion_example
    example = {"prompt": "Greet Kalo ->", "completion": " Hello, Kalo! Welcome to the club."}
    for family in ("llama", "mistral", "neox"):
        tok = AutoTokenizer.from_pretrained(zoo(family))
        ids, labels = completion_example(tok, example)
        n_prompt = labels.count(-100)
        assert ids[:n_prompt] == tok(example["prompt"])["input_ids"]  # what generation starts from
        assert tok.decode(ids, skip_special_tokens=True) == example["prompt"] + example["completion"]
        assert tok.decode(labels[n_prompt:], skip_special_tokens=True).strip() == example["completion"].strip()
        assert tok.convert_ids_to_tokens(labels[n_prompt])[1:] == "Hello", family  # one space, one piece


def test_report_adds_the_graded_table_for_exact_tasks():
    rows = [{"pair": "a->b", "task": "g", "method": "base", "accuracy": 0.0, "ratio": 0.0, "gap_recovered": 0.0,
             "completion_loss": 6.0, "completion_gap_recovered": 0.0},
            {"pair": "a->b", "task": "g", "method": "retrained", "accuracy": 0.5, "ratio": 1.0, "gap_recovered": 1.0,
             "completion_loss": 1.0, "completion_gap_recovered": 1.0},
            {"pair": "a->b", "task": "g", "method": "cast_source_gen", "accuracy": 0.0, "ratio": 0.0,
             "gap_recovered": 0.0, "completion_loss": 5.0, "completion_gap_recovered": 0.2}]
    md = markdown_table({"rows": rows})
    assert "| a->b | g | 6.000 | 1.000 | 0.200 |" in md.split("graded")[1]
    lm_only = [{k: v for k, v in r.items() if not k.startswith("completion")} for r in rows]
    assert "graded" not in markdown_table({"rows": lm_only})


def test_every_bench_method_is_valid_translate_options_with_its_control_beside_it():
    from castlora.bench.runner import METHODS
    from castlora.config import TranslateConfig, build

    for name, opts in METHODS.items():
        # unknown keys or choices raise; "task" is the runner's word for the task's training prompts file, "lora"
        # for the steps and lr of the task's LoRA recipe
        build(TranslateConfig, {"corpus": ["general.txt"]}, {k: (["prompts.jsonl"] if v == "task" else {"steps": 800, "lr": 5e-3}[k]
                                        if v == "lora" else v) for k, v in opts.items()})
    # the rows that read the task's prompts are not data-free: the prompts rows, and the LoRA on the source's answers
    assert {n for n, o in METHODS.items() if "prompts" in o} == {"cast_prompts_zd", "imitation_prompts_zd",
                                                                   "source_labels"}
    assert METHODS["source_labels"]["transfer"] == "labels"
    # each CAST row's imitation control is the same run with the LoRA off in the teacher only
    controls = [name for name, opts in METHODS.items() if opts.get("teacher_lora") is False]
    assert len(controls) >= 4 and all(name.startswith("imitation") for name in controls)
    for control in controls:
        cast = "cast_" + control.removeprefix("imitation_") if control != "imitation" else "cast_source"
        assert METHODS[control] == {**METHODS[cast], "teacher_lora": False}
    assert METHODS["cast_auto_gen_all"] == {}  # the default port is the translate defaults


def test_exact_match_tasks_get_their_own_cast_steps_unless_zero():
    cfg = BenchConfig(cast_steps=150, exact_cast_steps=400)
    assert (cfg.steps_for("lm"), cfg.steps_for("exact")) == (150, 400)
    assert BenchConfig(cast_steps=150, exact_cast_steps=0).steps_for("exact") == 150
    quick = BenchConfig.quick_config()  # the smoke run stays small whatever tasks it is given
    assert quick.steps_for("exact") == quick.cast_steps == 20


def test_lora_recipes_per_task_kind_are_valid_train_lora_arguments():
    """The source and retrained LoRAs: the exact-match recipe decays its lr (a constant lr made the exact-match
    LoRA a matter of the training run's seed), the LM recipe keeps the constant lr its table was measured
    with; both name only train_lora's own arguments."""
    import inspect

    from castlora.train_lora import SCHEDULES, train_lora

    cfg = BenchConfig(seed=3)
    lm, exact = cfg.lora_recipe("lm"), cfg.lora_recipe("exact")
    assert (lm["schedule"], lm["steps"], lm["lr"], lm["targets"]) == ("constant", 150, cfg.lr, ["q", "v"])
    assert (exact["schedule"], exact["steps"], exact["targets"]) == ("linear", 800, ["q", "k", "v", "o"])
    assert lm["seed"] == exact["seed"] == 3 and exact["alpha"] == 2 * cfg.lora_rank
    params = inspect.signature(train_lora).parameters
    assert set(lm) <= set(params) and set(exact) <= set(params)
    assert {lm["schedule"], exact["schedule"]} <= set(SCHEDULES)


def test_bench_refuses_cached_loras_of_another_recipe_before_any_work(tmp_path):
    """A LoRA left in OUT/loras by an older recipe (400 steps and no schedule recorded, or completions tokenized
    apart from their prompts) would be scored as this run's: the bench names it and what differs, and stops
    before training or loading anything."""
    from castlora.errors import CastloraError

    cfg = BenchConfig(out=str(tmp_path), shared=str(shared_path()), pairs=["llama->mistral"], tasks=["greet"],
                      methods=["cast0"])
    old = tmp_path / "loras" / "mistral_greet"
    old.mkdir(parents=True)
    (old / "adapter_model.safetensors").write_bytes(b"")
    (old / "train_lora.json").write_text(json.dumps({"steps": 400, "lr": 5e-3, "rank": 8, "seed": 1}))
    with pytest.raises(CastloraError, match="mistral_greet: steps 400 \\(this run: 800\\), schedule constant "
                                            "\\(this run: linear\\), completion_tokens apart \\(this run: "
                                            "joint\\)") as e:
        bench(cfg, log=lambda *a: None)
    assert "llama_greet" not in str(e.value) and "another --out" in str(e.value)
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "loras" / "llama_greet").exists()
    # the same LoRA under the recipe it was trained with (another seed: reused on purpose) passes the check
    from castlora.bench.runner import _recipe_differs
    old_recipe = {**BenchConfig(exact_lora_steps=400, exact_lora_schedule="constant").lora_recipe("exact"), "seed": 0}
    assert _recipe_differs(old, old_recipe) == []  # an LM task's LoRA: no completions to tokenize
    assert _recipe_differs(old, old_recipe, exact=True) == ["completion_tokens apart (this run: joint)"]
    record = json.loads((old / "train_lora.json").read_text())
    (old / "train_lora.json").write_text(json.dumps({**record, "completion_tokens": "joint"}))
    assert _recipe_differs(old, old_recipe, exact=True) == []
