"""Model families as data: every spec resolves on a real (tiny) model of its architecture, fused
layouts select the rows the model itself uses as q / k / v (gate / up), unknown architectures fail
helpfully, and new families can be registered."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny, shared_path
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import castlora.families as fam
from castlora.capture import capture
from castlora.families import (ROLES, FamilySpec, Fused, SiteSpec, UnsupportedArchitectureError,
                               family_for, head_dim_of, model_sites, register_family)

MODEL_TYPES = sorted(TINY_CONFIGS)
# Which roles each tiny family has (the rest must be absent).
NO_GATE = {"gpt2", "gpt_neox", "opt"}
FUSED_TYPES = ["phi3", "gpt2", "gpt_neox"]
FUSED_MODULES = {  # model_type -> {module name inside a layer: roles it computes, in order}
    "phi3": {"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")},
    "gpt2": {"attn.c_attn": ("q", "k", "v")},
    "gpt_neox": {"attention.query_key_value": ("q", "k", "v")},
}
MODELING = {
    "phi3": "transformers.models.phi3.modeling_phi3",
    "gpt2": "transformers.models.gpt2.modeling_gpt2",
    "gpt_neox": "transformers.models.gpt_neox.modeling_gpt_neox",
}


@pytest.fixture(scope="module")
def models():
    cache: dict[str, nn.Module] = {}

    def get(model_type: str) -> nn.Module:
        if model_type not in cache:
            cache[model_type] = make_tiny(model_type)
        return cache[model_type]
    return get


@pytest.fixture
def clean_registry():
    saved = dict(fam._REGISTRY)
    yield fam._REGISTRY
    fam._REGISTRY.clear()
    fam._REGISTRY.update(saved)


def _ids(model, batch=2, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)


def _weight_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) read off the module itself, independent of castlora."""
    if isinstance(module, Conv1D):
        assert module.weight.shape == (module.nx, module.nf)  # Conv1D stores (in, out)
        return module.nx, module.nf
    assert isinstance(module, nn.Linear), type(module)
    assert module.weight.shape == (module.out_features, module.in_features)
    return module.in_features, module.out_features


# ----------------------------------------------------------------------------------------------
# every role resolves, with the right shapes


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_role_resolves_with_module_shapes(models, model_type):
    model = models(model_type)
    ms = model_sites(model)
    spec = family_for(model.config)
    assert ms.family is spec
    assert ms.num_layers == model.config.num_hidden_layers == len(ms.layer_paths)
    assert ms.roles == spec.roles
    expected_roles = tuple(r for r in ROLES if not (r == "gate" and model_type in NO_GATE))
    assert spec.roles == expected_roles
    assert set(ms.sites) == {(i, r) for i in range(ms.num_layers) for r in expected_roles}
    if model_type in NO_GATE:
        assert "gate" not in spec.sites
        with pytest.raises(KeyError):
            ms.site(0, "gate")

    hidden = model.config.hidden_size
    hd = head_dim_of(model.config)
    n_heads = model.config.num_attention_heads
    n_kv = getattr(model.config, "num_key_value_heads", None) or n_heads
    for i in range(ms.num_layers):
        assert ms.layer_paths[i] == f"{spec.layers}.{i}"
        for role in expected_roles:
            site = ms.site(i, role)
            assert (site.layer, site.role, site.key) == (i, role, f"{i}.{role}")
            module = model.get_submodule(site.path)
            assert site.path.startswith(ms.layer_paths[i] + ".")
            d_in, module_out = _weight_dims(module)
            assert site.transposed == isinstance(module, Conv1D) == (model_type == "gpt2")
            assert site.d_in == d_in
            assert site.module_out == module_out
            if site.fused:
                assert site.d_out == len(site.rows) < module_out
                assert site.rows.dtype == torch.long
            else:
                assert site.rows is None and site.d_out == module_out
            # role-level shape sanity, independent of the spec
            if role in ("q", "k", "v", "gate", "up"):
                assert site.d_in == hidden
            if role == "q":
                assert site.d_out == n_heads * hd
            if role in ("k", "v"):
                assert site.d_out == n_kv * hd
            if role in ("o", "down"):
                assert site.d_out == hidden
            if role == "o":
                assert site.d_in == n_heads * hd
            if role == "down":
                assert site.d_in == ms.site(i, "up").d_out
            if role == "gate":
                assert site.d_out == ms.site(i, "up").d_out
            assert ms.locate(site.path) and site in ms.locate(site.path)
    # embed and final norm paths resolve to the model's own modules
    assert model.get_submodule(spec.embed) is model.get_input_embeddings()
    assert isinstance(model.get_submodule(spec.final_norm), nn.Module)
    assert ms.hidden_size == hidden


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_sites_see_tensors_of_their_declared_width(models, model_type):
    """During a real forward pass, each site module reads d_in features and writes module_out."""
    model = models(model_type)
    ms = model_sites(model)
    paths = sorted({s.path for s in ms.sites.values()})
    with torch.no_grad(), capture(model, inputs=paths, outputs=paths) as got:
        model(_ids(model))
    for site in ms.sites.values():
        assert got.inputs[site.path].shape[-1] == site.d_in, site
        assert got.outputs[site.path].shape[-1] == site.module_out, site


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_norm_paths_feed_their_sites(models, model_type):
    """norms['attn'] produces what q reads; norms['mlp'] produces what up reads; the final norm
    produces what the LM head reads."""
    model = models(model_type)
    ms = model_sites(model)
    spec = ms.family
    assert set(spec.norms) == {"attn", "mlp"}
    norm_paths = [ms.norm_path(i, w) for i in range(ms.num_layers) for w in ("attn", "mlp")]
    site_paths = [ms.site(i, r).path for i in range(ms.num_layers) for r in ("q", "up")]
    head = model.get_output_embeddings()
    head_path = next(n for n, m in model.named_modules() if m is head)
    with torch.no_grad(), capture(model, inputs=site_paths + [head_path],
                                  outputs=norm_paths + [spec.final_norm]) as got:
        model(_ids(model))
    for i in range(ms.num_layers):
        torch.testing.assert_close(got.inputs[ms.site(i, "q").path], got.outputs[ms.norm_path(i, "attn")])
        torch.testing.assert_close(got.inputs[ms.site(i, "up").path], got.outputs[ms.norm_path(i, "mlp")])
    torch.testing.assert_close(got.inputs[head_path], got.outputs[spec.final_norm])


