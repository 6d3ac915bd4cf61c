"""The exported adapter as peft, transformers and vLLM see it (config, metadata, model card, rank cap),
bits per byte, and adapters / models named by a hub id, read from a real hub cache laid out offline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_tiny
from hub_cache import add_to_hub_cache, offline_hub, repo_folder
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from castlora._version import __version__
from castlora.errors import CastloraError
from castlora.evaluate import text_loss
from castlora.export import (export_peft, rank_warning, serving_problems, short_target_modules,
                             truncate_factors, write_model_card)
from castlora.hub import resolve_adapter, resolve_model

LAYERS = 2
PROVENANCE = {"source_model": "org/source-llm", "source_adapter": "org/source-lora", "method": "cast",
              "steps": 120, "held_out_kl": {"start": 0.8123, "end": 0.0456, "text": "calibration text"}}


def port_like_factors(model, ranks: dict[str, int], seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Factors as export.module_factors returns them: per full module path, A (r x in) and B (out x r)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, r in ranks.items():
        lin = model.get_submodule(path)
        out[path] = (torch.randn(r, lin.in_features, generator=g) * 0.3,
                     torch.randn(lin.out_features, r, generator=g) * 0.3)
    return out


def qv_ranks(q: int = 4, v: int = 2) -> dict[str, int]:
    return {**{f"model.layers.{i}.self_attn.q_proj": q for i in range(LAYERS)},
            **{f"model.layers.{i}.self_attn.v_proj": v for i in range(LAYERS)}}


def manual_logits(base_folder, factors, ids) -> torch.Tensor:
    """W + B @ A by hand (peft's scaling is 1: lora_alpha = r)."""
    model = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32).eval()
    with torch.no_grad():
        for path, (A, B) in factors.items():
            model.get_submodule(path).weight += B @ A
        return model(input_ids=ids).logits


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def base_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    make_tiny("llama", 0).save_pretrained(str(folder))
    return folder


@pytest.fixture
def exported(tmp_path, base_folder):
    factors = port_like_factors(make_tiny("llama", 0), qv_ranks())
    out = tmp_path / "adapter"
    export_peft(make_tiny("llama", 0), factors, out, base_model_name=str(base_folder), provenance=PROVENANCE)
    return out, factors


IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------- export


def test_exported_adapter_loads_with_auto_peft_model_and_equals_w_plus_b_a(exported, base_folder):
    from peft import AutoPeftModelForCausalLM

    out, factors = exported
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    want = manual_logits(base_folder, factors, IDS)
    assert (want - logits(make_tiny("llama", 0), IDS)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(logits(loaded, IDS), want, rtol=1e-4, atol=1e-4)


def test_exported_adapter_loads_with_transformers_load_adapter(exported, base_folder):
    out, factors = exported
    model = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32).eval()
    model.load_adapter(str(out))
    torch.testing.assert_close(logits(model, IDS), manual_logits(base_folder, factors, IDS), rtol=1e-4, atol=1e-4)


def test_adapter_config_has_causal_lm_task_short_names_and_the_base_name_as_given(exported, base_folder):
    cfg = json.loads((exported[0] / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == str(base_folder)
    assert cfg["r"] == cfg["lora_alpha"] == 4 and cfg["bias"] == "none"


def test_target_modules_stay_full_paths_when_short_names_would_select_more_modules(tmp_path, base_folder):
    from peft import AutoPeftModelForCausalLM

    factors = port_like_factors(make_tiny("llama", 0), {"model.layers.0.self_attn.q_proj": 3})
    assert short_target_modules(make_tiny("llama", 0), factors) == ["model.layers.0.self_attn.q_proj"]
    out = tmp_path / "one_module"
    export_peft(make_tiny("llama", 0), factors, out, base_model_name=str(base_folder))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(logits(loaded, IDS), manual_logits(base_folder, factors, IDS), rtol=1e-4, atol=1e-4)
    assert not hasattr(loaded.get_submodule("base_model.model.model.layers.1.self_attn.q_proj"), "lora_A")


def test_a_hub_id_as_base_model_stays_a_hub_id_without_any_hub_lookup(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path)  # any lookup of "org/target-llm" would fail offline
    out = tmp_path / "adapter"
    export_peft(make_tiny("llama", 0), port_like_factors(make_tiny("llama", 0), qv_ranks()), out,
                base_model_name="org/target-llm", provenance=PROVENANCE)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/target-llm"
    from huggingface_hub import ModelCard
    assert ModelCard.load(out / "README.md").data.base_model == "org/target-llm"


def test_weights_file_carries_provenance_metadata_and_only_lora_tensors(exported, base_folder):
    out, _ = exported
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == "pt"
    assert meta["castlora_version"] == __version__ == "0.1.0"
    assert meta["source_model"] == "org/source-llm" and meta["source_adapter"] == "org/source-lora"
    assert meta["method"] == "cast" and meta["base_model"] == str(base_folder)
    assert json.loads(meta["held_out_kl"])["end"] == 0.0456 and meta["steps"] == "120"
    assert len(keys) == 2 * 2 * LAYERS and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))  # the atomic rewrite left nothing behind


