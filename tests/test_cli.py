"""The command line: help lists the subcommands, `inspect` prints one line per kernel, `translate`
fails early and clearly on a missing adapter, and YAML configs are overridden by flags."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_tiny, read_docs, shared_path
from peft import LoraConfig, get_peft_model

from castlora import __version__
from castlora.cli import main
import castlora.pair as pair_mod

translate_mod = importlib.import_module("castlora.translate")  # `castlora.translate` is the function
SUBCOMMANDS = ("inspect", "translate", "train-lora", "eval", "demo")



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "llama"
    model = make_tiny("llama", 0, vocab_size=32000, max_position_embeddings=128)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared_path("zoo", "llama") / name, model_dir / name)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.peft_config["default"].base_model_name_or_path = str(model_dir)
    pm.save_pretrained(str(root / "adapter"))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n\n".join(read_docs("data", "general", "valid.txt.gz", n=60)), encoding="utf-8")
    return dict(root=root, model=model_dir, adapter=root / "adapter", corpus=corpus)


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for cmd in SUBCOMMANDS:
        assert cmd in out
    with pytest.raises(SystemExit) as ei:
        main(["translate", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--source", "--adapter", "--target", "--corpus", "--steps", "--teacher",
                 "--resume", "--overwrite", "--allow-pickle"):
        assert flag in out
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert __version__ in capsys.readouterr().out


def test_help_as_a_program():
    r = subprocess.run([sys.executable, "-m", "castlora.cli", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(cmd in r.stdout for cmd in SUBCOMMANDS)


def test_no_subcommand_is_a_usage_error(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "command" in err and "translate" in err and err.count("\n") == 1  # one line


def test_inspect_prints_one_line_per_kernel(setup, capsys):
    rc = main(["inspect", str(setup["adapter"]), "--model", str(setup["model"])])
    assert rc == 0
    out = capsys.readouterr().out
    assert "family llama" in out and "2 modules" not in out and "4 modules, 4 kernels" in out
    rows = [l.split() for l in out.splitlines() if re.match(r"^\s+\d+ \w+\s+\d+ ", l)]
    assert [(r[0], r[1], r[2]) for r in rows] == [("0", "q", "4"), ("0", "v", "4"), ("1", "q", "4"), ("1", "v", "4")]
    assert rows[0][-1] == "model.layers.0.self_attn.q_proj"
    assert all(float(r[-2]) > 0 for r in rows)  # |s*B@A| is nonzero
    # without --model: the base model recorded in adapter_config.json
    assert main(["inspect", str(setup["adapter"])]) == 0
    assert "4 modules, 4 kernels" in capsys.readouterr().out


def test_inspect_wrong_model_is_a_clean_error(setup, tmp_path, capsys):
    other = tmp_path / "neox"
    make_tiny("gpt_neox", 0).save_pretrained(str(other), safe_serialization=True)
    rc = main(["inspect", str(setup["adapter"]), "--model", str(other)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "castlora: error:" in err and "Traceback" not in err
    assert "q_proj" in err


def test_translate_missing_adapter_exits_2_before_loading(setup, tmp_path, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(pair_mod, "load_model", no_load)
    missing = tmp_path / "no_such_adapter"
    rc = main(["translate", "--source", str(setup["model"]), "--target", str(setup["model"]),
               "--adapter", str(missing), "--corpus", str(setup["corpus"]), "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such local folder" in err
    assert not (tmp_path / "out").exists()
    # a required option left out names the option
    rc = main(["translate", "--source", str(setup["model"]), "--target", str(setup["model"]),
               "--corpus", str(setup["corpus"]), "--out", str(tmp_path / "out")])
    assert rc == 2 and "--adapter" in capsys.readouterr().err


def test_yaml_config_overridden_by_flags(setup, tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(translate_mod, "translate", lambda config=None, **kw: seen.append(config))
    cfg_file = tmp_path / "x.yaml"
    cfg_file.write_text(yaml.safe_dump({"steps": 0, "lr": 0.01, "teacher": "delta", "progress": True,
                                        "corpus": [str(setup["corpus"])]}))
    assert main(["translate", "--config", str(cfg_file), "--steps", "7", "--no-progress"]) == 0
    cfg = seen[-1]
    assert cfg.steps == 7 and cfg.progress is False  # flags win
    assert cfg.lr == 0.01 and cfg.teacher == "delta" and cfg.corpus == [str(setup["corpus"])]  # YAML kept
    assert cfg.batch_size == 8  # default where neither says
    assert main(["translate", "--config", str(cfg_file)]) == 0
    assert seen[-1].steps == 0 and seen[-1].progress is True

    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    assert main(["translate", "--config", str(bad)]) == 2
    assert "stepz" in capsys.readouterr().err
    bad.write_text("teacher: bogus\n")
    assert main(["translate", "--config", str(bad)]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert main(["translate", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_translate_runs_from_yaml_with_flag_override(setup, tmp_path):
    """A real (CAST-0) run: YAML gives everything with steps: 0, flags change seq-len and out."""
    out = tmp_path / "ported"
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "source": str(setup["model"]), "target": str(setup["model"]), "adapter": str(setup["adapter"]),
        "corpus": [str(setup["corpus"])], "out": str(tmp_path / "yaml_out"), "steps": 0,
        "batch_size": 2, "seq_len": 64, "calib_batches": 1, "progress": False}))
    assert main(["translate", "--config", str(cfg_file), "--seq-len", "32", "--out", str(out)]) == 0
    rec = json.loads((out / "castlora.json").read_text())
    assert rec["config"]["steps"] == 0 and rec["config"]["seq_len"] == 32 and rec["config"]["out"] == str(out)
    assert rec["loss_curve"] == []
    assert (out / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "yaml_out").exists()


def test_bench_flags_reach_the_config(tmp_path, monkeypatch):
    """`castlora bench` is a thin layer over `bench(BenchConfig)`: --seed sets the tasks, LoRAs and CAST runs,
    --cast-seed only the CAST runs (a second seed on the same LoRAs), and unset flags keep the defaults."""
    bench_mod = importlib.import_module("castlora.bench")
    seen = []
    monkeypatch.setattr(bench_mod, "bench", lambda cfg, **kw: seen.append(cfg) or {"rows": []})
    out = str(tmp_path / "b")
    assert main(["bench", "--out", out, "--pairs", "llama->neox", "--seed", "2", "--cast-seed", "5"]) == 0
    assert main(["bench", "--out", out]) == 0
    assert (seen[0].seed, seen[0].cast_seed, seen[0].pairs, seen[0].out) == (2, 5, ["llama->neox"], out)
    assert (seen[1].seed, seen[1].cast_seed) == (0, -1) and len(seen[1].pairs) == 5
    assert main(["bench", "--out", out, "--cast-steps", "1000", "--exact-cast-steps", "0"]) == 0
    assert (seen[2].steps_for("lm"), seen[2].steps_for("exact"), seen[1].steps_for("exact")) == (1000, 1000, 400)


def test_bench_refuses_negative_exact_cast_steps(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path / "b"), "--exact-cast-steps", "-1"]) == 2
    assert "--exact-cast-steps must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.fixture
def fake_shared(tmp_path, monkeypatch):
    """A shared folder with the zoo's names and no weights: enough for the checks that run before any work."""
    for name in ("llama", "mistral", "neox"):
        (tmp_path / "shared" / "zoo" / name).mkdir(parents=True)
        (tmp_path / "shared" / "zoo" / name / "config.json").write_text("{}")
    (tmp_path / "shared" / "data").mkdir()
    monkeypatch.setenv("CASTLORA_SHARED", str(tmp_path / "shared"))
    return tmp_path / "shared"