# ----------------------------------------------------------------------------------------------
# fused layouts: numerics


@pytest.mark.parametrize("model_type", FUSED_TYPES)
def test_fused_rows_equal_sliced_weight_projection(models, model_type):
    model = models(model_type)
    ms = model_sites(model)
    g = torch.Generator().manual_seed(1)
    for i in range(ms.num_layers):
        for name, parts in FUSED_MODULES[model_type].items():
            path = f"{ms.layer_paths[i]}.{name}"
            module = model.get_submodule(path)
            sites = sorted(ms.locate(path), key=lambda s: parts.index(s.role))
            assert [s.role for s in sites] == list(parts)
            d_in, out = _weight_dims(module)
            x = torch.randn(3, 5, d_in, generator=g)
            with torch.no_grad():
                y = module(x)
            assert y.shape[-1] == out
            bias = getattr(module, "bias", None)
            for site in sites:
                assert site.fused and site.module_out == out
                w = module.weight
                if site.transposed:
                    ref = x @ w[:, site.rows]
                else:
                    ref = x @ w[site.rows].T
                if bias is not None:
                    ref = ref + bias[site.rows]
                with torch.no_grad():
                    torch.testing.assert_close(y[..., site.rows], ref)
            # the parts partition the module's output rows
            all_rows = torch.cat([s.rows for s in sites])
            assert len(all_rows) == out
            assert torch.equal(all_rows.sort().values, torch.arange(out))


def test_fused_layouts_have_bias_where_expected(models):
    # The bias slice above is only meaningful if it is exercised somewhere.
    assert models("gpt2").transformer.h[0].attn.c_attn.bias is not None
    assert models("gpt_neox").gpt_neox.layers[0].attention.query_key_value.bias is not None


# ----------------------------------------------------------------------------------------------
# fused layouts: semantics (the rows are what the model itself uses as q / k / v, gate / up)


def _reproduce_split(model_type: str, module_name: str, out: torch.Tensor, config) -> dict:
    """Split a fused output exactly the way the transformers forward does, returned as
    [..., features] tensors per role (heads flattened head-major, as the model reshapes them)."""
    if model_type == "gpt_neox":
        head = config.hidden_size // config.num_attention_heads
        qkv = out.view(*out.shape[:-1], -1, 3 * head).transpose(1, 2)  # [B, H, T, 3*hd]
        q, k, v = qkv.chunk(3, dim=-1)
        flat = lambda t: t.transpose(1, 2).reshape(*out.shape[:-1], -1)  # noqa: E731
        return {"q": flat(q), "k": flat(k), "v": flat(v)}
    if model_type == "gpt2":
        q, k, v = out.split(config.hidden_size, dim=2)
        return {"q": q, "k": k, "v": v}
    if model_type == "phi3" and module_name == "self_attn.qkv_proj":
        hd = head_dim_of(config)
        query_pos = config.num_attention_heads * hd
        kv = config.num_key_value_heads * hd
        return {"q": out[..., :query_pos], "k": out[..., query_pos:query_pos + kv],
                "v": out[..., query_pos + kv:]}
    if model_type == "phi3" and module_name == "mlp.gate_up_proj":
        gate, up = out.chunk(2, dim=-1)
        return {"gate": gate, "up": up}
    raise AssertionError((model_type, module_name))


