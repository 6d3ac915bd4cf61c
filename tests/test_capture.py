"""`castlora.capture.capture`: records module inputs/outputs and logits, converts them as asked,
and never leaves a hook behind (also when the forward pass raises)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIGS, make_tiny
from torch import nn

from castlora.capture import Captured, capture
from castlora.families import model_sites

L0 = "model.layers.0"
Q0 = "model.layers.0.self_attn.q_proj"
NORM0 = "model.layers.0.input_layernorm"
ATTN1 = "model.layers.1.self_attn"
O1 = "model.layers.1.self_attn.o_proj"
DOWN1 = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama")


def _ids(batch=2, seq=6, seed=0, vocab=128):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hook_count(model: nn.Module) -> int:
    """Forward (pre-)hooks on every module. The *_with_kwargs dicts only flag ids of the main
    dicts; a flag whose hook is gone would be a leak too, so they are checked, not counted."""
    n = 0
    for m in model.modules():
        assert set(m._forward_pre_hooks_with_kwargs) <= set(m._forward_pre_hooks)
        assert set(m._forward_hooks_with_kwargs) <= set(m._forward_hooks)
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return n


# ----------------------------------------------------------------------------------------------
# what is recorded


def test_captures_inputs_outputs_and_logits(llama):
    ids = _ids()
    assert any(p.requires_grad for p in llama.parameters())  # so detaching actually matters
    with capture(llama, inputs=[Q0, DOWN1, L0], outputs=[L0, ATTN1, O1, Q0, NORM0], logits=True) as got:
        out = llama(ids, output_hidden_states=True)
    assert isinstance(got, Captured)
    assert set(got.inputs) == {Q0, DOWN1, L0}
    assert set(got.outputs) == {L0, ATTN1, O1, Q0, NORM0}

    # logits: exactly the model's
    assert got.logits is not None
    assert got.logits.shape == (2, 6, llama.config.vocab_size)
    torch.testing.assert_close(got.logits, out.logits.detach(), rtol=0, atol=0)

    # module input/output relations
    hs = out.hidden_states
    torch.testing.assert_close(got.inputs[L0], hs[0].detach(), rtol=0, atol=0)
    torch.testing.assert_close(got.outputs[L0], hs[1].detach(), rtol=0, atol=0)
    torch.testing.assert_close(got.inputs[Q0], got.outputs[NORM0], rtol=0, atol=0)
    w = llama.get_submodule(Q0).weight.detach()
    torch.testing.assert_close(got.outputs[Q0], F.linear(got.inputs[Q0], w))
    assert got.inputs[DOWN1].shape == (2, 6, llama.config.intermediate_size)

    # self_attn returns a tuple (attn_output, attn_weights): the captured output is the hidden tensor
    assert isinstance(got.outputs[ATTN1], torch.Tensor)
    assert got.outputs[ATTN1].shape == (2, 6, llama.config.hidden_size)
    torch.testing.assert_close(got.outputs[ATTN1], got.outputs[O1], rtol=0, atol=0)

    # detached by default, even outside no_grad
    for t in [*got.inputs.values(), *got.outputs.values(), got.logits]:
        assert not t.requires_grad and t.grad_fn is None
        assert t.dtype == torch.float32 and t.device.type == "cpu"


def test_tuple_output_module_is_captured_as_its_first_tensor():
    class Pair(nn.Module):
        def forward(self, x):
            return (x * 2, (x * 3, None), None)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return self.pair(x)[0]

    m, x = Wrap(), torch.randn(3, 4)
    with capture(m, inputs=["pair"], outputs=["pair"]) as got:
        m(x)
    torch.testing.assert_close(got.outputs["pair"], x * 2)
    torch.testing.assert_close(got.inputs["pair"], x)


def test_input_passed_by_keyword_is_captured():
    lin = nn.Linear(4, 3)

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(input=x)  # no positional args at all

    m, x = Kw(), torch.randn(2, 4)
    with capture(m, inputs=["lin"], outputs=["lin"]) as got:
        y = m(x)
    torch.testing.assert_close(got.inputs["lin"], x)
    torch.testing.assert_close(got.outputs["lin"], y.detach())


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_decoder_layer_inputs_and_outputs_every_family(model_type):
    """Decoder layers (called positionally or by keyword, returning a tensor or a tuple) are
    captured as the residual stream that output_hidden_states reports."""
    model = make_tiny(model_type)
    ms = model_sites(model)
    with torch.no_grad(), capture(model, inputs=ms.layer_paths, outputs=ms.layer_paths,
                                  logits=True) as got:
        out = model(_ids(), output_hidden_states=True)
    assert len(out.hidden_states) == ms.num_layers + 1
    for i, lp in enumerate(ms.layer_paths):
        torch.testing.assert_close(got.inputs[lp], out.hidden_states[i], rtol=0, atol=0)
        if i < ms.num_layers - 1:  # the last entry has the final norm applied
            torch.testing.assert_close(got.outputs[lp], out.hidden_states[i + 1], rtol=0, atol=0)
    if getattr(model.config, "final_logit_softcapping", None):
        # Gemma-2 soft-caps *after* the LM head; capture records the LM head's output (documented:
        # "the output of the model's output embedding"), so it differs from model(...).logits.
        cap = model.config.final_logit_softcapping
        torch.testing.assert_close(torch.tanh(got.logits / cap) * cap, out.logits)
    else:
        torch.testing.assert_close(got.logits, out.logits, rtol=0, atol=0)


def test_last_call_wins(llama):
    with torch.no_grad(), capture(llama, inputs=[Q0], logits=True) as got:
        llama(_ids(seed=1))
        out2 = llama(_ids(seed=2, seq=4))
    assert got.logits.shape[1] == 4
    torch.testing.assert_close(got.logits, out2.logits, rtol=0, atol=0)
    assert got.inputs[Q0].shape[1] == 4


def test_duplicate_paths_register_once(llama):
    before = hook_count(llama)
    with capture(llama, inputs=[Q0, Q0], outputs=[Q0, Q0, Q0]) as got:
        assert hook_count(llama) == before + 2
        with torch.no_grad():
            llama(_ids())
    assert set(got.inputs) == set(got.outputs) == {Q0}
    assert hook_count(llama) == before


def test_nothing_requested_records_nothing(llama):
    with torch.no_grad(), capture(llama) as got:
        llama(_ids())
    assert got.inputs == {} and got.outputs == {} and got.logits is None


# ----------------------------------------------------------------------------------------------
# conversions


def test_dtype_and_device_conversion(llama):
    ids = _ids()
    with torch.no_grad(), capture(llama, inputs=[Q0], outputs=[L0], logits=True) as ref:
        llama(ids)
    with torch.no_grad(), capture(llama, inputs=[Q0], outputs=[L0], logits=True,
                                  dtype=torch.float64, device="cpu") as got:
        llama(ids)
    for t in [got.inputs[Q0], got.outputs[L0], got.logits]:
        assert t.dtype == torch.float64 and t.device == torch.device("cpu")
    torch.testing.assert_close(got.inputs[Q0], ref.inputs[Q0].double(), rtol=0, atol=0)
    torch.testing.assert_close(got.outputs[L0], ref.outputs[L0].double(), rtol=0, atol=0)
    torch.testing.assert_close(got.logits, ref.logits.double(), rtol=0, atol=0)

    # device alone keeps the dtype; dtype alone keeps the device
    with torch.no_grad(), capture(llama, outputs=[L0], device=torch.device("cpu")) as dev_only:
        llama(ids)
    assert dev_only.outputs[L0].dtype == torch.float32
    with torch.no_grad(), capture(llama, outputs=[L0], dtype=torch.bfloat16) as dt_only:
        llama(ids)
    assert dt_only.outputs[L0].dtype == torch.bfloat16 and dt_only.outputs[L0].device.type == "cpu"


def test_detach_false_keeps_the_graph(llama):
    ids = _ids()
    embeds = llama.get_input_embeddings()(ids).detach().requires_grad_(True)
    with capture(llama, inputs=[Q0], outputs=[Q0, L0], logits=True, detach=False) as got:
        llama(inputs_embeds=embeds)
    for t in [got.inputs[Q0], got.outputs[Q0], got.outputs[L0], got.logits]:
        assert t.requires_grad and t.grad_fn is not None
    got.outputs[Q0].pow(2).sum().backward(retain_graph=True)
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert torch.isfinite(embeds.grad).all()

    # the gradient is the one of the real computation
    g_capture = embeds.grad.clone()
    embeds.grad = None
    x = llama.get_submodule(NORM0)(embeds)
    llama.get_submodule(Q0)(x).pow(2).sum().backward()
    torch.testing.assert_close(g_capture, embeds.grad)

    # logits keep their graph too, and conversion (float64) is differentiable
    embeds.grad = None
    with capture(llama, logits=True, detach=False, dtype=torch.float64) as got64:
        llama(inputs_embeds=embeds)
    assert got64.logits.dtype == torch.float64 and got64.logits.requires_grad
    got64.logits[:, -1].logsumexp(-1).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    llama.zero_grad(set_to_none=True)


def test_detach_true_cuts_the_graph(llama):
    embeds = llama.get_input_embeddings()(_ids()).detach().requires_grad_(True)
    with capture(llama, outputs=[Q0], logits=True) as got:
        out = llama(inputs_embeds=embeds)
    assert out.logits.requires_grad  # the model's own output still has its graph
    assert not got.outputs[Q0].requires_grad and not got.logits.requires_grad


# ----------------------------------------------------------------------------------------------
# hooks never outlive the block


def test_hooks_removed_after_block(llama):
    before = hook_count(llama)
    with capture(llama, inputs=[Q0, DOWN1], outputs=[L0, ATTN1], logits=True) as got:
        assert hook_count(llama) == before + 5
        with torch.no_grad():
            llama(_ids())
    assert hook_count(llama) == before
    # a later forward pass records nothing more
    snapshot = got.logits.clone()
    with torch.no_grad():
        llama(_ids(seed=5, seq=3))
    torch.testing.assert_close(got.logits, snapshot, rtol=0, atol=0)
    assert got.inputs[Q0].shape[1] == 6


def test_hooks_removed_when_forward_raises(llama):
    before = hook_count(llama)
    bad = _ids()
    bad[0, 2] = llama.config.vocab_size + 100  # out of range for the embedding
    with pytest.raises((IndexError, RuntimeError)):
        with capture(llama, inputs=[Q0], outputs=[L0, ATTN1], logits=True):
            assert hook_count(llama) > before
            llama(bad)
    assert hook_count(llama) == before


def test_hooks_removed_when_forward_raises_midway(llama):
    """The exception comes from inside the network, after some hooks already fired."""
    before = hook_count(llama)

    def boom(module, args):
        raise RuntimeError("boom in layer 1")
    h = llama.get_submodule("model.layers.1").register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom in layer 1"):
            with capture(llama, inputs=[Q0], outputs=[L0], logits=True) as got:
                with torch.no_grad():
                    llama(_ids())
    finally:
        h.remove()
    assert hook_count(llama) == before
    assert Q0 in got.inputs and L0 in got.outputs and got.logits is None


def test_hooks_removed_when_block_raises(llama):
    before = hook_count(llama)
    with pytest.raises(KeyError, match="user error"):
        with capture(llama, inputs=[Q0], outputs=[L0], logits=True):
            with torch.no_grad():
                llama(_ids())
            raise KeyError("user error")
    assert hook_count(llama) == before


def test_hooks_removed_when_a_path_is_bad(llama):
    before = hook_count(llama)
    with pytest.raises(AttributeError):
        with capture(llama, inputs=[Q0, DOWN1], outputs=[L0, "model.layers.0.no_such_module"]):
            pass  # pragma: no cover
    assert hook_count(llama) == before


def test_logits_without_output_embedding(llama):
    base = llama.model  # the bare decoder: no LM head
    if base.get_output_embeddings() is not None:
        pytest.skip("bare model has an output embedding in this transformers version")
    before = hook_count(base)
    with pytest.raises(ValueError, match="no output embedding"):
        with capture(base, inputs=["layers.0.self_attn.q_proj"], logits=True):
            pass  # pragma: no cover
    assert hook_count(base) == before


def test_nested_captures_are_independent(llama):
    before = hook_count(llama)
    with capture(llama, outputs=[L0]) as outer:
        with capture(llama, outputs=[L0], logits=True, dtype=torch.float64) as inner:
            with torch.no_grad():
                llama(_ids(seed=1))
        assert hook_count(llama) == before + 1
        with torch.no_grad():
            llama(_ids(seed=2, seq=3))
    assert hook_count(llama) == before
    assert outer.outputs[L0].shape[1] == 3 and outer.outputs[L0].dtype == torch.float32
    assert inner.outputs[L0].shape[1] == 6 and inner.outputs[L0].dtype == torch.float64