def test_model_card_names_base_source_method_steps_kl_and_version(exported, base_folder):
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported[0] / "README.md")
    assert card.data.base_model == str(base_folder)
    assert card.data.library_name == "peft"
    assert {"castlora", "lora", "peft"} <= set(card.data.tags)
    for text in ("org/source-llm", "org/source-lora", "cast", "120", "0.8123", "0.0456", __version__):
        assert text in card.text, text
    assert "More Information Needed" not in card.text  # peft's template was replaced


def test_write_model_card_on_its_own_takes_a_plain_number_as_held_out_kl(tmp_path):
    from huggingface_hub import ModelCard

    write_model_card(tmp_path, {"base_model": "org/t", "source_model": "org/s", "source_adapter": "org/a",
                                "method": "weight-space", "steps": 0, "held_out_kl": 0.25, "exported_rank": 32,
                                "tags": ["extra"]})
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "org/t" and "extra" in card.data.tags
    assert "0.25" in card.text and "weight-space" in card.text
    assert "--max-lora-rank 32" in card.text  # rank 32 needs vLLM's cap raised


# ------------------------------------------------------------------------------------- --max-rank


def _numpy_truncation(A: torch.Tensor, B: torch.Tensor, R: int) -> tuple[np.ndarray, float]:
    delta = (B.double() @ A.double()).numpy()
    U, S, Vt = np.linalg.svd(delta)
    best = (U[:, :R] * S[:R]) @ Vt[:R]
    return best, float(np.linalg.norm(delta - best) / np.linalg.norm(delta))


def test_truncation_leaves_modules_within_the_cap_untouched_with_zero_error():
    factors = port_like_factors(make_tiny("llama", 0), qv_ranks(4, 2))
    new, report = truncate_factors(factors, 4)
    assert set(report) == set(factors) and all(e == 0.0 for e in report.values())
    for path, (A, B) in factors.items():
        assert new[path][0] is A and new[path][1] is B


def test_truncation_keeps_the_top_singular_directions_and_reports_numpys_relative_error():
    factors = port_like_factors(make_tiny("llama", 0), qv_ranks(6, 2), seed=3)
    new, report = truncate_factors(factors, 3)
    for path, (A, B) in factors.items():
        A_R, B_R = new[path]
        if A.shape[0] <= 3:
            assert report[path] == 0.0
            continue
        best, err = _numpy_truncation(A, B, 3)
        assert A_R.shape == (3, A.shape[1]) and B_R.shape == (B.shape[0], 3) and A_R.dtype == A.dtype
        np.testing.assert_allclose((B_R.double() @ A_R.double()).numpy(), best, rtol=1e-4, atol=1e-5)
        assert 0 < report[path] == pytest.approx(err, rel=1e-6)
        # the singular values are split evenly: both factors carry sqrt(S)
        S = np.linalg.svd((B.double() @ A.double()).numpy(), compute_uv=False)[:3]
        np.testing.assert_allclose(np.linalg.norm(A_R.double().numpy(), axis=1), np.sqrt(S), rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(B_R.double().numpy(), axis=0), np.sqrt(S), rtol=1e-5)