@pytest.mark.parametrize("model_type", FUSED_TYPES)
def test_fused_rows_match_reproduced_model_split(models, model_type):
    model = models(model_type)
    ms = model_sites(model)
    paths = [f"{lp}.{name}" for lp in ms.layer_paths for name in FUSED_MODULES[model_type]]
    with torch.no_grad(), capture(model, outputs=paths) as got:
        model(_ids(model))
    for i, lp in enumerate(ms.layer_paths):
        for name, parts in FUSED_MODULES[model_type].items():
            out = got.outputs[f"{lp}.{name}"]
            split = _reproduce_split(model_type, name, out, model.config)
            assert set(split) == set(parts)
            for role in parts:
                site = ms.site(i, role)
                assert site.path == f"{lp}.{name}"
                torch.testing.assert_close(out[..., site.rows], split[role], rtol=0, atol=0)


def _flat_heads(t: torch.Tensor) -> torch.Tensor:
    # [B, H, T, hd] -> [B, T, H*hd], the layout the projection wrote before the model reshaped it
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


@pytest.mark.parametrize("model_type", FUSED_TYPES)
def test_fused_rows_are_what_the_model_uses(models, monkeypatch, model_type):
    """Spy on the model's own q/k (as handed to rotary, i.e. before rotation) and v (as handed to
    attention), and on Phi-3's MLP activation and down_proj input; compare with the site rows of
    the fused output captured in the same forward pass."""
    model = copy.deepcopy(models(model_type))
    model.set_attn_implementation("eager")
    modeling = importlib.import_module(MODELING[model_type])
    rope_calls, attn_calls = [], []

    orig_attn = modeling.eager_attention_forward

    def attn_spy(module, query, key, value, *args, **kwargs):
        attn_calls.append((query.detach(), key.detach(), value.detach()))
        return orig_attn(module, query, key, value, *args, **kwargs)
    monkeypatch.setattr(modeling, "eager_attention_forward", attn_spy)
    if hasattr(modeling, "apply_rotary_pos_emb"):
        orig_rope = modeling.apply_rotary_pos_emb

        def rope_spy(q, k, *args, **kwargs):
            rope_calls.append((q.detach(), k.detach()))
            return orig_rope(q, k, *args, **kwargs)
        monkeypatch.setattr(modeling, "apply_rotary_pos_emb", rope_spy)

    ms = model_sites(model)
    fused_paths = [f"{lp}.{n}" for lp in ms.layer_paths for n in FUSED_MODULES[model_type]]
    act_paths = down_paths = []
    if model_type == "phi3":
        assert isinstance(model.get_submodule(f"{ms.layer_paths[0]}.mlp.activation_fn"), nn.Module)
        act_paths = [f"{lp}.mlp.activation_fn" for lp in ms.layer_paths]
        down_paths = [ms.site(i, "down").path for i in range(ms.num_layers)]
    with torch.no_grad(), capture(model, inputs=act_paths + down_paths, outputs=fused_paths) as got:
        model(_ids(model))

    assert len(attn_calls) == ms.num_layers
    assert len(rope_calls) == (0 if model_type == "gpt2" else ms.num_layers)
    for i, lp in enumerate(ms.layer_paths):
        site_q, site_k, site_v = (ms.site(i, r) for r in ("q", "k", "v"))
        out = got.outputs[site_q.path]
        q_att, k_att, v_att = attn_calls[i]
        if model_type == "gpt2":
            q_model, k_model = q_att, k_att  # no rotary: attention sees the raw q/k
        else:
            q_model, k_model = rope_calls[i]
        torch.testing.assert_close(out[..., site_q.rows], _flat_heads(q_model), rtol=0, atol=0)
        torch.testing.assert_close(out[..., site_k.rows], _flat_heads(k_model), rtol=0, atol=0)
        torch.testing.assert_close(out[..., site_v.rows], _flat_heads(v_att), rtol=0, atol=0)
        if model_type == "phi3":
            gate_up = got.outputs[ms.site(i, "gate").path]
            gate = gate_up[..., ms.site(i, "gate").rows]
            up = gate_up[..., ms.site(i, "up").rows]
            act = model.get_submodule(f"{lp}.mlp.activation_fn")
            torch.testing.assert_close(got.inputs[f"{lp}.mlp.activation_fn"], gate, rtol=0, atol=0)
            torch.testing.assert_close(got.inputs[ms.site(i, "down").path], up * act(gate))


