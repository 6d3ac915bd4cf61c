"""Bad input, interruption and untrusted files: every case in docs/robustness.md, provoked.

Each test asserts the three promises: a clear error (a CastloraError naming the problem and what to
do; on the command line `castlora: error: ...`, exit code 2, no traceback), nothing lost (no
half-written output, the last checkpoint kept), nothing executed (no pickle, no remote code unless
asked). Run with `-s` to see the messages a user gets.
"""

from __future__ import annotations

import errno
import gzip
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_tiny, read_docs, shared_path
from peft import LoraConfig, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file

import castlora
import castlora.export as export_mod
import castlora.models as models_mod
import castlora.pair as pair_mod
import castlora.train as train_mod
from castlora.adapters import load_adapter
from castlora.cli import main
from castlora.errors import (AdapterMismatchError, CastloraError, CorpusError, TrainingDiverged,
                             UnsafeFileError)
from castlora.families import (ROLE_COUNTERPARTS, FamilySpec, UnsupportedArchitectureError,
                               family_for, model_sites, register_family, supported_model_types)
from castlora.models import load_model, load_tokenizer
from castlora.safe_io import atomic_folder, load_tensors

cast_mod = importlib.import_module("castlora.transfers.cast")
labels_mod = importlib.import_module("castlora.transfers.labels")
QUIET = dict(progress=False, log=lambda *a, **k: None)
CHEAP = dict(steps=0, batch_size=2, seq_len=32, calib_batches=1)
# The interrupted / diverged runs: a checkpoint every 2 steps, long enough to be caught in the middle.
KILL = dict(steps=8, checkpoint_every=2, lr=1e-2, batch_size=2, seq_len=32, calib_batches=1)


def _seen(case: str, message: str) -> None:
    # shown with `pytest -s` (past capsys too): the messages quoted in docs/robustness.md
    print(f"\n[robustness] {case}: {message}", file=sys.__stdout__, flush=True)