def test_a_truncated_port_exports_at_the_capped_rank_and_loads(tmp_path, base_folder):
    from peft import AutoPeftModelForCausalLM

    factors, _ = truncate_factors(port_like_factors(make_tiny("llama", 0), qv_ranks(8, 8)), 2)
    out = tmp_path / "capped"
    export_peft(make_tiny("llama", 0), factors, out, base_model_name=str(base_folder))
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(logits(loaded, IDS), manual_logits(base_folder, factors, IDS), rtol=1e-4, atol=1e-4)
    assert serving_problems(out, max_lora_rank=8) == []


def test_rank_warning_asks_for_vllms_next_allowed_max_lora_rank_above_16():
    assert rank_warning(8) is None and rank_warning(16) is None
    assert "--max-lora-rank 32" in rank_warning(17)
    assert "--max-lora-rank 64" in rank_warning(64)
    assert "--max-lora-rank 320" in rank_warning(300)
    assert "--max-lora-rank 512" in rank_warning(512)
    assert "cannot serve" in rank_warning(513)


def test_serving_problems_is_empty_for_an_export_and_names_each_broken_constraint(exported, tmp_path):
    out, _ = exported
    assert serving_problems(out) == []
    assert serving_problems(out, max_lora_rank=16) == []
    assert any("LoRA rank 4 is greater than --max-lora-rank 1" in p for p in serving_problems(out, 1))

    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(bias="all", modules_to_save=["lm_head"], use_dora=True)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    problems = serving_problems(out)
    assert len(problems) == 4
    for words in ("bias", "modules_to_save", "DoRA", "lm_head.weight"):
        assert any(words in p for p in problems), words
    assert serving_problems(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'} has no adapter_config.json"]


# ---------------------------------------------------------------------------------- bits per byte


@pytest.fixture(scope="module")
def zoo_llama():
    from conftest import shared_path

    folder = shared_path("zoo", "llama")
    return (AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(folder)))


TEXT = "Café au lait — naïve façade. The quick brown fox jumps over the lazy dog, twice: 2 × 2 = 4."


def test_bits_per_byte_is_total_nats_over_ln2_over_the_documents_utf8_bytes(zoo_llama):
    model, tok = zoo_llama
    docs = [TEXT, "Zürich is ünder the snow."]
    r = text_loss(model, tok, docs, seq_len=16)  # several windows per document
    assert r["bytes"] == sum(len(d.encode("utf-8")) for d in docs) > sum(map(len, docs))  # bytes, not characters
    assert r["bits_per_byte"] == pytest.approx(r["mean_loss"] * r["tokens"] / (math.log(2) * r["bytes"]), rel=1e-9)
    assert 0 < r["bits_per_byte"] < 20


def test_bits_per_byte_counts_only_the_text_scored_when_max_tokens_stops_mid_document(zoo_llama):
    model, tok = zoo_llama
    r = text_loss(model, tok, [TEXT], seq_len=8, max_tokens=10)
    ids = tok(TEXT)["input_ids"]
    assert r["tokens"] == 16  # two windows of 8 targets
    assert r["bytes"] == len(tok.decode(ids[1:17], skip_special_tokens=True).encode("utf-8"))
    assert r["bits_per_byte"] == pytest.approx(r["mean_loss"] * r["tokens"] / (math.log(2) * r["bytes"]), rel=1e-9)


def test_two_tokenizers_give_comparable_bits_per_byte_on_the_same_text(zoo_llama):
    from conftest import shared_path

    folder = shared_path("zoo", "neox")
    neox = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ntok = AutoTokenizer.from_pretrained(str(folder))
    r_llama = text_loss(*zoo_llama, [TEXT], doc_start=True)
    r_neox = text_loss(neox, ntok, [TEXT], doc_start=True)
    assert r_llama["bytes"] == r_neox["bytes"] == len(TEXT.encode("utf-8"))  # same text, whatever the tokens
    for r in (r_llama, r_neox):
        assert math.isfinite(r["bits_per_byte"]) and r["bits_per_byte"] > 0
    # without doc_start a GPT-2 style tokenizer adds no BOS: its first token is not scored, nor its bytes
    r = text_loss(neox, ntok, [TEXT])
    first = ntok(TEXT)["input_ids"][0]
    assert r["bytes"] == len(TEXT.encode("utf-8")) - len(ntok.decode([first]).encode("utf-8"))