def test_per_head_layout_is_interleaved():
    """GPT-NeoX rows: [h0: q k v][h1: q k v]... spelled out by hand for 2 heads of 3 dims."""
    cfg = type("C", (), dict(hidden_size=6, num_attention_heads=2))()
    lay = Fused(("q", "k", "v"), per_head=True)
    assert lay.rows("q", 18, cfg).tolist() == [0, 1, 2, 9, 10, 11]
    assert lay.rows("k", 18, cfg).tolist() == [3, 4, 5, 12, 13, 14]
    assert lay.rows("v", 18, cfg).tolist() == [6, 7, 8, 15, 16, 17]
    with pytest.raises(KeyError):
        lay.rows("gate", 18, cfg)


def test_attention_sizes_layout_is_gqa_aware():
    cfg = type("C", (), dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=8))()
    lay = Fused(("q", "k", "v"), sizes="attention")
    assert lay.rows("q", 48, cfg).tolist() == list(range(0, 32))
    assert lay.rows("k", 48, cfg).tolist() == list(range(32, 40))
    assert lay.rows("v", 48, cfg).tolist() == list(range(40, 48))
    with pytest.raises(ValueError, match="does not cover"):
        lay.rows("q", 96, cfg)


# ----------------------------------------------------------------------------------------------
# unknown architectures and registration


def _assert_helpful(err: Exception, model_type: str):
    msg = str(err)
    assert model_type in msg
    for mt in ("llama", "gpt_neox", "gpt2", "phi3", "opt", "mistral"):
        assert mt in msg
    assert "register_family" in msg


def test_unknown_model_type_string():
    with pytest.raises(UnsupportedArchitectureError) as ei:
        family_for("mamba_unknown")
    _assert_helpful(ei.value, "mamba_unknown")
    assert isinstance(ei.value, ValueError)


def test_unknown_model_type_on_model(models):
    model = copy.deepcopy(models("llama"))
    model.config = copy.deepcopy(model.config)
    model.config.model_type = "mamba_unknown"
    with pytest.raises(UnsupportedArchitectureError) as ei:
        model_sites(model)
    _assert_helpful(ei.value, "mamba_unknown")


def test_supported_model_types_lists_the_tiny_families():
    assert set(TINY_CONFIGS) <= set(fam.supported_model_types())
    assert fam.supported_model_types() == sorted(fam.supported_model_types())


def test_register_family_for_new_model_type(models, clean_registry):
    base = models("llama")
    model = copy.deepcopy(base)
    model.config = copy.deepcopy(base.config)
    model.config.model_type = "castlora_fake_llama"
    with pytest.raises(UnsupportedArchitectureError):
        model_sites(model)

    llama = family_for("llama")
    spec = FamilySpec(name="fake_llama", model_types=("castlora_fake_llama",), layers=llama.layers,
                      embed=llama.embed, final_norm=llama.final_norm, sites=dict(llama.sites),
                      norms=dict(llama.norms))
    register_family(spec)
    assert "castlora_fake_llama" in fam.supported_model_types()
    ms = model_sites(model)
    assert ms.family is spec
    ref = model_sites(base)
    assert ms.num_layers == ref.num_layers
    for key, site in ref.sites.items():
        assert ms.sites[key] == site

    # duplicate registration needs replace=True
    with pytest.raises(ValueError, match="replace=True"):
        register_family(spec)
    with pytest.raises(ValueError, match="already has a spec"):
        register_family(FamilySpec(name="evil", model_types=("llama",), layers="x", embed="y",
                                   final_norm="z", sites={}))
    assert family_for("llama") is llama  # the failed registration changed nothing

    spec2 = FamilySpec(name="fake_llama_v2", model_types=("castlora_fake_llama",), layers=llama.layers,
                       embed=llama.embed, final_norm=llama.final_norm,
                       sites={r: s for r, s in llama.sites.items() if r in ("q", "v")})
    register_family(spec2, replace=True)
    assert model_sites(model).roles == ("q", "v")