def _model_folder(folder: Path, model_type: str, seed: int, tokenizer: str = "llama", vocab: int = 32000) -> Path:
    model = make_tiny(model_type, seed, vocab_size=vocab, max_position_embeddings=128)
    model.save_pretrained(str(folder), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared_path("zoo", tokenizer) / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    llama = _model_folder(root / "llama", "llama", 0)
    mistral = _model_folder(root / "mistral", "mistral", 1)  # llama family, other sizes, same tokenizer
    gpt2 = _model_folder(root / "gpt2", "gpt2", 2)  # no gate role: gate -> up
    neox = _model_folder(root / "neox", "gpt_neox", 4, tokenizer="neox", vocab=50304)
    pm = get_peft_model(load_model(str(llama)), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                           target_modules=["q_proj", "v_proj", "gate_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.peft_config["default"].base_model_name_or_path = str(llama)
    pm.save_pretrained(str(root / "adapter"))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n\n".join(read_docs("data", "general", "valid.txt.gz", n=120)), encoding="utf-8")
    return dict(root=root, llama=llama, mistral=mistral, gpt2=gpt2, neox=neox,
                adapter=root / "adapter", corpus=corpus)


def _run(env, out, target="mistral", **kw):
    opts = {**CHEAP, **QUIET, **kw}
    return castlora.translate(source=str(opts.pop("source", env["llama"])), adapter=str(opts.pop("adapter", env["adapter"])),
                              target=str(env[target]) if target in env else str(target),
                              corpus=[str(c) for c in opts.pop("corpus", [env["corpus"]])], out=str(out), **opts)


def _argv(env, out, source=None, adapter=None, target=None, corpus=None, extra=()):
    return ["translate", "--source", str(source or env["llama"]), "--adapter", str(adapter or env["adapter"]),
            "--target", str(target or env["mistral"]), "--corpus", str(corpus or env["corpus"]),
            "--out", str(out), "--steps", "0", "--batch-size", "2", "--seq-len", "32", "--calib-batches", "1",
            "--no-progress", *extra]


def _cli_error(argv, capsys) -> str:
    """Run the CLI, expect exit code 2 and one clean `castlora: error:` message; return it."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "castlora: error:" in err and "Traceback" not in err, err
    return err[err.index("castlora: error:"):].strip()


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model is loaded (the error must come before)."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input error was reported")

    monkeypatch.setattr(models_mod, "load_model", refuse)
    monkeypatch.setattr(pair_mod, "load_model", refuse)  # cast and weight-space load the pair here
    monkeypatch.setattr(labels_mod, "load_model", refuse)


def _assert_only(parent: Path, *names: str) -> None:
    """Nothing but `names` beside the output: no temporary, old or work folder."""
    assert sorted(p.name for p in parent.iterdir()) == sorted(names)


# ------------------------------------------------------------------ missing or unreadable paths


def _bad_path(env, tmp_path, case):
    """(argv keyword, the bad path) for one case; the message must name that path."""
    if case == "source-missing":
        return "source", tmp_path / "no_such_model"
    if case == "target-is-a-file":
        (tmp_path / "model.txt").write_text("not a folder")
        return "target", tmp_path / "model.txt"
    if case == "model-without-config":
        (tmp_path / "empty_model").mkdir()
        return "target", tmp_path / "empty_model"
    if case == "adapter-missing":
        return "adapter", tmp_path / "no_such_adapter"
    if case == "adapter-without-config":
        (tmp_path / "empty_adapter").mkdir()
        return "adapter", tmp_path / "empty_adapter"
    if case == "adapter-config-not-json":
        bad = tmp_path / "bad_adapter"
        shutil.copytree(env["adapter"], bad)
        (bad / "adapter_config.json").write_text("{not json")
        return "adapter", bad
    if case == "corpus-missing":
        return "corpus", tmp_path / "no_such_corpus.txt"
    if case == "corpus-is-a-folder":
        (tmp_path / "texts").mkdir()
        return "corpus", tmp_path / "texts"
    if case == "corpus-gzip-corrupted":
        (tmp_path / "corpus.txt.gz").write_bytes(gzip.compress(b"some text " * 200)[:40])
        return "corpus", tmp_path / "corpus.txt.gz"
    raise ValueError(case)


PATH_CASES = ["source-missing", "target-is-a-file", "model-without-config", "adapter-missing",
              "adapter-without-config", "adapter-config-not-json", "corpus-missing", "corpus-is-a-folder",
              "corpus-gzip-corrupted"]


@pytest.mark.parametrize("case", PATH_CASES)
def test_missing_or_unreadable_path_fails_before_loading(env, tmp_path, capsys, no_load, case):
    which, bad = _bad_path(env, tmp_path, case)
    out = tmp_path / "out"
    msg = _cli_error(_argv(env, out, **{which: bad}), capsys)
    assert str(bad) in msg
    assert not out.exists()
    _seen(case, msg)


def test_unreadable_files_fail_before_loading(env, tmp_path, capsys, monkeypatch, no_load):
    """Files without read permission. chmod 000 where it bites; as root (which reads any file) the
    same PermissionError is raised by the reads castlora makes."""
    corpus = tmp_path / "locked.txt"
    corpus.write_text("text")
    adapter = tmp_path / "locked_adapter"
    shutil.copytree(env["adapter"], adapter)
    locked = set()  # the file denied in the current case
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if as_root:
        real_bytes, real_text, real_open = Path.read_bytes, Path.read_text, __import__("safetensors").safe_open

        def deny(path):
            if Path(path) in locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))

        monkeypatch.setattr(Path, "read_bytes", lambda self: deny(self) or real_bytes(self))
        monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: deny(self) or real_text(self, *a, **k))
        monkeypatch.setattr("safetensors.safe_open", lambda path, *a, **k: deny(path) or real_open(path, *a, **k))
    cases = [("corpus", corpus, corpus), ("adapter", adapter, adapter / "adapter_config.json"),
             ("target", env["mistral"], env["mistral"] / "model.safetensors")]
    for which, arg, path in cases:
        if not as_root and which == "target":
            continue  # do not chmod the shared fixture
        locked = {path}
        if not as_root:
            path.chmod(0)
        try:
            msg = _cli_error(_argv(env, tmp_path / "out", **{which: arg}), capsys)
        finally:
            if not as_root:
                path.chmod(0o644)
        assert str(path) in msg and "Permission denied" in msg
        _seen(f"unreadable-{which}", msg)


# ------------------------------------------------------------------ adapter of another model


def test_adapter_of_another_model_names_modules_shapes_and_base(env, tmp_path, capsys):
    # Same module names, other shapes: a llama-family model with hidden 48 instead of 32.
    msg = _cli_error(_argv(env, tmp_path / "out", source=env["mistral"]), capsys)
    assert "does not fit this llama model (3 layers, hidden 48)" in msg
    assert "model.layers.0.self_attn.q_proj: adapter A (4, 32), B (32, 4) but the model's module maps 48 -> 48" in msg
    assert "model.layers.1.mlp.gate_proj: adapter A (4, 32), B (48, 4) but the model's module maps 48 -> 64" in msg
    assert f"base model {str(env['llama'])!r}: use that model as --source" in msg
    _seen("adapter-shape-mismatch", msg)
    # Module names the source does not have (a GPT-NeoX source): the same check, called directly.
    with pytest.raises(AdapterMismatchError) as ei:
        load_adapter(env["adapter"], model_sites(load_model(str(env["neox"]))))
    msg = str(ei.value)
    assert "model.layers.0.self_attn.q_proj: no such adaptable module in this gpt_neox model" in msg
    assert "model.layers.1.mlp.gate_proj" in msg and str(env["llama"]) in msg
    _seen("adapter-unknown-modules", msg)
    _assert_only(tmp_path)


# ------------------------------------------------------------------ architecture without a spec


def test_unsupported_architecture_lists_families_and_how_to_add(env, tmp_path, capsys, monkeypatch):
    bloom = tmp_path / "bloom"
    config = transformers.AutoConfig.for_model("bloom", hidden_size=32, n_layer=2, n_head=4, vocab_size=32000)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(bloom))
    assert "bloom" not in supported_model_types()
    loaded = load_model(str(bloom))  # a real, loadable architecture ...
    with pytest.raises(UnsupportedArchitectureError) as ei:  # ... that castlora has no spec for
        model_sites(loaded)
    assert isinstance(ei.value, CastloraError)

    with monkeypatch.context() as m:  # through translate/the CLI it fails before any model is loaded
        m.setattr(pair_mod, "load_model", lambda *a, **k: pytest.fail("model loaded"))
        msg = _cli_error(_argv(env, tmp_path / "out", target=bloom), capsys)
    assert f"target model {bloom}" in msg and "model_type 'bloom'" in msg
    assert "Supported: " + ", ".join(supported_model_types()) in msg
    assert "register_family" in msg and "docs/families.md" in msg
    _seen("unsupported-architecture", msg)


# ------------------------------------------------------------------ sites the target cannot host


def test_gate_maps_to_its_counterpart_up(env, tmp_path):
    assert ROLE_COUNTERPARTS["gate"] == "up"
    rec = _run(env, tmp_path / "out", target="gpt2").record
    gates = [s for s in rec["site_map"] if s["source"].endswith(".gate")]
    assert [s["target"] for s in gates] == ["0.up", "1.up"]
    assert all(s["target_module"].endswith("mlp.c_fc") and "counterpart 'up'" in s["note"] for s in gates)
    assert rec["dropped"] == []
    _seen("gate-to-up", gates[0]["note"])


@pytest.fixture
def mistral_without_v():
    """The target (model_type mistral) gets a family with no `v` role and no counterpart for it:
    registered for this test, then the built-in spec is restored."""
    original = family_for("mistral")
    sites = {r: s for r, s in original.sites.items() if r != "v"}
    register_family(FamilySpec(name="no_v", model_types=("mistral",), layers=original.layers, embed=original.embed,
                               final_norm=original.final_norm, sites=sites, norms=original.norms), replace=True)
    try:
        yield
    finally:
        register_family(original, replace=True)
    assert family_for("mistral") is original


def test_role_without_counterpart_is_refused_or_dropped_and_listed(env, tmp_path, capsys, mistral_without_v):
    assert "v" not in ROLE_COUNTERPARTS
    msg = _cli_error(_argv(env, tmp_path / "refused"), capsys)
    assert "cannot host the source's 'v' LoRA at layer 0 (model.layers.0.self_attn.v_proj)" in msg
    assert "--allow-drop" in msg
    _seen("role-refused", msg)
    assert not (tmp_path / "refused").exists()

    logs = []
    res = _run(env, tmp_path / "dropped", allow_drop=True, log=logs.append)
    rec = json.loads((tmp_path / "dropped" / "castlora.json").read_text())
    assert [d["source"] for d in rec["dropped"]] == ["0.v", "1.v"]
    assert all(d["reason"] == "target family no_v has no 'v' role" for d in rec["dropped"])
    assert sorted(s["source"] for s in rec["site_map"]) == ["0.gate", "0.q", "1.gate", "1.q"]
    assert res.record["dropped"] == rec["dropped"]
    assert [l for l in logs if l.startswith("dropped")] == [
        "dropped 0.v (model.layers.0.self_attn.v_proj): target family no_v has no 'v' role",
        "dropped 1.v (model.layers.1.self_attn.v_proj): target family no_v has no 'v' role"]
    targets = json.loads((tmp_path / "dropped" / "adapter_config.json").read_text())["target_modules"]
    assert not any("v_proj" in t for t in targets)
    _seen("role-dropped", logs[[l.startswith("dropped") for l in logs].index(True)])


# ------------------------------------------------------------------ pickles and remote code


class _Payload:
    """A pickle that would run code (create a marker file) when unpickled without weights_only."""

    marker: str = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickles_refused_by_default_and_never_executed(env, tmp_path, capsys, no_load):
    # adapter as a pickle
    adapter = tmp_path / "pickle_adapter"
    adapter.mkdir()
    shutil.copy(env["adapter"] / "adapter_config.json", adapter)
    torch.save(load_file(str(env["adapter"] / "adapter_model.safetensors")), adapter / "adapter_model.bin")
    msg = _cli_error(_argv(env, tmp_path / "out", adapter=adapter), capsys)
    assert str(adapter / "adapter_model.bin") in msg and "pickle" in msg and "--allow-pickle" in msg
    _seen("pickle-adapter", msg)

    # model weights as a pickle only
    model = tmp_path / "pickle_model"
    shutil.copytree(env["llama"], model)
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    msg = _cli_error(_argv(env, tmp_path / "out", source=model), capsys)
    assert str(model) in msg and "pytorch_model.bin" in msg and "--allow-pickle" in msg
    _seen("pickle-model", msg)
    assert not (tmp_path / "out").exists()

    # a malicious pickle runs nothing: refused without allow_pickle, and weights_only=True with it
    evil = tmp_path / "evil.bin"
    _Payload.marker = str(tmp_path / "pwned")
    torch.save({"w": _Payload()}, evil)
    with pytest.raises(UnsafeFileError, match="pickle file: loading it can execute arbitrary code"):
        load_tensors(evil)
    with pytest.raises(CastloraError, match="weights-only pickle") as ei:
        load_tensors(evil, allow_pickle=True)
    assert "never runs code" in str(ei.value) and "\x1b" not in str(ei.value)
    _seen("pickle-with-code", str(ei.value))
    assert not (tmp_path / "pwned").exists()


def test_pickles_load_with_allow_pickle(env, tmp_path):
    model = tmp_path / "pickle_model"
    shutil.copytree(env["llama"], model)
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    adapter = tmp_path / "pickle_adapter"
    adapter.mkdir()
    shutil.copy(env["adapter"] / "adapter_config.json", adapter)
    torch.save(load_file(str(env["adapter"] / "adapter_model.safetensors")), adapter / "adapter_model.bin")
    want = load_model(str(env["llama"]))
    got = load_model(str(model), allow_pickle=True)
    for (n, a), (_, b) in zip(want.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), n
    res = _run(env, tmp_path / "out", source=model, adapter=adapter, allow_pickle=True)
    assert res.record["config"]["allow_pickle"] is True and (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_trust_remote_code_off_unless_asked(env, tmp_path, monkeypatch):
    calls = []
    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tok = transformers.AutoTokenizer.from_pretrained

    def record(real, kind):
        def fake(*a, **k):
            calls.append((kind, k.get("trust_remote_code", "<not passed>")))
            return real(*a, **k)
        return fake

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record(real_model, "model"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record(real_tok, "tokenizer"))
    _run(env, tmp_path / "out")
    assert sorted(set(calls)) == [("model", False), ("tokenizer", False)]
    assert sum(kind == "model" for kind, _ in calls) == 2 and sum(kind == "tokenizer" for kind, _ in calls) == 2
    calls.clear()
    load_model(str(env["llama"]), trust_remote_code=True)
    load_tokenizer(str(env["llama"]), trust_remote_code=True)
    assert calls == [("model", True), ("tokenizer", True)]


# ------------------------------------------------------------------ truncated or corrupted safetensors


def _damage(path: Path, mode: str) -> None:
    data = path.read_bytes()
    if mode == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # corrupted header
        path.write_bytes(data[:8] + b"\x00garbage" + data[16:])


@pytest.mark.parametrize("mode", ["truncated", "corrupted"])
def test_damaged_safetensors_is_a_clear_error(env, tmp_path, capsys, monkeypatch, mode):
    adapter = tmp_path / "adapter"
    shutil.copytree(env["adapter"], adapter)
    _damage(adapter / "adapter_model.safetensors", mode)
    model = tmp_path / "model"
    shutil.copytree(env["llama"], model)
    _damage(model / "model.safetensors", mode)

    with monkeypatch.context() as m:
        m.setattr(pair_mod, "load_model", lambda *a, **k: pytest.fail("model loaded"))
        msg = _cli_error(_argv(env, tmp_path / "out", adapter=adapter), capsys)
        assert str(adapter / "adapter_model.safetensors") in msg and "truncated or corrupted" in msg
        _seen(f"adapter-{mode}", msg)
        msg = _cli_error(_argv(env, tmp_path / "out", source=model), capsys)
        assert str(model / "model.safetensors") in msg and "truncated or corrupted" in msg
        _seen(f"model-{mode}", msg)
    # load_model itself wraps whatever transformers/safetensors raise (here with the early check off)
    monkeypatch.setattr(models_mod, "check_model_path", lambda *a, **k: None)
    with pytest.raises(CastloraError) as ei:
        load_model(str(model))
    assert isinstance(ei.value.__cause__, SafetensorError)
    assert f"weights file {model / 'model.safetensors'} is truncated or corrupted" in str(ei.value)
    _seen(f"load_model-{mode}", str(ei.value))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ corpus problems


def test_corpus_empty_or_not_utf8_fails_before_loading(env, tmp_path, capsys, no_load):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n\n\n\n")
    msg = _cli_error(_argv(env, tmp_path / "out", corpus=empty), capsys)
    assert str(empty) in msg and "holds no text (0 non-empty documents)" in msg
    _seen("corpus-empty", msg)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.".encode("latin-1"))
    msg = _cli_error(_argv(env, tmp_path / "out", corpus=latin1), capsys)
    assert str(latin1) in msg and "is not UTF-8 text (bad byte at offset 3)" in msg
    _seen("corpus-not-utf8", msg)


def test_non_finite_delta_weight_fails_before_loading(env, tmp_path, capsys, no_load):
    # the command line refuses it while parsing (jsonargparse's float type does not take nan) ...
    msg = _cli_error(_argv(env, tmp_path / "out", extra=("--teacher", "delta", "--delta-weight", "nan")), capsys)
    assert re.search(r"delta[-_]weight", msg) and "nan" in msg
    # ... and the Python API in TranslateConfig's checks
    with pytest.raises(CastloraError, match="--delta-weight must be a finite number .*not nan"):
        _run(env, tmp_path / "out", teacher="delta", delta_weight=float("nan"))
    assert not (tmp_path / "out").exists()


def test_corpus_too_short_for_the_steps(env, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("\n\n\n".join(d[:300] for d in read_docs("data", "general", "valid.txt.gz", n=4)),
                     encoding="utf-8")
    with pytest.raises(CorpusError) as ei:
        _run(env, tmp_path / "out", corpus=[short], steps=50, generate=0)
    msg = str(ei.value)
    m = re.search(r"yields (\d+) training chunks of up to 32 source tokens \(2 more go to calibration\), and the "
                  r"100 general texts of the training stream would repeat it ([\d.]+) times, more than "
                  r"--max-epochs 4\. It needs at least 25 chunks", msg)
    assert m, msg
    n_chunks = int(m[1])
    assert 0 < n_chunks < 25
    assert float(m[2]) == pytest.approx(100 / n_chunks, abs=0.05)
    _seen("corpus-too-short", msg)
    _assert_only(tmp_path, "short.txt")


def test_corpus_without_common_boundaries(env, tmp_path):
    """Long rules of dashes and equals signs: Llama cuts them into 16-character pieces, GPT-NeoX
    into 64-character ones, so few positions end a token on both sides."""
    odd = tmp_path / "rules.txt"
    odd.write_text("\n\n\n".join(("-" * 100 + " " + "=" * 100 + " ") * 20 for _ in range(8)), encoding="utf-8")
    with pytest.raises(CorpusError) as ei:
        _run(env, tmp_path / "out", target="neox", corpus=[odd])
    msg = str(ei.value)
    m = re.search(r"only ([\d.]+)% of source positions align with the target tokenizer \((\d+) of (\d+)\); "
                  r"castlora needs at least 20%", msg)
    assert m, msg
    assert float(m[1]) < 20 and int(m[3]) > 0
    _seen("corpus-no-alignment", msg)


# ------------------------------------------------------------------ existing output, atomic output


def test_existing_output_is_refused_unless_overwrite(env, tmp_path, capsys, no_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    msg = _cli_error(_argv(env, out), capsys)
    assert f"output folder {out} already exists" in msg and "--overwrite" in msg
    assert (out / "keep.txt").read_text() == "precious"
    _seen("out-exists", msg)


class SimulatedCrash(RuntimeError):
    pass


def _crashing_export(real):
    def export(target, factors, tmp, *a, **k):
        real(target, factors, tmp, *a, **k)  # the adapter files are written ...
        (Path(tmp) / "partial.bin").write_bytes(b"half")
        raise SimulatedCrash("crash in the middle of the export")  # ... then the process fails
    return export


def test_crash_during_export_leaves_no_partial_output(env, tmp_path, monkeypatch):
    parent = tmp_path / "runs"
    monkeypatch.setattr(export_mod, "export_peft", _crashing_export(export_mod.export_peft))
    with pytest.raises(SimulatedCrash):
        _run(env, parent / "out")
    assert not (parent / "out").exists()
    _assert_only(parent)  # no .out.tmp-* folder left beside it


def test_atomic_folder_unit(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out) as tmp:
            (tmp / "a").write_text("a")
            raise KeyboardInterrupt
    _assert_only(tmp_path)
    with atomic_folder(out) as tmp:
        (tmp / "a").write_text("a")
    assert (out / "a").read_text() == "a"
    _assert_only(tmp_path, "x")
    # an existing output replaced with overwrite=True: a failure keeps the old one whole
    with pytest.raises(SimulatedCrash):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "b").write_text("b")
            raise SimulatedCrash("crash while replacing")
    assert [p.name for p in out.iterdir()] == ["a"]
    _assert_only(tmp_path, "x")
    # a full disk as safetensors reports it (its own exception type, the OS error in the text)
    with pytest.raises(CastloraError, match=f"disk full while writing {out}: .*it was left as it was"):
        with atomic_folder(out, overwrite=True):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
    assert [p.name for p in out.iterdir()] == ["a"]
    _assert_only(tmp_path, "x")


# ------------------------------------------------------------------ disk full


def test_disk_full_while_writing_output(env, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "runs"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cast_mod, "save_file", full)  # heads.safetensors, after the adapter files
    msg = _cli_error(_argv(env, parent / "out"), capsys)
    assert f"disk full while writing {parent / 'out'}" in msg and f"Nothing was written to {parent / 'out'}" in msg
    assert "free some space" in msg
    _seen("disk-full", msg)
    _assert_only(parent)  # (test_atomic_folder_unit: the same with safetensors' own exception type)


def test_disk_full_while_writing_a_checkpoint(env, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(train_mod, "save_file", full)
    with pytest.raises(CastloraError) as ei:
        _run(env, tmp_path / "out", **{**KILL, "steps": 3})
    msg = str(ei.value)
    assert "disk full while writing the checkpoint of step 2" in msg and "--resume" in msg
    _seen("disk-full-checkpoint", msg)
    work = tmp_path / ".out.castlora-work"
    assert not (tmp_path / "out").exists() and not (work / "checkpoint.tmp").exists()


# ------------------------------------------------------------------ NaN / Inf


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "full"
    _run(env, out, **KILL)
    return out


def _assert_same_heads(a_dir: Path, b_dir: Path) -> None:
    for name in ("heads.safetensors", "adapter_model.safetensors"):
        a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("part, bad_step, value", [("kl", 3, float("nan")), ("mse", 1, float("inf"))])
def test_nonfinite_loss_stops_and_resume_continues(env, uninterrupted, tmp_path, monkeypatch, part, bad_step, value):
    real = train_mod.cast_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        loss, kl, mse = real(*a, **k)
        if k.get("teacher_out") is not None:  # the held-out checks (start scale, start and end KL), not a step
            return loss, kl, mse
        calls["n"] += 1
        if calls["n"] == bad_step + 1:
            kl, mse = (kl * value, mse) if part == "kl" else (kl, mse * value)
        return loss, kl, mse

    out = tmp_path / "out"
    monkeypatch.setattr(train_mod, "cast_loss", poisoned)
    with pytest.raises(TrainingDiverged) as ei:
        _run(env, out, **KILL)
    msg = str(ei.value)
    assert f"the {part} loss became {value} at step {bad_step}; the heads were not updated" in msg
    work = tmp_path / ".out.castlora-work"
    if bad_step >= KILL["checkpoint_every"]:
        assert f"The last good checkpoint is in {work / 'checkpoint'}: rerun with --resume" in msg
        assert json.loads((work / "checkpoint" / "state.json").read_text())["step"] == 2
    else:
        assert "No checkpoint was saved before it" in msg and not (work / "checkpoint").exists()
    assert not out.exists()
    _seen(f"diverged-{part}", msg)
    if part == "kl":  # resume from the last good checkpoint: the heads of an uninterrupted run
        monkeypatch.setattr(train_mod, "cast_loss", real)
        # and as if a kill had fallen between the two renames of a checkpoint swap: only .old is left
        (work / "checkpoint").rename(work / "checkpoint.old")
        rec = _run(env, out, resume=True, **KILL).record
        assert [r["step"] for r in rec["loss_curve"]] == list(range(1, KILL["steps"] + 1))
        _assert_same_heads(uninterrupted, out)
        _assert_only(tmp_path, "out")


# ------------------------------------------------------------------ killed (real processes)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_process_resumes_to_the_same_heads(env, uninterrupted, tmp_path, capsys, sig):
    out = tmp_path / "out"
    argv = _argv(env, out, extra=[f"--{k.replace('_', '-')}={v}" for k, v in KILL.items()])
    proc_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1"}
    ckpt = tmp_path / ".out.castlora-work" / "checkpoint"
    with open(tmp_path / "stderr.txt", "wb") as err:
        # A shell's background job (`bash .ci/run &`) starts with SIGINT ignored, and Python then keeps it
        # ignored (no KeyboardInterrupt): the child gets the default disposition, as from a terminal.
        proc = subprocess.Popen([sys.executable, "-m", "castlora.cli", *argv], env=proc_env, stdout=err,
                                stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 300
            while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)  # the first checkpoint (step 2) appears; 6 more steps remain
            assert proc.poll() is None and ckpt.exists(), \
                f"the run ended or stalled before it could be interrupted:\n{(tmp_path / 'stderr.txt').read_text()}"
            os.kill(proc.pid, sig)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:  # only if the test failed above: never leave the run behind
                proc.kill()
                proc.wait()
    log = (tmp_path / "stderr.txt").read_text()
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
    else:
        assert rc == 130, log
        assert "castlora: interrupted; rerun with --resume to continue from the last checkpoint" in log
        assert "Traceback" not in log
    assert not out.exists()
    # (`checkpoint.old` only if the kill fell between the two renames of a checkpoint swap)
    kept = ckpt if ckpt.exists() else ckpt.with_name("checkpoint.old")
    step = json.loads((kept / "state.json").read_text())["step"]
    assert 2 <= step < KILL["steps"]
    _seen(f"killed-{sig.name}", f"exit code {rc}, checkpoint at step {step}")

    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0, capsys.readouterr().err
    _assert_same_heads(uninterrupted, out)
    rec = json.loads((out / "castlora.json").read_text())
    assert [r["step"] for r in rec["loss_curve"]] == list(range(1, KILL["steps"] + 1))
    _assert_only(tmp_path, "out", "stderr.txt")
