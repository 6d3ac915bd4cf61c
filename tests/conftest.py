"""Shared fixtures: tiny random models of every supported family, real tokenizers, real text."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHARED = Path(os.environ.get("CASTLORA_SHARED", Path(__file__).resolve().parents[2] / "shared"))

# Small enough to build in milliseconds, large enough to have GQA, several heads and layers.
_COMMON = dict(vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "mistral": dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
                    num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "qwen3": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8),
    "gemma": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=8),
    "gemma2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8),
    "phi3": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     rotary_pct=0.25),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32),
}


def make_tiny(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised causal LM of `model_type`, float32, eval mode."""
    kwargs = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    if model_type == "gpt2":
        kwargs.pop("max_position_embeddings")
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init in transformers is small; give weights real spread so deltas are visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny matmuls on a 2-core machine: one intra-op thread is many times faster than two,
    and the subprocess tests below pin OMP_NUM_THREADS=1 for the same reason."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny():
    return make_tiny


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"offline asset {p} not found (set CASTLORA_SHARED)")
    return p


def read_docs(*parts: str, n: int | None = None) -> list[str]:
    path = shared_path(*parts)
    docs = [d for d in gzip.open(path, "rt", encoding="utf-8").read().split("\n\n\n") if d.strip()]
    return docs[:n] if n else docs


@pytest.fixture(scope="session")
def zoo():
    def _zoo(name: str) -> Path:
        return shared_path("zoo", name)
    return _zoo


def model_folder(folder: Path, model_type: str, vocab: int, tokenizer_from: Path, seed: int) -> Path:
    """A tiny random model of `model_type` saved as a model folder, with a real tokenizer copied beside it."""
    import shutil

    model = make_tiny(model_type, seed, vocab_size=vocab, max_position_embeddings=128)
    model.save_pretrained(str(folder), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


def make_lora(model, targets, seed=0, std=0.3, **kw):
    """A rank-4 LoRA on `targets` with random A and B (a real delta from the start)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return pm.eval()


def ports_for(kernels, t_sites, layer_map):
    """A PortedKernel on its target site for each kernel (none may be dropped)."""
    from castlora.cast_module import PortedKernel
    from castlora.site_map import map_sites

    pairs, dropped = map_sites(kernels, t_sites, layer_map)
    assert not dropped
    return [(PortedKernel(p.kernel, p.target), p.target) for p in pairs]