def test_registry_cleanup_left_no_trace():
    # runs after the registration test (file order): the fake model_type is gone again
    assert "castlora_fake_llama" not in fam._REGISTRY
    assert family_for("llama").name == "llama"


def test_spec_that_does_not_fit_the_model(models, clean_registry):
    model = copy.deepcopy(models("llama"))
    model.config = copy.deepcopy(model.config)
    model.config.model_type = "castlora_misfit"
    register_family(FamilySpec(name="misfit", model_types=("castlora_misfit",), layers="transformer.h",
                               embed="transformer.wte", final_norm="transformer.ln_f",
                               sites={"q": SiteSpec("attn.c_attn")}))
    with pytest.raises(UnsupportedArchitectureError, match="does not fit"):
        model_sites(model)


# ----------------------------------------------------------------------------------------------
# peft-wrapped models resolve to the same sites


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_model_sites_through_peft(models, model_type):
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(models(model_type))
    ref = model_sites(base)
    targets = {"llama": ["q_proj", "v_proj", "down_proj"],
               "gpt_neox": ["query_key_value", "dense_4h_to_h"]}[model_type]
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    ms = model_sites(wrapped)
    assert ms.num_layers == ref.num_layers
    for key, site in ref.sites.items():
        got = ms.sites[key]
        assert (got.path, got.d_in, got.d_out, got.module_out) == (site.path, site.d_in, site.d_out,
                                                                 site.module_out)
        if site.rows is not None:
            assert torch.equal(got.rows, site.rows)


# ----------------------------------------------------------------------------------------------
# the zoo models


def _load_zoo(name):
    path = shared_path("zoo", name)
    if not (path / "config.json").exists():
        pytest.skip(f"{path} has no model")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_zoo_llama():
    model = _load_zoo("llama")
    ms = model_sites(model)
    assert ms.family.name == "llama"
    assert ms.num_layers == 6 and ms.hidden_size == 160
    for i in range(6):
        q, k = ms.site(i, "q"), ms.site(i, "k")
        assert (q.d_in, q.d_out) == (160, 160) and not q.fused
        assert (k.d_in, k.d_out) == (160, 160)
        assert ms.site(i, "gate").d_out == ms.site(i, "up").d_out == model.config.intermediate_size
        assert ms.site(i, "down").d_in == model.config.intermediate_size


def test_zoo_mistral():
    model = _load_zoo("mistral")
    ms = model_sites(model)
    assert ms.family.name == "llama"  # mistral shares the llama layout
    assert ms.num_layers == 4 and ms.hidden_size == 192
    for i in range(4):
        assert (ms.site(i, "q").d_in, ms.site(i, "q").d_out) == (192, 192)
        assert (ms.site(i, "k").d_in, ms.site(i, "k").d_out) == (192, 64)  # GQA: 2 kv heads x 32
        assert (ms.site(i, "v").d_in, ms.site(i, "v").d_out) == (192, 64)
        assert (ms.site(i, "o").d_in, ms.site(i, "o").d_out) == (192, 192)


def test_zoo_neox(monkeypatch):
    model = _load_zoo("neox")
    ms = model_sites(model)
    assert ms.family.name == "gpt_neox"
    assert ms.num_layers == 6 and ms.hidden_size == 128
    assert ms.roles == ("q", "k", "v", "o", "up", "down")
    for i in range(6):
        parts = [ms.site(i, r) for r in ("q", "k", "v")]
        assert all(s.fused and s.d_out == 128 and s.module_out == 384 and s.d_in == 128 for s in parts)
        assert len({s.path for s in parts}) == 1
        rows = torch.cat([s.rows for s in parts]).sort().values
        assert torch.equal(rows, torch.arange(384))
    # and on the real weights the q rows are the model's q (before rotary)
    modeling = importlib.import_module(MODELING["gpt_neox"])
    calls = []
    orig = modeling.apply_rotary_pos_emb

    def rope_spy(q, k, *a, **kw):
        calls.append((q.detach(), k.detach()))
        return orig(q, k, *a, **kw)
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", rope_spy)
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture(model, outputs=[ms.site(0, "q").path]) as got:
        model(ids)
    out = got.outputs[ms.site(0, "q").path]
    torch.testing.assert_close(out[..., ms.site(0, "q").rows], _flat_heads(calls[0][0]), rtol=0, atol=0)
    torch.testing.assert_close(out[..., ms.site(0, "k").rows], _flat_heads(calls[0][1]), rtol=0, atol=0)
