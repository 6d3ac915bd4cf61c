"""Reading PEFT LoRA folders: kernels reproduce peft's own delta exactly (fused modules split into
roles), scaling variants, and every way a folder can be wrong fails with a castlora error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny
from peft import LoraConfig, get_peft_model

from castlora.adapters import load_adapter
from castlora.errors import AdapterMismatchError, CastloraError, UnsafeFileError
from castlora.families import model_sites



def _randomize_b(peft_model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _save_adapter(model_type, targets, folder, seed=0, base_name=None, **lora_kw):
    base = make_tiny(model_type, seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **lora_kw)
    pm = get_peft_model(base, cfg)
    if base_name:
        pm.peft_config["default"].base_model_name_or_path = base_name
    _randomize_b(pm, seed)
    pm.save_pretrained(str(folder))
    return pm


def _peft_deltas(pm) -> dict[str, torch.Tensor]:
    """module path (inside the transformers model) -> the delta peft itself applies."""
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name] = mod.get_delta_weight("default").detach()
    return out


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ad") / "llama_qv"
    pm = _save_adapter("llama", ["q_proj", "v_proj"], folder, base_name="tiny/llama-32")
    return folder, pm


def _check_kernels_reproduce(folder, pm, fused_rows: bool):
    sites = model_sites(pm)
    lora = load_adapter(folder, sites)
    deltas = _peft_deltas(pm)
    assert sorted(deltas) == lora.module_paths
    summed = {p: torch.zeros_like(d) for p, d in deltas.items()}
    for k in lora.kernels:
        site = sites.site(k.layer, k.role)
        assert site.path == k.module_path
        assert k.rank == 4 and k.scale == pytest.approx(2.0)
        if fused_rows:
            assert k.rows is not None and torch.equal(k.rows, site.rows)
            assert k.B.shape[0] == len(site.rows)
            summed[k.module_path][site.rows] += k.delta_weight()
        else:
            assert k.rows is None
            summed[k.module_path] += k.delta_weight()
    for p, d in deltas.items():
        assert d.abs().max() > 1e-3  # B@A really nonzero
        torch.testing.assert_close(summed[p], d, rtol=1e-6, atol=1e-6)
    return lora


def test_llama_qv_kernels_reproduce_peft_delta(llama_adapter):
    folder, pm = llama_adapter
    lora = _check_kernels_reproduce(folder, pm, fused_rows=False)
    assert [k.key for k in lora.kernels] == ["0.q", "0.v", "1.q", "1.v"]
    assert lora.base_model == "tiny/llama-32"


def test_gpt_neox_fused_qkv_split_into_roles(tmp_path):
    pm = _save_adapter("gpt_neox", ["query_key_value"], tmp_path / "neox")
    lora = _check_kernels_reproduce(tmp_path / "neox", pm, fused_rows=True)
    assert [k.key for k in lora.kernels] == ["0.k", "0.q", "0.v", "1.k", "1.q", "1.v"]
    # the three roles' rows partition the fused output (interleaved per head)
    rows = torch.cat([k.rows for k in lora.kernels if k.layer == 0]).sort().values
    assert torch.equal(rows, torch.arange(3 * 32))
    q_rows = next(k.rows for k in lora.kernels if k.key == "0.q")
    assert not torch.equal(q_rows, torch.arange(32))  # per-head interleaved, not one block


def test_gpt2_conv1d_fused_c_attn(tmp_path):
    pm = _save_adapter("gpt2", ["c_attn"], tmp_path / "gpt2", fan_in_fan_out=True)
    sites = model_sites(pm)
    lora = load_adapter(tmp_path / "gpt2", sites)
    deltas = _peft_deltas(pm)
    for path, d in deltas.items():
        # peft returns the Conv1D delta in the (in, out) layout: transpose to (out, in)
        full = torch.zeros(d.shape[1], d.shape[0])
        for k in lora.kernels:
            if k.module_path == path:
                full[k.rows] += k.delta_weight()
        torch.testing.assert_close(full, d.t(), rtol=1e-6, atol=1e-6)


def test_rslora_scaling(tmp_path):
    pm = _save_adapter("llama", ["q_proj"], tmp_path / "rs", use_rslora=True)
    lora = _check_kernels_reproduce_scale(tmp_path / "rs", pm, 8 / 4 ** 0.5)
    assert len(lora.kernels) == 2


def _check_kernels_reproduce_scale(folder, pm, scale):
    sites = model_sites(pm)
    lora = load_adapter(folder, sites)
    deltas = _peft_deltas(pm)
    for k in lora.kernels:
        assert k.scale == pytest.approx(scale)
        torch.testing.assert_close(k.delta_weight(), deltas[k.module_path], rtol=1e-6, atol=1e-6)
    return lora


def test_alpha_pattern(tmp_path):
    pm = _save_adapter("llama", ["q_proj", "v_proj"], tmp_path / "ap", alpha_pattern={"v_proj": 2})
    lora = load_adapter(tmp_path / "ap", model_sites(pm))
    deltas = _peft_deltas(pm)
    for k in lora.kernels:
        assert k.scale == pytest.approx(0.5 if k.role == "v" else 2.0)
        torch.testing.assert_close(k.delta_weight(), deltas[k.module_path], rtol=1e-6, atol=1e-6)


def test_wrong_base_model_raises_mismatch(llama_adapter):
    folder, _ = llama_adapter
    other = make_tiny("llama", 1, hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(AdapterMismatchError) as ei:
        load_adapter(folder, model_sites(other))
    msg = str(ei.value)
    assert "model.layers.0.self_attn.q_proj" in msg
    assert "(4, 32)" in msg and "48" in msg
    assert "tiny/llama-32" in msg
    assert isinstance(ei.value, CastloraError)


def test_unknown_module_names_raise(tmp_path, llama_adapter):
    folder, _ = llama_adapter
    # the llama adapter against a gpt_neox model: none of its modules exist there
    with pytest.raises(AdapterMismatchError, match="no such adaptable module"):
        load_adapter(folder, model_sites(make_tiny("gpt_neox")))
    # a renamed key that is not a LoRA tensor at all
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    from safetensors.torch import load_file, save_file
    t = load_file(str(bad / "adapter_model.safetensors"))
    t["base_model.model.model.layers.0.self_attn.q_proj.weird.weight"] = torch.zeros(2, 2)
    save_file(t, str(bad / "adapter_model.safetensors"))
    with pytest.raises(CastloraError, match="weird"):
        load_adapter(bad, model_sites(make_tiny("llama")))


def test_missing_half_of_a_pair_raises(tmp_path, llama_adapter):
    folder, _ = llama_adapter
    bad = tmp_path / "half"
    shutil.copytree(folder, bad)
    from safetensors.torch import load_file, save_file
    t = load_file(str(bad / "adapter_model.safetensors"))
    del t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(t, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterMismatchError, match="layers.1.self_attn.v_proj.*lora_B missing"):
        load_adapter(bad, model_sites(make_tiny("llama")))


def test_pickle_only_adapter_refused(tmp_path, llama_adapter):
    folder, _ = llama_adapter
    pk = tmp_path / "pickle"
    pk.mkdir()
    shutil.copy(folder / "adapter_config.json", pk / "adapter_config.json")
    from safetensors.torch import load_file
    torch.save(load_file(str(folder / "adapter_model.safetensors")), pk / "adapter_model.bin")
    sites = model_sites(make_tiny("llama"))
    with pytest.raises(UnsafeFileError, match="pickle"):
        load_adapter(pk, sites)
    lora = load_adapter(pk, sites, allow_pickle=True)  # explicit opt-in works (weights_only)
    assert len(lora.kernels) == 4


def test_truncated_safetensors_raises_castlora_error(tmp_path, llama_adapter):
    folder, _ = llama_adapter
    tr = tmp_path / "trunc"
    shutil.copytree(folder, tr)
    f = tr / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CastloraError, match="safetensors"):
        load_adapter(tr, model_sites(make_tiny("llama")))
    f.write_bytes(data[:5])  # even the header length is cut
    with pytest.raises(CastloraError):
        load_adapter(tr, model_sites(make_tiny("llama")))


def test_folder_problems(tmp_path, llama_adapter):
    folder, _ = llama_adapter
    sites = model_sites(make_tiny("llama"))
    with pytest.raises(CastloraError, match="does not exist"):
        load_adapter(tmp_path / "nope", sites)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CastloraError, match="adapter_config.json"):
        load_adapter(empty, sites)
    bad = tmp_path / "badjson"
    shutil.copytree(folder, bad)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(CastloraError, match="not valid JSON"):
        load_adapter(bad, sites)
    dora = tmp_path / "dora"
    shutil.copytree(folder, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CastloraError, match="DoRA"):
        load_adapter(dora, sites)