@pytest.mark.parametrize("flags, says", [
    (["--methods", "cast_source", "cast_sorce"], "unknown method 'cast_sorce'; choose from cast0,"),
    (["--tasks", "shakespear"], "unknown task 'shakespear'; choose from shakespeare, kjv, greet, echo, facts"),
    (["--pairs", "llama-mistral"], "pair 'llama-mistral' is not SOURCE->TARGET"),
    (["--pairs", "llama->gpt2"], "unknown zoo model in 'llama->gpt2': 'gpt2'; choose from llama, mistral"),
    (["--exact-lora-steps", "0"], "--exact-lora-steps must be >= 1, not 0"),
    (["--cast-steps", "-5"], "--cast-steps and --exact-cast-steps must be >= 0"),
])
def test_bench_refuses_bad_input_before_any_work(fake_shared, tmp_path, capsys, flags, says):
    """A misspelt method used to surface as a KeyError after the first LoRA had trained for minutes: every
    name and count is now checked first, the error names the choices, and no output folder is made."""
    assert main(["bench", "--out", str(tmp_path / "b"), *flags]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_bench_takes_every_option_from_yaml_and_flags(tmp_path, monkeypatch, capsys):
    """Every BenchConfig field is a flag (the LoRA recipe too); YAML overrides the defaults (and --quick's
    sizes), flags override YAML, and a YAML slip (a string where a list belongs) is refused by name."""
    bench_mod = importlib.import_module("castlora.bench")
    seen = []
    monkeypatch.setattr(bench_mod, "bench", lambda cfg, **kw: seen.append(cfg) or {"rows": []})
    cfg_file = tmp_path / "bench.yaml"
    cfg_file.write_text(yaml.safe_dump({"tasks": ["greet"], "exact_lora_steps": 300, "exact_lora_schedule": "cosine",
                                        "cast_steps": 7}))
    assert main(["bench", "--config", str(cfg_file), "--exact-lora-schedule", "constant", "--lora-targets", "q",
                 "k"]) == 0
    cfg = seen[-1]
    assert (cfg.tasks, cfg.cast_steps, cfg.lora_targets) == (["greet"], 7, ["q", "k"])
    assert cfg.lora_recipe("exact")["steps"] == 300 and cfg.lora_recipe("exact")["schedule"] == "constant"
    assert main(["bench", "--quick", "--config", str(cfg_file)]) == 0  # --quick's sizes, YAML over them
    assert (seen[-1].lora_steps, seen[-1].cast_steps, seen[-1].tasks) == (30, 7, ["greet"])
    cfg_file.write_text("tasks: greet\n")
    assert main(["bench", "--config", str(cfg_file)]) == 2
    assert "option tasks must be a list, not 'greet'" in capsys.readouterr().err


def test_train_lora_with_a_decaying_lr(setup, tmp_path):
    """`castlora train-lora --schedule linear` trains a PEFT adapter that loads, records its schedule, and
    its lr ramps up over the warmup and then falls toward zero at the last step."""
    from peft import PeftModel

    from castlora.train_lora import lr_factor

    out = tmp_path / "lora"
    assert main(["train-lora", "--model", str(setup["model"]), "--data", str(setup["corpus"]), "--out", str(out),
                 "--steps", "14", "--batch-size", "2", "--seq-len", "32", "--schedule", "linear"]) == 0
    rec = json.loads((out / "train_lora.json").read_text())
    assert rec["schedule"] == "linear" and len(rec["losses"]) == 14
    assert all(torch.isfinite(torch.tensor(rec["losses"])))
    pm = PeftModel.from_pretrained(make_tiny("llama", 0, vocab_size=32000, max_position_embeddings=128), str(out))
    assert any(float(p.abs().sum()) > 0 for n, p in pm.named_parameters() if "lora_B" in n)  # it trained
    for schedule in ("linear", "cosine"):
        f = [lr_factor(schedule, s, 30) for s in range(30)]
        assert f[:10] == [(s + 1) / 10 for s in range(10)]
        assert f[10] == 1.0 and all(a > b for a, b in zip(f[10:], f[11:])) and 0 < f[-1] < 0.1
    assert [lr_factor("constant", s, 30) for s in range(10, 30)] == [1.0] * 20


def test_train_lora_unknown_schedule(setup, tmp_path, capsys):
    from castlora.train_lora import train_lora

    with pytest.raises(ValueError, match="constant, linear, cosine"):
        train_lora(str(setup["model"]), str(setup["corpus"]), str(tmp_path / "x"), steps=1, schedule="step")
    assert not (tmp_path / "x").exists()
    assert main(["train-lora", "--model", "m", "--data", "d", "--out", "o", "--schedule", "step"]) == 2
    err = capsys.readouterr().err
    assert "schedule" in err and "step" in err and err.count("\n") == 1


def test_inspect_names_the_model_type_and_never_fetches_a_base_the_adapter_names(setup, tmp_path, capsys):
    # an adapter whose config names a hub id as its base: inspect asks the hub only for a model the user names
    untrusted = tmp_path / "untrusted"
    shutil.copytree(setup["adapter"], untrusted)
    cfg = json.loads((untrusted / "adapter_config.json").read_text())
    (untrusted / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "evil/model"}))
    assert main(["inspect", str(untrusted)]) == 2
    assert "evil/model is not a local folder; pass --model evil/model" in capsys.readouterr().err
    assert main(["inspect", str(untrusted), "--model", str(setup["model"])]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "family llama" in first  # the model's own type (a mistral says "mistral (llama layout)")
