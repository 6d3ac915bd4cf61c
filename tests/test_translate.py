"""The port end to end: runtime CAST wrapper == source LoRA (identity heads, same model) == exported
PEFT adapter; wrapper == exported adapter on other targets; `castlora.translate` on model folders
(KL falls, the folder loads in plain peft, CAST-0, delta teacher, resume, overwrite)."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_lora as _make_lora
from conftest import make_tiny, read_docs, shared_path
from conftest import model_folder as _model_folder
from conftest import ports_for as _ports
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

import castlora
from castlora.adapters import load_adapter
from castlora.cast_module import PortedKernel, attached
from castlora.capture import capture
from castlora.closed_form import closed_form_init, fit_closed_form, port_groups, random_init
from castlora.errors import CastloraError, CorpusError
from castlora.export import export_peft, module_factors
from castlora.families import model_sites
from castlora.config import TranslateConfig
from castlora.generate import greedy_answers
from castlora.losses import kl_divergence, shared_log_probs
from castlora.models import load_model, load_tokenizer
from castlora.site_map import map_sites, proportional_layer_map
from castlora.tokens import encode_pair, shared_vocab
from castlora.pair import ModelPair
from castlora.teachers import make_teacher
from castlora.corpus import read_corpus, read_prompts
from castlora.teacher_choice import MIN_STRENGTH_CHARS, STRENGTH_CHARS, strength_budget, strength_texts

# `castlora.translate` is the function (re-exported by the package); the module is this:
translate_mod = importlib.import_module("castlora.translate")
cast_mod = importlib.import_module("castlora.transfers.cast")
pair_mod = importlib.import_module("castlora.pair")
texts_mod = importlib.import_module("castlora.texts")
QUIET = dict(progress=False, log=lambda *a, **k: None)


def _ids(vocab, batch=2, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_keys_match_file(peft_model, folder):
    """The exported file holds exactly the keys peft expects for this target: none missing or extra."""
    file_keys = set(load_file(str(Path(folder) / "adapter_model.safetensors")))
    model_keys = set(get_peft_model_state_dict(peft_model))
    assert file_keys == model_keys
    assert file_keys and all("lora_A" in k or "lora_B" in k for k in file_keys)


# --------------------------------------------------- a. same model, identity heads


SAME_MODEL_CASES = {
    "llama": dict(targets=["q_proj", "v_proj"], kw={}),
    "gpt_neox": dict(targets=["query_key_value"], kw={}),
    "gpt2": dict(targets=["c_attn"], kw={"fan_in_fan_out": True}),
}


@pytest.mark.parametrize("model_type", sorted(SAME_MODEL_CASES))
def test_identity_heads_reproduce_source_lora_and_export(model_type, tmp_path):
    case = SAME_MODEL_CASES[model_type]
    src = _make_lora(make_tiny(model_type, 0), case["targets"], **case["kw"])
    src.save_pretrained(str(tmp_path / "src_adapter"))
    ids = _ids(128)
    want = _logits(src, ids)

    target = make_tiny(model_type, 0)
    base_logits = _logits(target, ids)
    assert (want - base_logits).abs().max() > 1e-2  # the LoRA does change the output

    t_sites = model_sites(target)
    lora = load_adapter(tmp_path / "src_adapter", model_sites(src))
    ports = _ports(lora.kernels, t_sites, list(range(t_sites.num_layers)))
    for port, _ in ports:
        port.set_identity()
    with attached(target, ports):
        got = _logits(target, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # detached again: the original modules are back
    torch.testing.assert_close(_logits(target, ids), base_logits)

    factors, errors = module_factors(ports)
    assert all(e == 0.0 for e in errors.values())
    out = tmp_path / "exported"
    export_peft(make_tiny(model_type, 0), factors, out, t_sites.family.transposed)
    loaded = PeftModel.from_pretrained(make_tiny(model_type, 0), str(out)).eval()
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=1e-4, atol=1e-4)
    _assert_keys_match_file(loaded, out)


# --------------------------------------------------- b./c. other target, random heads


@pytest.mark.parametrize("target_type", ["mistral", "gpt_neox"])
def test_runtime_wrapper_equals_exported_adapter(target_type, tmp_path):
    src = _make_lora(make_tiny("llama", 0), ["q_proj", "v_proj"])
    src.save_pretrained(str(tmp_path / "src_adapter"))
    lora = load_adapter(tmp_path / "src_adapter", model_sites(src))
    target = make_tiny(target_type, 1)
    t_sites = model_sites(target)
    ports = _ports(lora.kernels, t_sites, proportional_layer_map(2, t_sites.num_layers))
    random_init(ports, seed=3)
    ids = _ids(128, seed=1)
    base = _logits(target, ids)
    with attached(target, ports):
        want = _logits(target, ids)
    assert (want - base).abs().max() > 1e-2

    factors, _ = module_factors(ports)
    if target_type == "gpt_neox":  # q and v both land in query_key_value: one module, rank 4 + 4
        assert sorted(factors) == [f"gpt_neox.layers.{i}.attention.query_key_value" for i in range(2)]
        assert all(A.shape[0] == 8 for A, _ in factors.values())
    out = tmp_path / "exported"
    name = tmp_path / "target_folder"  # a local name: peft looks up its config.json when saving
    target.config.save_pretrained(str(name))
    returned = export_peft(make_tiny(target_type, 1), factors, out, t_sites.family.transposed,
                           base_model_name=str(name))
    assert not isinstance(returned, PeftModel)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(name)

    loaded = PeftModel.from_pretrained(make_tiny(target_type, 1), str(out)).eval()
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=1e-4, atol=1e-4)
    _assert_keys_match_file(loaded, out)

    # c. loading the state dict by hand reports nothing unexpected and no LoRA key missing
    fresh = get_peft_model(make_tiny(target_type, 1),
                           LoraConfig.from_pretrained(str(out)))
    res = set_peft_model_state_dict(fresh, load_file(str(out / "adapter_model.safetensors")))
    assert list(res.unexpected_keys) == []
    assert [k for k in res.missing_keys if "lora_" in k] == []
    torch.testing.assert_close(_logits(fresh.eval(), ids), want, rtol=1e-4, atol=1e-4)


def test_mlp_heads_export_fits_every_real_position_of_every_batch(tmp_path):
    """Non-linear heads are exported by a rank-r fit over all calibration batches, at the real target
    positions only (not the padding), streamed: the same A, B and error as the fit on those positions
    gathered by hand; and the same in groups of one port (a budget of one byte) as in one pass."""
    from castlora.export import delta_fits, port_factors
    from castlora.heads import reduced_rank_fit
    from castlora.tokens import PairBatch
    src = _make_lora(make_tiny("llama", 0), ["q_proj", "v_proj"])
    src.save_pretrained(str(tmp_path / "src_adapter"))
    lora = load_adapter(tmp_path / "src_adapter", model_sites(src))
    target = make_tiny("mistral", 1)
    t_sites = model_sites(target)
    pairs, _ = map_sites(lora.kernels, t_sites, proportional_layer_map(2, t_sites.num_layers))
    ports = [(PortedKernel(p.kernel, p.target, "mlp"), p.target) for p in pairs]
    random_init(ports, seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for port, _ in ports:
            for head in (port.p_in, port.p_out):
                head.w2.copy_(torch.randn(head.w2.shape, generator=g) * 0.3)  # a real non-linear branch
    assert ports[0][0].p_out.w1.shape[0] == 4 * ports[0][0].rank  # hidden: four times the narrow side
    batches = []
    for seed in (1, 2):
        ids = _ids(128, batch=2, seq=10, seed=seed)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
        pos = torch.arange(10).expand(2, -1)
        batches.append(PairBatch(ids, mask, ids, mask, pos, pos, mask.bool()))
    with attached(target, ports):
        factors, errors = module_factors(ports, target, batches)
        grouped, _ = module_factors(ports, target, batches, budget=1)
        fits = delta_fits(ports, target, batches)
        xs = {s.path: [] for _, s in ports}
        for b in batches:
            with torch.no_grad(), capture(target, inputs=list(xs)) as ct:
                target(input_ids=b.ids_t, attention_mask=b.mask_t)
            for path in xs:
                xs[path].append(ct.inputs[path][b.mask_t.bool()])
    assert fits[0].g[0][0, 0] > 0 and sum(len(x) for x in xs[ports[0][1].path]) == 2 * (20 - 3)
    for (port, site), fit in zip(ports, fits):
        X = torch.cat(xs[site.path])
        with torch.no_grad():
            want = reduced_rank_fit(X, port(X), port.rank)
        got = port_factors(port, fit)
        for a, b in zip(got[:2], want[:2]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert got[2] == pytest.approx(want[2], rel=1e-6, abs=1e-9) and 1e-6 < got[2] < 1
        assert errors[f"{port.source_key}->{port.target_key}"] == pytest.approx(got[2])
    for path, (A, B) in factors.items():
        torch.testing.assert_close(grouped[path][0], A)
        torch.testing.assert_close(grouped[path][1], B)
    with pytest.raises(ValueError, match="non-linear heads need target activations"):
        module_factors(ports)


# --------------------------------------------------- model folders for translate()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("translate")
    llama = _model_folder(root / "llama", "llama", 32000, shared_path("zoo", "llama"), 0)
    neox = _model_folder(root / "neox", "gpt_neox", 50304, shared_path("zoo", "neox"), 1)
    src = load_model(str(llama))
    pm = _make_lora(src, ["q_proj", "v_proj"], seed=0, std=0.5)
    pm.peft_config["default"].base_model_name_or_path = str(llama)
    pm.save_pretrained(str(root / "adapter"))
    zero = get_peft_model(load_model(str(llama)), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    zero.save_pretrained(str(root / "zero_adapter"))  # default init: lora_B == 0
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n\n".join(read_docs("data", "general", "valid.txt.gz", n=200)), encoding="utf-8")
    return dict(root=root, llama=llama, neox=neox, adapter=root / "adapter", zero=root / "zero_adapter",
                corpus=corpus)


def _run(folders, out, **kw):
    # Cheap settings: the real tokenizers' 32000 / 50304-way logits dominate each step on CPU.
    opts = dict(steps=0, batch_size=2, seq_len=32, calib_batches=1, **QUIET)
    opts.update(kw)
    return castlora.translate(source=str(folders["llama"]), adapter=str(folders["adapter"]),
                              target=str(folders["neox"]), corpus=[str(folders["corpus"])], out=str(out), **opts)


# --------------------------------------------------- d. end to end


def test_translate_end_to_end_llama_to_neox(folders, tmp_path):
    parent = tmp_path / "runs"
    out = parent / "port"
    # lr 3e-2: on these random tiny models the KL moves less than its batch-to-batch noise (~0.003)
    # in 25 steps at 5e-3; at 3e-2 it falls by ~0.02.
    res = _run(folders, out, steps=25, batch_size=4, seq_len=64, lr=3e-2, calib_batches=2)
    assert res.out == out
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "heads.safetensors", "castlora.json"} <= names
    assert [p.name for p in parent.iterdir()] == ["port"]  # no temporary or work folder left beside it

    rec = json.loads((out / "castlora.json").read_text())
    for key in ("site_map", "config", "loss_curve", "corpus_tokens_seen", "wall_seconds", "castlora_version"):
        assert key in rec
    assert rec["castlora_version"] == castlora.__version__
    assert rec["config"]["steps"] == 25 and rec["config"]["teacher"] == "auto"
    assert rec["teacher"]["teacher"] in ("source", "blend") and rec["teacher"]["texts"] > 0
    assert rec["teacher"]["measured_on"] == "corpus"  # no --strength-corpus: documents of --corpus
    assert [s["source"] for s in rec["site_map"]] == ["0.q", "0.v", "1.q", "1.v"]
    assert all(s["target_module"].endswith("attention.query_key_value") for s in rec["site_map"])
    assert rec["corpus_tokens_seen"] > 25 * 4 * 16
    assert rec["wall_seconds"] > 0
    curve = [r["kl"] for r in rec["loss_curve"]]
    assert len(curve) == 25 and all(k >= 0 for k in curve)
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first, curve

    target = load_model(str(folders["neox"]))
    ids = _ids(50304, seed=2)
    base = _logits(target, ids)
    loaded = PeftModel.from_pretrained(target, str(out)).eval()
    ported = _logits(loaded, ids)
    assert torch.isfinite(ported).all()
    assert (ported - base).abs().max() > 1e-4
    _assert_keys_match_file(loaded, out)
    heads = load_file(str(out / "heads.safetensors"))
    assert any(k.startswith("0.q->0.q.") for k in heads)


def test_translate_cast0_and_delta_teacher(folders, tmp_path):
    out0 = tmp_path / "cast0"
    res = _run(folders, out0, steps=0)
    rec = res.record
    assert rec["loss_curve"] == [] and rec["corpus_tokens_seen"] == 0
    assert rec["init"]["calibration_positions"] > 0
    loaded = PeftModel.from_pretrained(load_model(str(folders["neox"])), str(out0))
    _assert_keys_match_file(loaded, out0)

    outd = tmp_path / "delta"
    res = _run(folders, outd, steps=2, teacher="delta", beta=0.0)
    curve = res.record["loss_curve"]
    assert res.record["config"]["teacher"] == "delta"
    assert len(curve) == 2 and all(r["kl"] >= 0 and r["mse"] == 0.0 for r in curve)
    assert (outd / "adapter_model.safetensors").is_file()

    outm = tmp_path / "mlp"  # MLP heads: trained, then exported by a rank-r fit on the calibration text
    res = _run(folders, outm, steps=2, head="mlp")
    errors = res.record["export_fit_error"]
    assert errors and all(0 <= e < 1 for e in errors.values())
    loaded = PeftModel.from_pretrained(load_model(str(folders["neox"])), str(outm))
    _assert_keys_match_file(loaded, outm)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cast0", "delta", "mlp"]


def test_linear_cka_is_the_kernel_alignment_and_ignores_rotation_and_scale():
    from castlora.site_map import linear_cka
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(5, 7, generator=g, dtype=torch.float64) + 0.5 * torch.randn(60, 7, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    assert linear_cka(X, X) == pytest.approx(1.0)
    assert linear_cka(X, 3.0 * Y @ Q + 2.0) == pytest.approx(linear_cka(X, Y))  # rotation, scale, shift
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Kx, Ky = Xc @ Xc.t(), Yc @ Yc.t()  # CKA's definition over the positions' Gram matrices
    assert linear_cka(X, Y) == pytest.approx(float((Kx * Ky).sum() / (Kx.norm() * Ky.norm())))
    assert 0.1 < linear_cka(X, Y) < 0.99
    assert linear_cka(X, torch.randn(60, 7, generator=g, dtype=torch.float64)) < 0.5


def test_the_cka_layer_map_is_the_best_monotone_alignment():
    from castlora.site_map import monotone_layer_map
    # 3 source layers, 4 target layers; each row's own best (3, 0, 3) is not monotone
    sim = [[0.1, 0.2, 0.3, 0.9], [0.8, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.9]]
    best = max(((a, b, c) for a in range(4) for b in range(a, 4) for c in range(b, 4)),
               key=lambda m: sum(sim[i][j] for i, j in enumerate(m)))
    assert tuple(monotone_layer_map(sim)) == best == (3, 3, 3)
    sim[1][3], sim[0][0] = 0.0, 0.2  # now (0, 0, 3) sums 1.9 against (3, 3, 3)'s 1.8
    assert monotone_layer_map(sim) == [0, 0, 3]
    assert monotone_layer_map([[0.5, 0.1], [0.1, 0.5]]) == [0, 1]


def test_translate_with_the_cka_layer_map(folders, tmp_path):
    """--layer-map cka: the similarity of every layer pair on the calibration batches is recorded, the
    map is its best monotone alignment, and the positions compared are capped (evenly spaced)."""
    from castlora.site_map import monotone_layer_map, residual_streams
    res = _run(folders, tmp_path / "cka", steps=0, layer_map="cka", calib_batches=2)
    rec = res.record
    sim = rec["cka"]
    assert rec["layer_map_kind"] == "cka" and len(sim) == 2 and all(len(row) == 2 for row in sim)
    assert all(0 < v <= 1.0001 for row in sim for v in row)
    assert rec["layer_map"] == monotone_layer_map(sim) == sorted(rec["layer_map"])
    # the cap: 8 positions at most, 4 from each of two batches
    src = load_model(str(folders["llama"]))
    pm = PeftModel.from_pretrained(src, str(folders["adapter"])).eval()
    tgt = load_model(str(folders["neox"]))
    tok_s, tok_t = load_tokenizer(str(folders["llama"])), load_tokenizer(str(folders["neox"]))
    texts = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"]
    batches = [encode_pair(texts, tok_s, tok_t, 16, 24)] * 2
    s_sites, t_sites = model_sites(pm.base_model.model), model_sites(tgt)
    full = residual_streams(pm, pm.base_model.model, tgt, s_sites.layer_paths, t_sites.layer_paths, batches)
    capped = residual_streams(pm, pm.base_model.model, tgt, s_sites.layer_paths, t_sites.layer_paths, batches, 8)
    n = batches[0].num_aligned
    assert n > 4 and full[0][0].shape[0] == 2 * n and capped[0][0].shape[0] == capped[1][0].shape[0] == 8
    torch.testing.assert_close(capped[0][0][0], full[0][0][0])  # the first position is kept


def test_default_stream_is_all_generated_and_bad_sampling_options_fail(folders, tmp_path):
    # by default every training text is sampled from source+LoRA; the calibration batch stays general text
    rec = _run(folders, tmp_path / "all", steps=2).record
    assert rec["config"]["generate"] == 2 * 2 and rec["generated_texts"] == 2 * 2  # the whole 2 x 2 stream
    for bad, why in ((dict(top_k=-1), "--top-k must be >= 0"), (dict(generate=-1), "--generate must be >= 0 or auto"),
                     (dict(steps=-1), "--steps must be >= 0 or auto")):
        with pytest.raises(CastloraError, match=why):
            _run(folders, tmp_path / "bad", **{"steps": 2, **bad})
    assert not (tmp_path / "bad").exists()
    # no top-k: the run records it and still generates the whole stream
    rec = _run(folders, tmp_path / "short", steps=2, top_k=0).record
    assert rec["config"]["top_k"] == 0 and rec["generated_texts"] == 4

def test_prompts_start_every_generated_text_and_their_answers_are_never_read(folders, tmp_path, monkeypatch):
    # --prompts: each generated text is sampled from a whole task prompt (not a general document's start);
    # a completion beside it in the file never reaches the sampler, and the record says the port saw task data
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Greet Ka{'lo' * i}ren ->", "completion": " Hello, SECRETANSWER!"} for i in range(3)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_prompts([str(prompts)]) == [r["prompt"] for r in rows]
    seen = {}
    real = texts_mod.sample_texts

    def spy(model, tok, given, n, **kw):
        seen.update(prompts=list(given), prompt_tokens=kw["prompt_tokens"])
        return real(model, tok, given, n, **kw)

    monkeypatch.setattr(texts_mod, "sample_texts", spy)
    lines = []
    rec = _run(folders, tmp_path / "port", steps=2, prompts=[str(prompts)],
               log=lambda *a, **k: lines.append(" ".join(map(str, a)))).record
    assert seen["prompts"] == [r["prompt"] for r in rows] and seen["prompt_tokens"] == 32  # whole, up to --seq-len
    assert rec["task_prompts"] == 3 and rec["generated_texts"] == 4 and rec["config"]["prompts"] == [str(prompts)]
    # the start and the end are judged on more samples from the prompts, held out of training, not on general text
    assert rec["held_out_generated"] == 2 and rec["held_out_kl"]["text"] == "samples from --prompts"
    assert any("not data-free" in line for line in lines), lines
    # --init auto and --lr auto mean the prompts recipe (zero-delta, 3e-3), recorded as used; given ones are kept
    assert (rec["config"]["init"], rec["config"]["lr"]) == ("zero-delta", 3e-3) and rec["init"]["zero_output_heads"]
    assert any("--lr auto with --prompts: 0.003" in line for line in lines), lines
    assert any("--transfer labels" in line and "ported better" in line for line in lines), lines  # the hint
    rec = _run(folders, tmp_path / "given", steps=2, prompts=[str(prompts)], init="scaled", lr=1e-2).record
    assert (rec["config"]["init"], rec["config"]["lr"]) == ("scaled", 1e-2)
    for bad, why in ((dict(prompts=[str(tmp_path / "missing.jsonl")]), "prompts file .*missing.jsonl does not exist"),
                     (dict(lr=0.0), "--lr must be a number > 0 or auto"),
                     (dict(lr=float("nan")), "--lr must be a number > 0"),
                     (dict(prompts=[str(prompts)], steps=0), "samples nothing"),
                     (dict(prompts=[str(prompts)], generate=0), "samples nothing")):
        with pytest.raises(CastloraError, match=why):
            _run(folders, tmp_path / "bad", **{"steps": 2, **bad})
    assert not (tmp_path / "bad").exists()
    unlabelled = tmp_path / "bare.jsonl"
    unlabelled.write_text(json.dumps({"answer": "x"}) + "\n")
    with pytest.raises(CorpusError, match="neither a 'prompt' nor a 'text' field"):
        read_prompts([str(unlabelled)])


def test_labels_train_the_target_on_the_sources_own_answers_to_the_prompts(folders, tmp_path):
    # --transfer labels: the source with its LoRA answers each prompt (greedy), the answers (not the file's
    # completions) become the completions of an ordinary LoRA on the target, of the source LoRA's shape
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Greet Ka{'lo' * i}ren ->", "completion": " SECRETANSWER"} for i in range(3)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [*rows, rows[0]]))  # a repeated prompt: answered once
    out = tmp_path / "labels_port"
    lines = []
    rec = castlora.translate(source=str(folders["llama"]), adapter=str(folders["adapter"]), target=str(folders["neox"]),
                             out=str(out), transfer="labels", prompts=[str(prompts)], steps=2, batch_size=2,
                             seq_len=16, progress=False, log=lambda *a, **k: lines.append(" ".join(map(str, a)))).record
    src = PeftModel.from_pretrained(load_model(str(folders["llama"])), str(folders["adapter"])).eval()
    want = greedy_answers(src, load_tokenizer(str(folders["llama"])), [r["prompt"] for r in rows], max_new_tokens=16)
    labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["completion"]) for r in labels] == [(r["prompt"], a) for r, a in zip(rows, want) if a.strip()]
    assert "SECRETANSWER" not in (out / "labels.jsonl").read_text()
    assert rec["transfer"] == "labels" and rec["config"]["lr"] == 5e-3  # lr auto
    assert (rec["task_prompts"], rec["labels"]["distinct_prompts"]) == (4, 3)
    assert any("not data-free" in line for line in lines), lines
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)  # the source LoRA's rank and alpha, on neox's fused q, v
    assert sorted(cfg["target_modules"]) == [f"gpt_neox.layers.{i}.attention.query_key_value" for i in range(2)]
    tgt = PeftModel.from_pretrained(load_model(str(folders["neox"])), str(out))
    assert any(v.abs().max() > 0 for k, v in get_peft_model_state_dict(tgt).items() if "lora_B" in k)  # it trained
    for bad, why in ((dict(), "give them as --prompts FILE"), (dict(prompts=[str(prompts)], steps=0), "--steps >= 1 \\(or auto\\)"),
                      (dict(prompts=[str(prompts)], device_map="auto"), "drop --device-map")):
        with pytest.raises(CastloraError, match=why):
            castlora.translate(source=str(folders["llama"]), adapter=str(folders["adapter"]), target=str(folders["neox"]),
                               out=str(tmp_path / "bad"), transfer="labels", **{"steps": 2, **bad}, **QUIET)
    assert not (tmp_path / "bad").exists()


def test_auto_steps_init_and_lr_per_transfer():
    # auto resolves to what was measured for each kind of port; values given are kept; the config given is not
    # changed (resolved returns a copy)
    for opts, want in ((dict(), (300, "scaled", 3e-2)), (dict(steps=0), (0, "closed-form", 3e-2)),
                       (dict(prompts=["p.jsonl"]), (300, "zero-delta", 3e-3)),
                       (dict(prompts=["p.jsonl"], transfer="labels"), (800, "zero-delta", 5e-3)),
                       (dict(prompts=["p.jsonl"], transfer="labels", steps=50, lr=1e-3), (50, "zero-delta", 1e-3))):
        cfg = TranslateConfig(**{"corpus": ["c.txt"], **opts})
        done = cfg.resolved()
        assert (done.steps, done.init, done.lr) == want, opts
        assert cfg.steps in ("auto", 50, 0) and cfg.init == "auto"
    # weight-space trains nothing and samples no text
    done = TranslateConfig(transfer="weight-space").resolved()
    assert (done.steps, done.generate) == (0, 0)


def test_greedy_answers_batched_as_one_at_a_time(folders):
    # left padding: a batch of prompts of different lengths gets the answers each prompt gets alone
    model, tok = load_model(str(folders["llama"])), load_tokenizer(str(folders["llama"]))
    prompts = ["Greet Ka ->", "Greet Kalolololoren, the third ->", "Hello"]
    together = greedy_answers(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert together == [greedy_answers(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert all(tok.decode(tok(p + a)["input_ids"], skip_special_tokens=True).startswith(p) for p, a in zip(prompts, together))


def test_generate_batch_size_auto_on_cpu_explicit_and_bad(folders, tmp_path):
    # 0 (auto) samples 16 texts at a time on the CPU; an explicit size is used and recorded, and the
    # stream still holds every text it asked for
    rec = _run(folders, tmp_path / "auto", steps=2).record
    assert rec["config"]["generate_batch_size"] == 16 and rec["generate_batch_size"] == 16  # the record: resolved
    assert (rec["config"]["init"], rec["config"]["lr"]) == ("scaled", 3e-2)  # auto without --prompts
    assert TranslateConfig().steps == "auto" and _run(folders, tmp_path / "zero", steps=0).record["config"]["init"] == "closed-form"
    rec = _run(folders, tmp_path / "one", steps=2, generate_batch_size=1).record
    assert rec["generate_batch_size"] == 1 and rec["generated_texts"] == 4
    with pytest.raises(CastloraError, match="--generate-batch-size must be >= 1 or auto"):
        _run(folders, tmp_path / "bad", steps=2, generate_batch_size=-1)
    assert not (tmp_path / "bad").exists()


def test_unaligned_positions_are_the_real_ones_no_source_position_matches():
    tok_s, tok_t = load_tokenizer(str(shared_path("zoo", "neox"))), load_tokenizer(str(shared_path("zoo", "llama")))
    batch = encode_pair(["The unbelievably tintinnabulating bells of Westminster.", "Hi."], tok_s, tok_t, 32, 48)
    real, aligned = batch.target_positions()
    for b in range(2):
        n_t = int(batch.mask_t[b].sum())
        assert real[b].tolist() == [True] * (n_t - 1) + [False] * (real.shape[1] - n_t + 1)
        assert sorted(torch.nonzero(aligned[b]).flatten().tolist()) == \
            sorted(p for p, m in zip(batch.pos_t[b].tolist(), batch.pos_mask[b].tolist()) if m and p < n_t - 1)
    assert (real & ~aligned)[0].any()  # llama splits the rare words differently from neox


def test_backoff_lowers_the_lr_of_a_diverging_run(folders, tmp_path):
    # lr 1 on the heads makes the KL climb within a few steps on the tiny models
    runs = {b: _run(folders, tmp_path / f"b{b}", steps=12, lr=1.0, backoff=b).record["loss_curve"] for b in (0.0, 0.1)}
    assert not any(r.get("backed_off") for r in runs[0.0])
    offs = [r["step"] for r in runs[0.1] if r.get("backed_off")]
    assert offs, [r["kl"] for r in runs[0.1]]
    first = offs[0] - 1
    assert runs[0.1][first]["lr"] == pytest.approx(runs[0.0][first]["lr"] / 2)  # halved from that step on
    with pytest.raises(CastloraError, match="backoff"):
        _run(folders, tmp_path / "bad", steps=1, backoff=float("nan"))


def test_teacher_auto_measures_strength_on_the_strength_corpus(folders, tmp_path):
    # --strength-corpus: auto compares the base models on documents of that held-out text, not of
    # --corpus, and castlora.json says which it was
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n\n\n".join(f"Held-out document {i}: the river rose after the long rain, and the "
                                      f"bridge at the mill was closed for {i} days." for i in range(40)))
    res = _run(folders, tmp_path / "port", steps=1, strength_corpus=[str(held_out)])
    choice = res.record["teacher"]
    assert res.record["config"]["strength_corpus"] == [str(held_out)]
    assert choice["measured_on"] == "strength_corpus" and choice["teacher"] in ("source", "blend")
    # its documents, as many characters as the run's training tokens (within the bounds)
    budget = strength_budget(1, 2, 32)
    assert choice["texts"] == len(strength_texts(read_corpus([str(held_out)]), 0, budget)) < 40
    assert budget == MIN_STRENGTH_CHARS and strength_budget(150, 8, 128) == STRENGTH_CHARS
    assert choice["source_bits_per_byte"] > 0 and choice["target_bits_per_byte"] > 0


def test_a_missing_strength_corpus_fails_before_any_model_loads(folders, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(pair_mod, "load_model", no_load)
    missing = tmp_path / "no_such_text.txt"
    with pytest.raises(CorpusError, match="no_such_text"):
        _run(folders, tmp_path / "port", steps=1, strength_corpus=[str(missing)])
    assert not (tmp_path / "port").exists()


def test_closed_form_in_groups_equals_one_pass(folders):
    """A statistics budget smaller than one port fits each port in its own pass over the calibration batches
    (what keeps a 7B port's fp64 statistics bounded); the heads, the chosen ridges and the output heads at
    other ridges are the same as from one pass over every port."""
    tok_s, tok_t = load_tokenizer(str(folders["llama"])), load_tokenizer(str(folders["neox"]))
    texts = read_docs("data", "general", "valid.txt.gz", n=4)
    batches = [encode_pair([t[:400] for t in texts[i:i + 2]], tok_s, tok_t, 48, 72) for i in (0, 2)]
    src, tgt = load_model(str(folders["llama"])), load_model(str(folders["neox"]))
    t_sites = model_sites(tgt)
    lora = load_adapter(folders["adapter"], model_sites(src))
    runs = []
    for budget in (10**12, 1):
        ports = _ports(lora.kernels, t_sites, proportional_layer_map(2, t_sites.num_layers))
        assert len(ports) > 1
        info, at_ridge = fit_closed_form(ports, src, tgt, [p.source_module for p, _ in ports], batches,
                                         ridges=(1e-2, 1.0), budget=budget)
        runs.append((info, at_ridge, [{k: v.clone() for k, v in p.state_dict().items()} for p, _ in ports]))
    (one, one_r, one_heads), (grouped, grouped_r, grouped_heads) = runs
    assert "statistics_passes" not in one and grouped["statistics_passes"] == len(one_heads)
    assert [h["ridge_out"] for h in one["heads"]] == [h["ridge_out"] for h in grouped["heads"]]
    for a, b in zip(one_heads, grouped_heads):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    for r in (1e-2, 1.0):
        for a, b in zip(one_r[r], grouped_r[r]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert port_groups(_ports(lora.kernels, t_sites, proportional_layer_map(2, t_sites.num_layers)),
                       10**12) == [list(range(len(one_heads)))]


# --------------------------------------------------- e. delta teacher with a zero LoRA


def test_delta_teacher_zero_lora_is_target_distribution(folders):
    tok_s, tok_t = load_tokenizer(str(folders["llama"])), load_tokenizer(str(folders["neox"]))
    vocab = shared_vocab(tok_s, tok_t)
    texts = read_docs("data", "general", "valid.txt.gz", n=3)
    batch = encode_pair([t[:400] for t in texts], tok_s, tok_t, 48, 72)
    assert batch.num_aligned > 20
    tgt = load_model(str(folders["neox"]))
    t_sites = model_sites(tgt)

    def kl_at_init(adapter):
        src_base = load_model(str(folders["llama"]))
        lora = load_adapter(adapter, model_sites(src_base))
        source = PeftModel.from_pretrained(src_base, str(adapter)).eval()
        inner = source.base_model.model
        ports = _ports(lora.kernels, t_sites, proportional_layer_map(2, t_sites.num_layers))
        paths = [p.source_module for p, _ in ports]
        closed_form_init(ports, inner, tgt, paths, [batch])
        with attached(tgt, ports) as wrappers, torch.no_grad():
            pair = ModelPair(source, tgt, None, None, None, t_sites, ports, wrappers)
            lp_teacher = make_teacher("delta").outputs(pair, batch, vocab, 1.0, False).logp
            logits = tgt(input_ids=batch.ids_t, attention_mask=batch.mask_t).logits
            lp_student = shared_log_probs(batch.gather(logits, "t"), vocab.ids_t, 1.0)
        with torch.no_grad():  # the target's own distribution
            own = tgt(input_ids=batch.ids_t, attention_mask=batch.mask_t).logits
        lp_own = shared_log_probs(batch.gather(own, "t"), vocab.ids_t, 1.0)
        return lp_teacher, lp_student, lp_own

    teacher, student, own = kl_at_init(folders["zero"])
    torch.testing.assert_close(teacher, own, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(student, own, rtol=1e-4, atol=1e-4)
    assert kl_divergence(teacher, student).item() < 1e-5
    # control: a nonzero LoRA tilts the teacher away from the target's own distribution
    teacher, student, own = kl_at_init(folders["adapter"])
    assert kl_divergence(teacher, own).item() > 1e-4


# --------------------------------------------------- f. resume


RESUME = dict(steps=6, checkpoint_every=3, lr=1e-2)


@pytest.fixture(scope="module")
def uninterrupted(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "full"
    return out, _run(folders, out, **RESUME)


class SimulatedCrash(Exception):
    pass


@pytest.mark.parametrize("interrupt, ckpt_step", [
    (SimulatedCrash, 3),  # a crash: only the periodic checkpoint (step 3) is there
    (KeyboardInterrupt, (3, 4)),  # Ctrl-C: the periodic one, or one saved at the interrupt (step 4)
])
def test_resume_after_interrupt_matches_uninterrupted(folders, uninterrupted, tmp_path, monkeypatch,
                                                      interrupt, ckpt_step):
    full_out, full = uninterrupted
    calls = {"n": 0}
    real = cast_mod.encode_pair

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1 + 5:  # 1 calibration batch, then steps 0..3 run; stop at the batch of step 4
            raise interrupt("simulated")
        return real(*a, **k)

    out = tmp_path / "resumed"
    monkeypatch.setattr(cast_mod, "encode_pair", flaky)
    with pytest.raises(interrupt):
        _run(folders, out, **RESUME)
    monkeypatch.setattr(cast_mod, "encode_pair", real)
    assert not out.exists()
    work = tmp_path / ".resumed.castlora-work"
    state = json.loads((work / "checkpoint" / "state.json").read_text())
    assert state["step"] in (ckpt_step if isinstance(ckpt_step, tuple) else (ckpt_step,))

    def searched_again(*a, **k):
        raise AssertionError("a resumed run reuses the start scale chosen before the interrupt")

    monkeypatch.setattr(cast_mod, "scale_output_heads", searched_again)
    resumed = _run(folders, out, resume=True, **RESUME)
    assert resumed.record["init"]["output_scale"] == full.record["init"]["output_scale"]
    assert resumed.record["init"]["start_kl"] == full.record["init"]["start_kl"]
    assert not work.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed"]
    for name in ("heads.safetensors", "adapter_model.safetensors"):
        a, b = load_file(str(full_out / name)), load_file(str(out / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    assert [r["kl"] for r in resumed.record["loss_curve"]] == [r["kl"] for r in full.record["loss_curve"]]


def _crash_at_step_4(folders, out, monkeypatch, **kw) -> None:
    """Run with RESUME's settings and crash at the batch of step 4 (after the step-3 checkpoint)."""
    calls = {"n": 0}
    real = cast_mod.encode_pair

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1 + 5:  # 1 calibration batch, then steps 0..3
            raise SimulatedCrash("simulated")
        return real(*a, **k)

    monkeypatch.setattr(cast_mod, "encode_pair", flaky)
    with pytest.raises(SimulatedCrash):
        _run(folders, out, **kw, **RESUME)
    monkeypatch.setattr(cast_mod, "encode_pair", real)


def test_resume_refuses_another_runs_work_a_checkpoint_past_steps_and_nan_heads(folders, tmp_path, monkeypatch):
    """--resume continues only the run its work folder belongs to: other settings are named (other --steps too:
    the training stream and the lr schedule are laid out for the whole run), and a checkpoint holding NaN heads
    is never trained from or exported."""
    from safetensors.torch import save_file

    out = tmp_path / "run"
    _crash_at_step_4(folders, out, monkeypatch)
    work = tmp_path / ".run.castlora-work"
    monkeypatch.setattr(pair_mod, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(CastloraError, match="--resume: the interrupted run in .* had other seq_len, lr than this one"):
        _run(folders, out, resume=True, **{**RESUME, "lr": 3e-2, "seq_len": 24})
    monkeypatch.undo()
    with pytest.raises(CastloraError, match="had other steps, generate than this one"):
        _run(folders, out, resume=True, **{**RESUME, "steps": 2})
    heads = load_file(str(work / "checkpoint" / "heads.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in heads.items()}, str(work / "checkpoint" / "heads.safetensors"))
    with pytest.raises(CastloraError, match="holds non-finite head weights .* rerun with --overwrite"):
        _run(folders, out, resume=True, **RESUME)
    assert not out.exists() and work.exists()  # nothing exported; the work folder is left for the user to judge


def test_existing_output_needs_overwrite(folders, tmp_path, monkeypatch):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the output check")

    with monkeypatch.context() as m:
        m.setattr(pair_mod, "load_model", no_load)
        with pytest.raises(CastloraError, match="already exists"):
            _run(folders, out, steps=0)
    assert (out / "old.txt").read_text() == "old"
    _run(folders, out, steps=0, overwrite=True)
    assert not (out / "old.txt").exists()
    assert (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_failed_run_leaves_nothing_beside_out(folders, tmp_path):
    """An adapter that does not fit the source fails cleanly, with no work or temporary folder left."""
    from castlora.errors import AdapterMismatchError

    parent = tmp_path / "runs"
    with pytest.raises(AdapterMismatchError, match="no such adaptable module"):
        castlora.translate(source=str(folders["neox"]), adapter=str(folders["adapter"]), target=str(folders["llama"]),
                           corpus=[str(folders["corpus"])], out=str(parent / "out"), steps=2, **QUIET)
    assert not parent.exists() or list(parent.iterdir()) == []


# --------------------------------------------------- sharded models (accelerate device_map)

def test_translate_with_a_multi_device_map_matches_single_device(folders, tmp_path):
    """The code path for models larger than one card: both models dispatched by accelerate with a
    module->device map (layer 1 offloaded to disk, so its weights sit on the meta device between
    calls and hooks move them in). The port must equal the single-device one."""
    device_map = {
        "source": {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                   "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"},
        "target": {"gpt_neox.embed_in": "cpu", "gpt_neox.layers.0": "cpu", "gpt_neox.layers.1": "disk",
                   "gpt_neox.final_layer_norm": "cpu", "gpt_neox.rotary_emb": "cpu", "lm_head": "cpu"},
    }
    plain = _run(folders, tmp_path / "plain", steps=3, generate=0)
    sharded = _run(folders, tmp_path / "sharded", steps=3, generate=0, device_map=json.dumps(device_map))
    a = load_file(str(plain.out / "adapter_model.safetensors"))
    b = load_file(str(sharded.out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:  # the two forward paths differ in float rounding, which Adam's steps (lr 3e-2) amplify a little
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert sharded.record["config"]["device_map"]


def test_device_map_with_checkpointing_and_weight_space(folders, tmp_path):
    """The sharded path (here a map for the target alone: the source loads whole) with the options that touch
    the modules themselves: gradient checkpointing (test_speed checks that it gives accelerate's hook back),
    and the weight-space baseline (which reads the disk-offloaded weights). Each must equal its single-device
    run."""
    device_map = json.dumps({"gpt_neox.embed_in": "cpu", "gpt_neox.layers.0": "cpu", "gpt_neox.layers.1": "disk",
                             "gpt_neox.final_layer_norm": "cpu", "gpt_neox.rotary_emb": "cpu", "lm_head": "cpu"})
    target_only = json.dumps({"target": json.loads(device_map)})
    for name, kw in (("ckpt", dict(steps=3, generate=0, gradient_checkpointing=True)),
                     ("ws", dict(transfer="weight-space"))):
        plain = _run(folders, tmp_path / f"{name}_plain", **kw)
        sharded = _run(folders, tmp_path / f"{name}_sharded", device_map=target_only, **kw)
        a = load_file(str(plain.out / "adapter_model.safetensors"))
        b = load_file(str(sharded.out / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and len(a) > 0, name
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {k}: {m}")


def test_closed_form_on_the_same_model_is_the_identity(folders, tmp_path):
    """CAST-0 from a model to itself must give back the source LoRA: the heads are fitted between
    the *base* models (LoRA off in the source) with a cross-validated penalty, so nothing of the
    LoRA's own upstream effect or of an over-large ridge leaks into the fit."""
    out = tmp_path / "self"
    res = castlora.translate(source=str(folders["llama"]), adapter=str(folders["adapter"]),
                             target=str(folders["llama"]), corpus=[str(folders["corpus"])], out=str(out),
                             steps=0, batch_size=4, seq_len=48, calib_batches=4, **QUIET)
    assert all(h["ridge_in"] <= 1e-4 and h["ridge_out"] <= 1e-4 for h in res.record["init"]["heads"])
    ids = _ids(32000, seed=3)
    base = _logits(load_model(str(folders["llama"])), ids)
    want = _logits(PeftModel.from_pretrained(load_model(str(folders["llama"])), str(folders["adapter"])).eval(), ids)
    got = _logits(PeftModel.from_pretrained(load_model(str(folders["llama"])), str(out)).eval(), ids)
    assert (want - base).norm() / base.norm() > 0.05  # the LoRA changes the logits a lot
    # and the port reproduces the change; not exactly: this random W_q has a near-null output direction
    # (eigenvalue 4e-4 of its output Gram vs ~1e3 for its inputs), in which no regression can see the identity
    assert (got - want).norm() / (want - base).norm() < 0.1


def test_zero_delta_start_is_the_target_base_and_then_learns(folders, tmp_path):
    """init=zero-delta: CAST-0's input heads, zero output heads. With no step the exported adapter
    leaves the target exactly as it was; after a few steps the output heads have moved (the
    gradient reaches them through the input heads) and the KL falls."""
    ids = _ids(32000, seed=4)
    base = _logits(load_model(str(folders["llama"])), ids)
    out0 = tmp_path / "zd0"
    res = castlora.translate(source=str(folders["llama"]), adapter=str(folders["adapter"]), target=str(folders["llama"]),
                             corpus=[str(folders["corpus"])], out=str(out0), steps=0, init="zero-delta",
                             batch_size=4, seq_len=48, **QUIET)
    assert res.record["init"]["zero_output_heads"] is True
    got0 = _logits(PeftModel.from_pretrained(load_model(str(folders["llama"])), str(out0)).eval(), ids)
    assert torch.equal(got0, base)
    out = tmp_path / "zd"
    res = castlora.translate(source=str(folders["llama"]), adapter=str(folders["adapter"]), target=str(folders["llama"]),
                             corpus=[str(folders["corpus"])], out=str(out), steps=12, init="zero-delta", lr=1e-2,
                             batch_size=4, seq_len=48, generate=0, **QUIET)
    curve = res.record["loss_curve"]
    assert curve[-1]["kl"] < curve[0]["kl"]
    held = res.record["held_out_kl"]
    assert held["kept"] == "trained" and held["end"] < held["start"]  # the trained heads are exported
    got = _logits(PeftModel.from_pretrained(load_model(str(folders["llama"])), str(out)).eval(), ids)
    assert (got - base).norm() / base.norm() > 1e-4


def test_training_that_raises_the_held_out_kl_keeps_the_start(folders, tmp_path):
    """From the exact start on a model and itself, steps at an absurd lr (1.0) can only move away. The
    held-out KL at the end is then above the start's, and the port keeps the start heads: it still
    reproduces the source LoRA, as CAST-0 does (test above), and castlora.json says so."""
    out = tmp_path / "self"
    res = castlora.translate(source=str(folders["llama"]), adapter=str(folders["adapter"]),
                             target=str(folders["llama"]), corpus=[str(folders["corpus"])], out=str(out),
                             steps=6, lr=1.0, batch_size=4, seq_len=48, calib_batches=4, generate=0, **QUIET)
    held = res.record["held_out_kl"]
    assert held["kept"] == "start" and held["end"] > 10 * held["start"], held
    assert res.record["init"]["output_scale"] == 1.0
    ids = _ids(32000, seed=3)
    base = _logits(load_model(str(folders["llama"])), ids)
    want = _logits(PeftModel.from_pretrained(load_model(str(folders["llama"])), str(folders["adapter"])).eval(), ids)
    got = _logits(PeftModel.from_pretrained(load_model(str(folders["llama"])), str(out)).eval(), ids)
    assert (got - want).norm() / (want - base).norm() < 0.1


def test_scaled_start_keeps_the_closed_form_on_the_same_model(folders, tmp_path):
    """init=scaled (the default when training): the output heads start at the scale of CAST-0 that fits
    the teacher best on the held-out calibration batches. On the same model CAST-0 is the source LoRA
    itself, so the full scale must win, by far, over the zero start."""
    res = castlora.translate(source=str(folders["llama"]), adapter=str(folders["adapter"]), target=str(folders["llama"]),
                             corpus=[str(folders["corpus"])], out=str(tmp_path / "scaled"), steps=2,
                             batch_size=4, seq_len=48, calib_batches=2, generate=0, **QUIET)
    info = res.record["init"]
    assert res.record["config"]["init"] == "scaled"  # what auto resolved to, recorded
    kl = {float(s): v for s, v in info["start_kl"].items()}
    assert set(kl) == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert info["output_scale"] == 1.0 and kl[1.0] == min(kl.values()) and kl[1.0] < 0.2 * kl[0.0]
    # with no training, auto stays CAST-0 (the closed form): no scale search
    res0 = _run(folders, tmp_path / "cast0")
    assert res0.record["config"]["init"] == "closed-form" and "output_scale" not in res0.record["init"]


def _identity_ports(folders):
    """The adapter's kernels ported llama -> llama with identity heads, and copies of their input
    and output heads' weights."""
    sites = model_sites(load_model(str(folders["llama"])))
    lora = load_adapter(str(folders["adapter"]), sites)
    pairs, _ = map_sites(lora.kernels, sites, proportional_layer_map(sites.num_layers, sites.num_layers))
    ports = [(PortedKernel(p.kernel, p.target), p.target) for p in pairs]
    for port, _ in ports:
        port.set_identity()
    return (ports, [port.p_in.linear_part().clone() for port, _ in ports],
            [port.p_out.linear_part().clone() for port, _ in ports])


def test_scale_output_heads_keeps_the_best_scale(folders):
    """The search sets the output heads to the scale with the lowest KL, and only them."""
    from castlora.start_scale import scale_output_heads
    ports, w_in, w_out = _identity_ports(folders)
    # a stand-in objective with its minimum at scale 0.5, measured on the heads as they are set
    ratio = lambda: (ports[0][0].p_out.linear_part().norm() / w_out[0].norm()).item()  # noqa: E731
    info = scale_output_heads(ports, lambda: (ratio() - 0.5) ** 2)
    assert info["output_scale"] == 0.5
    for (port, _), a, b in zip(ports, w_in, w_out):
        assert torch.equal(port.p_in.linear_part(), a)
        torch.testing.assert_close(port.p_out.linear_part(), 0.5 * b)


def test_search_start_picks_the_best_candidate_and_scale(folders):
    """--init scaled-ridge: every candidate set of output heads at every scale (scale 0, the same for
    all, once); the lowest KL wins and only the output heads change."""
    from castlora.start_scale import search_start
    ports, w_in, w_out = _identity_ports(folders)
    calls = []

    def kl_at():  # a stand-in objective with its minimum at 1.5 x the first candidate's heads
        calls.append(1)
        return ((ports[0][0].p_out.linear_part().norm() / w_out[0].norm()).item() - 1.5) ** 2

    info = search_start(ports, kl_at, {"closed-form": w_out, "0.01": [2 * w for w in w_out]})
    assert (info["candidate"], info["output_scale"]) == ("0.01", 0.75)
    assert len(calls) == 9 and len(info["start_kl"]) == 9 and "0.01@0.0" not in info["start_kl"]
    for (port, _), a, b in zip(ports, w_in, w_out):
        assert torch.equal(port.p_in.linear_part(), a)
        torch.testing.assert_close(port.p_out.linear_part(), 1.5 * b)



def test_push_to_hub_uploads_the_finished_folder_once_and_refuses_offline_before_any_work(folders, tmp_path,
                                                                                         monkeypatch):
    class StandInHub:  # what HfApi offers the push: create_repo and upload_folder, recorded
        def __init__(self):
            self.calls, self.uploaded = [], {}

        def create_repo(self, repo_id, repo_type="model", exist_ok=False):
            self.calls.append(("create_repo", repo_id, repo_type, exist_ok))

        def upload_folder(self, folder_path, repo_id, repo_type="model", commit_message=""):
            self.calls.append(("upload_folder", repo_id))
            self.uploaded = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            return f"https://hub.example/{repo_id}/commit/1"

    hub = StandInHub()
    res = _run(folders, tmp_path / "out", push_to_hub="me/ported-lora", hub_api=hub)
    assert hub.calls == [("create_repo", "me/ported-lora", "model", True), ("upload_folder", "me/ported-lora")]
    assert hub.uploaded.keys() == {p.name for p in res.out.iterdir()}  # the whole folder, as written
    assert hub.uploaded["adapter_model.safetensors"] == (res.out / "adapter_model.safetensors").read_bytes()
    # offline and no stand-in: refused before any model loads, nothing written
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pair_mod, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(CastloraError, match="--push-to-hub me/x: HF_HUB_OFFLINE is set"):
        _run(folders, tmp_path / "offline", push_to_hub="me/x")
    assert not (tmp_path / "offline").exists()
    with pytest.raises(CastloraError, match="--push-to-hub must be a hub repo id"):
        _run(folders, tmp_path / "bad", push_to_hub="not a repo")
