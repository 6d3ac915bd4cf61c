"""The supported families, one spec each. Adding a family is adding an entry here (or calling
`castlora.families.register_family` from your own code): no other file changes."""

from __future__ import annotations

from .base import FamilySpec, Fused, SiteSpec

_LLAMA_SITES = {
    "q": SiteSpec("self_attn.q_proj"),
    "k": SiteSpec("self_attn.k_proj"),
    "v": SiteSpec("self_attn.v_proj"),
    "o": SiteSpec("self_attn.o_proj"),
    "gate": SiteSpec("mlp.gate_proj"),
    "up": SiteSpec("mlp.up_proj"),
    "down": SiteSpec("mlp.down_proj"),
}
_LLAMA_NORMS = {"attn": "input_layernorm", "mlp": "post_attention_layernorm"}

LLAMA = FamilySpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "granite", "olmo", "olmo2"),
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    sites=_LLAMA_SITES, norms=_LLAMA_NORMS,
    notes="Llama layout: separate q/k/v/o, SwiGLU gate/up/down, pre-norm.",
)

GEMMA2 = FamilySpec(
    name="gemma2",
    model_types=("gemma2", "gemma3_text"),
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    sites=_LLAMA_SITES,
    norms={"attn": "input_layernorm", "mlp": "pre_feedforward_layernorm"},
    notes="Gemma-2: Llama sites, sandwich norms (pre/post feed-forward).",
)

PHI3 = FamilySpec(
    name="phi3",
    model_types=("phi3",),
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    sites={
        "q": SiteSpec("self_attn.qkv_proj", Fused(("q", "k", "v"), sizes="attention")),
        "k": SiteSpec("self_attn.qkv_proj", Fused(("q", "k", "v"), sizes="attention")),
        "v": SiteSpec("self_attn.qkv_proj", Fused(("q", "k", "v"), sizes="attention")),
        "o": SiteSpec("self_attn.o_proj"),
        "gate": SiteSpec("mlp.gate_up_proj", Fused(("gate", "up"))),
        "up": SiteSpec("mlp.gate_up_proj", Fused(("gate", "up"))),
        "down": SiteSpec("mlp.down_proj"),
    },
    norms=_LLAMA_NORMS,
    notes="Phi-3: fused qkv_proj = [q | k | v] (GQA sizes) and gate_up_proj = [gate | up].",
)

GPT2 = FamilySpec(
    name="gpt2",
    model_types=("gpt2",),
    layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
    sites={
        "q": SiteSpec("attn.c_attn", Fused(("q", "k", "v"))),
        "k": SiteSpec("attn.c_attn", Fused(("q", "k", "v"))),
        "v": SiteSpec("attn.c_attn", Fused(("q", "k", "v"))),
        "o": SiteSpec("attn.c_proj"),
        "up": SiteSpec("mlp.c_fc"),
        "down": SiteSpec("mlp.c_proj"),
    },
    norms={"attn": "ln_1", "mlp": "ln_2"},
    transposed=True,
    notes="GPT-2: Conv1D weights stored (in, out); fused c_attn = [q | k | v]; no gated MLP.",
)

GPT_NEOX = FamilySpec(
    name="gpt_neox",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
    sites={
        "q": SiteSpec("attention.query_key_value", Fused(("q", "k", "v"), per_head=True)),
        "k": SiteSpec("attention.query_key_value", Fused(("q", "k", "v"), per_head=True)),
        "v": SiteSpec("attention.query_key_value", Fused(("q", "k", "v"), per_head=True)),
        "o": SiteSpec("attention.dense"),
        "up": SiteSpec("mlp.dense_h_to_4h"),
        "down": SiteSpec("mlp.dense_4h_to_h"),
    },
    norms={"attn": "input_layernorm", "mlp": "post_attention_layernorm"},
    notes="GPT-NeoX: query_key_value interleaved per head ([h0: q k v][h1: q k v]...); no gated MLP.",
)

OPT = FamilySpec(
    name="opt",
    model_types=("opt",),
    layers="model.decoder.layers", embed="model.decoder.embed_tokens",
    final_norm="model.decoder.final_layer_norm",
    sites={
        "q": SiteSpec("self_attn.q_proj"),
        "k": SiteSpec("self_attn.k_proj"),
        "v": SiteSpec("self_attn.v_proj"),
        "o": SiteSpec("self_attn.out_proj"),
        "up": SiteSpec("fc1"),
        "down": SiteSpec("fc2"),
    },
    norms={"attn": "self_attn_layer_norm", "mlp": "final_layer_norm"},
    notes="OPT: fc1/fc2 MLP (no gate).",
)

BUILTIN_FAMILIES = (LLAMA, GEMMA2, PHI3, GPT2, GPT_NEOX, OPT)