# ---------------------------------------------------------------------------------------- the hub


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline hub cache holding the zoo llama as org/tiny-llama and an untrained PEFT LoRA on it
    (B nonzero) as org/tiny-lora (branch main and tag v1.0), plus a subfolder adapter."""
    from conftest import shared_path
    from peft import LoraConfig, get_peft_model

    zoo = shared_path("zoo", "llama")
    cache = offline_hub(monkeypatch, tmp_path)
    lora_dir = tmp_path / "lora"
    peft_model = get_peft_model(make_tiny("llama", 0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(str(lora_dir))
    peft_model.save_pretrained(str(tmp_path / "nested" / "second"))
    model_snap = add_to_hub_cache(cache, "org/tiny-llama", zoo)
    lora_snap = add_to_hub_cache(cache, "org/tiny-lora", lora_dir, refs=("main", "v1.0"))
    nested_snap = add_to_hub_cache(cache, "org/many-loras", tmp_path / "nested")
    return {"cache": cache, "model": model_snap, "lora": lora_snap, "nested": nested_snap, "lora_dir": lora_dir}


def test_resolve_adapter_returns_the_cached_snapshot_of_a_hub_id_offline(hub):
    from peft import PeftConfig

    folder = resolve_adapter("org/tiny-lora")
    assert folder == hub["lora"]
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert PeftConfig.from_pretrained(str(folder)).r == 2
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in tensors.items())


def test_resolve_adapter_reads_a_revision_given_as_a_ref_name_or_a_commit(hub):
    assert resolve_adapter("org/tiny-lora", revision="v1.0") == hub["lora"]
    assert resolve_adapter("org/tiny-lora", revision="main") == hub["lora"]
    assert resolve_adapter("org/tiny-lora", revision=hub["lora"].name) == hub["lora"]


def test_resolve_adapter_joins_a_subfolder_for_local_folders_and_hub_ids(hub, tmp_path):
    assert resolve_adapter("org/many-loras", subfolder="second") == hub["nested"] / "second"
    assert resolve_adapter(str(tmp_path / "nested"), subfolder="second") == tmp_path / "nested" / "second"
    assert resolve_adapter(str(hub["lora_dir"])) == hub["lora_dir"]


def test_resolve_model_returns_the_snapshot_and_transformers_loads_it(hub):
    folder = resolve_model("org/tiny-llama")
    assert folder == hub["model"] and resolve_model("org/tiny-llama", revision="main") == folder
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok("hello")["input_ids"]
    assert AutoModelForCausalLM.from_pretrained(str(folder)).config.hidden_size == 160


def test_a_missing_id_or_revision_offline_is_a_one_line_error_that_says_what_to_do(hub):
    for call in (lambda: resolve_adapter("org/not-there"), lambda: resolve_model("org/not-there"),
                 lambda: resolve_adapter("org/tiny-lora", revision="no-such-branch")):
        with pytest.raises(CastloraError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg
        assert "not in the local cache and HF_HUB_OFFLINE is set: run once online or pass a local folder" in msg
    assert "'org/not-there'" in str(pytest.raises(CastloraError, resolve_adapter, "org/not-there").value)


def test_a_cached_repo_without_adapter_config_or_safetensors_is_refused(hub):
    with pytest.raises(CastloraError, match="no adapter_config.json"):
        resolve_adapter("org/tiny-llama")  # a model, not an adapter
    add_to_hub_cache(hub["cache"], "org/pickled", {"config.json": b"{}", "pytorch_model.bin": b"x"})
    with pytest.raises(CastloraError, match="allow-pickle"):
        resolve_model("org/pickled")
    assert resolve_model("org/pickled", allow_pickle=True) == repo_folder(hub["cache"], "org/pickled") / "snapshots" / \
        (repo_folder(hub["cache"], "org/pickled") / "refs" / "main").read_text()


def test_a_name_that_is_neither_a_folder_nor_a_hub_id_is_a_clear_error(tmp_path):
    with pytest.raises(CastloraError, match="not a hub id"):
        resolve_adapter(str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(CastloraError, match="is a file"):
        resolve_model(str(tmp_path / "file.json"))
