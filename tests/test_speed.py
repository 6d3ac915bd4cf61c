"""The step's speed and memory options change how it is computed, never what it computes:
shared-vocabulary logits, checkpointed target blocks, autocast, and the precomputed teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_lora as _make_lora
from conftest import make_tiny, read_docs, shared_path
from conftest import model_folder as _model_folder
from conftest import ports_for as _ports
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import castlora
from castlora.adapters import load_adapter
from castlora.capture import capture
from castlora.cast_module import PortedKernel, attached, deltas_off
from castlora.checkpointing import checkpointed_blocks
from castlora.closed_form import random_init
from castlora.errors import CastloraError
from castlora.families import model_sites
from castlora.losses import delta_teacher, kl_divergence, relative_mse, shared_log_probs, topk_kl
from castlora.models import load_model
from castlora.pair import ModelPair
from castlora.site_map import map_sites, proportional_layer_map
from castlora.teachers import make_teacher, source_z
from castlora.tokens import PairBatch, SharedVocab
from castlora.train import LoopConfig, cast_loss, head_optimizer, kernel_mse, step_setup
from castlora.vocab_head import SharedVocabHead, shared_logits

IDS = torch.tensor([5, 3, 90, 17, 64, 2, 127])
QUIET = dict(progress=False, log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny llama (real Llama tokenizer) with a LoRA, a tiny GPT-NeoX (real NeoX tokenizer), general text."""
    root = tmp_path_factory.mktemp("speed")
    llama = _model_folder(root / "llama", "llama", 32000, shared_path("zoo", "llama"), 0)
    neox = _model_folder(root / "neox", "gpt_neox", 50304, shared_path("zoo", "neox"), 1)
    pm = _make_lora(load_model(str(llama)), ["q_proj", "v_proj"], seed=0, std=0.5)
    pm.peft_config["default"].base_model_name_or_path = str(llama)
    pm.save_pretrained(str(root / "adapter"))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n\n".join(read_docs("data", "general", "valid.txt.gz", n=200)), encoding="utf-8")
    return dict(root=root, llama=llama, neox=neox, adapter=root / "adapter", corpus=corpus)


@pytest.mark.parametrize("model_type, extra", [
    ("llama", {}), ("gpt_neox", {}), ("gpt2", {}), ("opt", {}), ("phi3", {}),
    ("gemma2", {"final_logit_softcapping": 3.0}),  # elementwise after the head: still applies
    ("llama", {"tie_word_embeddings": True}),
])
def test_shared_logits_equal_the_selected_columns(model_type, extra):
    model = make_tiny(model_type, **extra)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        head = model.get_output_embeddings()
        with shared_logits(model, IDS) as cols:
            assert cols is None and isinstance(model.get_output_embeddings(), SharedVocabHead)
            part = model(input_ids=ids).logits
    assert model.get_output_embeddings() is head  # restored
    assert part.shape[-1] == len(IDS)
    torch.testing.assert_close(part, full[..., IDS], rtol=1e-5, atol=1e-5)


def test_shared_logits_fall_back_when_the_head_cannot_be_swapped():
    model = make_tiny("llama")
    model.set_output_embeddings(torch.nn.Sequential(model.get_output_embeddings()))  # not a plain Linear
    with shared_logits(model, IDS) as cols:
        assert cols is IDS  # the caller selects the columns itself


def _batch(seed=0, b=3, length=20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (b, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # right padding, as in real batches (an attention mask the model must use)
    pos = torch.arange(length).expand(b, -1)
    keep = (torch.rand(b, length, generator=g) > 0.2) & mask.bool()  # some positions unaligned
    return PairBatch(ids, mask, ids.clone(), mask.clone(), pos * keep, pos * keep, keep)


@pytest.fixture(params=["gpt_neox", "mistral"])
def step_parts(tmp_path, request):
    src = make_tiny("llama", 0)
    pm = _make_lora(src, ["q_proj", "v_proj"], seed=0, std=0.5)
    pm.save_pretrained(str(tmp_path / "adapter"))
    pm.requires_grad_(False)
    tgt = make_tiny(request.param, 1).requires_grad_(False)
    s_sites, t_sites = model_sites(pm.base_model.model), model_sites(tgt)
    lora = load_adapter(str(tmp_path / "adapter"), s_sites)
    ports = _ports(lora.kernels, t_sites, proportional_layer_map(2, t_sites.num_layers))
    random_init(ports, 0)
    vocab = SharedVocab(torch.arange(3, 120), torch.arange(3, 120).flip(0))  # a permuted map
    return ModelPair(pm, tgt, None, None, s_sites, t_sites, ports), vocab


def _loss_and_grads(step_parts, cfg, teacher="source", restrict=True, cache=None, step=0):
    pair, vocab = step_parts
    teacher = make_teacher(teacher)
    for port, _ in pair.ports:
        port.record = cfg.beta > 0
        port.zero_grad(set_to_none=True)
    batch = _batch()
    with attached(pair.target, pair.ports) as pair.wrappers:
        if restrict:
            with step_setup(pair, vocab, pair.t_sites.layer_paths, cfg) as cols:
                loss, kl, mse = cast_loss(pair, batch, cols, cfg, teacher, cache, step)
                loss.backward()
        else:
            loss, kl, mse = cast_loss(pair, batch, vocab, cfg, teacher, cache, step)
            loss.backward()
    grads = [p.grad.clone() for port, _ in pair.ports for p in port.parameters()]
    return loss.detach(), kl.detach(), mse.detach(), grads


def test_every_teacher_is_a_blend_and_the_control_switches_only_the_lora_off(step_parts):
    """source / blend / delta are log p_S+LoRA + w (log p_T - log p_S) at w = 0 / --delta-weight / 1;
    --no-teacher-lora puts the source base in the place of S+LoRA and changes nothing else."""
    pair, vocab = step_parts
    pm, tgt = pair.source, pair.target
    batch = _batch()
    with attached(tgt, pair.ports) as pair.wrappers, torch.no_grad():
        wrappers = pair.wrappers

        def teach(teacher, w=0.5, lora=True):
            return make_teacher(teacher, w, lora).outputs(pair, batch, vocab, 1.0, False).logp

        def logp(model, ids, mask, pos, cols):  # gathered by boolean masks: a reference for batch.gather
            out = model(input_ids=ids, attention_mask=mask).logits
            rows = torch.arange(pos.shape[0])[:, None].expand_as(pos)
            return shared_log_probs(out[rows[batch.pos_mask], pos[batch.pos_mask]], cols)

        lp_sl = logp(pm, batch.ids_s, batch.mask_s, batch.pos_s, vocab.ids_s)
        with pm.disable_adapter():
            lp_s = logp(pm, batch.ids_s, batch.mask_s, batch.pos_s, vocab.ids_s)
        with deltas_off(wrappers):  # the target's own base
            lp_t = logp(tgt, batch.ids_t, batch.mask_t, batch.pos_t, vocab.ids_t)
        close = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(teach("source"), lp_sl, **close)
        torch.testing.assert_close(teach("blend", 0.0), lp_sl, **close)
        torch.testing.assert_close(teach("blend", 0.3), delta_teacher(lp_t, lp_sl, lp_s, 0.3), **close)
        torch.testing.assert_close(teach("delta", 0.3), delta_teacher(lp_t, lp_sl, lp_s, 1.0), **close)  # w fixed
        # the imitation controls: the LoRA off, the rest of the teacher as it was
        torch.testing.assert_close(teach("source", lora=False), lp_s, **close)
        torch.testing.assert_close(teach("blend", 0.3, lora=False), torch.log_softmax(lp_s + 0.3 * (lp_t - lp_s), -1),
                                   **close)
        torch.testing.assert_close(teach("delta", lora=False), lp_t, **close)  # no LoRA, no tilt: the target
        assert kl_divergence(teach("blend", 0.3), teach("blend", 0.3, lora=False)).item() > 1e-3


@pytest.mark.parametrize("teacher", ["source", "delta"])
def test_restricted_logits_and_checkpointing_leave_loss_and_gradients_unchanged(step_parts, teacher):
    plain = _loss_and_grads(step_parts, LoopConfig(steps=1), teacher, restrict=False)
    fast = _loss_and_grads(step_parts, LoopConfig(steps=1, checkpointing=True), teacher)
    assert plain[1] > 1e-3 and plain[2] > 1e-3  # a real KL and MSE, not zeros
    for a, b in zip(plain[:3], fast[:3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(plain[3], fast[3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in fast[3])


def test_checkpointed_blocks_recompute_and_restore(monkeypatch):
    model = make_tiny("llama")
    paths = model_sites(model).layer_paths
    block = model.get_submodule(paths[0])
    calls = []
    cls_forward = type(block).forward
    monkeypatch.setattr(type(block), "forward", lambda self, *a, **k: (calls.append(1), cls_forward(self, *a, **k))[1])
    x = model.get_input_embeddings()(torch.tensor([[4, 5, 6]])).detach().requires_grad_(True)
    with checkpointed_blocks(model, paths[:1]):
        assert "forward" in vars(block)
        model(inputs_embeds=x).logits.sum().backward()
    # both blocks run forward (the class is patched), and block 0 alone again in the backward pass
    assert len(calls) == 3
    assert "forward" not in vars(block)  # the class's forward again
    grad_ckpt = x.grad.clone()
    x.grad = None
    model(inputs_embeds=x).logits.sum().backward()
    assert len(calls) == 5  # no recomputation
    torch.testing.assert_close(x.grad, grad_ckpt)
    with torch.no_grad(), checkpointed_blocks(model, paths):
        model(inputs_embeds=x)  # no grad: no checkpoint, one call per block
    assert len(calls) == 7
    # a block that already has an instance forward (accelerate's hook, under --device-map) gets it back,
    # and the checkpointed forward runs through it
    hooked_calls = []
    hooked = lambda *a, **k: (hooked_calls.append(1), cls_forward(block, *a, **k))[1]  # noqa: E731
    block.forward = hooked
    with checkpointed_blocks(model, paths[:1]):
        assert block.forward is not hooked
        model(inputs_embeds=x).logits.sum().backward()
    assert block.forward is hooked and len(hooked_calls) == 2  # forward, then the recomputation


def test_the_step_batched_over_kernels_equals_the_per_kernel_reference(step_parts):
    """The step's kernel-level work done together (the fused add of each delta, the MSE term's gathers
    and reductions, the source-side views of q, k and v from one matmul) computes what one kernel at a
    time computes: the same deltas, MSE, loss and head gradients, on split targets (mistral) and on
    fused ones (gpt_neox: each delta written into its role's rows of query_key_value)."""
    pair, vocab = step_parts
    pm, inner, ports = pair.source, pair.source_inner, pair.ports
    batch = _batch()
    with attached(pair.target, ports) as pair.wrappers:
        # each port's addition against y + its delta, values and gradients
        x = torch.randn(2, 5, ports[0][1].d_in, requires_grad=True)
        for port, site in ports:
            y = torch.randn(2, 5, site.module_out, requires_grad=True)
            fused = port.added_to(y, x, site.rows)
            plain = y + port(x) if site.rows is None else y.index_add(-1, site.rows, port(x))
            torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
            g = torch.randn_like(plain)
            got = torch.autograd.grad(fused, [x, y, *port.parameters()], g)
            want = torch.autograd.grad(plain, [x, y, *port.parameters()], g)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # the source-side views: one gather and matmul per source module, against one per kernel
        modules = sorted({p.source_module for p, _ in ports})
        with torch.no_grad(), capture(inner, inputs=modules) as cap:
            pm(input_ids=batch.ids_s, attention_mask=batch.mask_s)
        ref = [batch.gather(cap.inputs[p.source_module], "s").float() @ p.in_basis for p, _ in ports]
        assert cap.inputs[modules[0]].data_ptr() == cap.inputs[modules[1]].data_ptr()  # q and v: one tensor
        for a, b in zip(source_z(ports, cap.inputs, batch), ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # the MSE term of a real step against the per-kernel mean
        cfg = LoopConfig(steps=1)
        for port, _ in ports:
            port.record = True
        loss, kl, mse = cast_loss(pair, batch, vocab, cfg, make_teacher("source"))
        want = sum(relative_mse(batch.gather(p.last_z, "t"), z) for (p, _), z in zip(ports, ref)) / len(ports)
        assert mse.item() > 1e-3
        torch.testing.assert_close(mse, want, rtol=1e-5, atol=1e-7)
        for port, _ in ports:
            port.record, port.last_z = False, None


def test_kernel_mse_groups_kernels_of_different_widths():
    """Kernels of ranks 4 and 6 (two groups) give the mean of their relative MSEs, and its gradient."""
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(1)
    batch = _batch()
    zs_t = [torch.randn(3, 20, r, generator=g, requires_grad=True) for r in (4, 6, 4, 6, 6)]
    zs_s = [torch.randn(batch.num_aligned, r, generator=g) for r in (4, 6, 4, 6, 6)]
    ports = [(SimpleNamespace(last_z=z), None) for z in zs_t]
    got = kernel_mse(ports, zs_s, batch)
    want = sum(relative_mse(batch.gather(t, "t"), s) for t, s in zip(zs_t, zs_s)) / len(zs_t)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, zs_t), torch.autograd.grad(want, zs_t)):
        torch.testing.assert_close(a, b)


def test_head_optimizer_is_fused_and_steps_as_adamw():
    """Fused AdamW (one kernel for every head) takes the for-loop AdamW's steps."""
    g = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 7, generator=g)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fast, ref = head_optimizer(a, 1e-2), torch.optim.AdamW(b, lr=1e-2, weight_decay=0.0, foreach=False)
    assert fast.defaults["fused"]
    for _ in range(5):
        grads = [torch.randn(5, 7, generator=g) for _ in a]
        for params, opt in ((a, fast), (b, ref)):
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_step_runs_and_stays_close(step_parts):
    plain = _loss_and_grads(step_parts, LoopConfig(steps=1))
    amp = _loss_and_grads(step_parts, LoopConfig(steps=1, amp="bf16"))
    assert torch.isfinite(amp[0])
    assert abs(amp[1] - plain[1]) / plain[1] < 0.1  # bf16 keeps ~3 significant digits


def test_topk_kl_is_a_lower_bound_that_becomes_the_full_kl():
    g = torch.Generator().manual_seed(0)
    lt = torch.log_softmax(torch.randn(6, 50, generator=g) * 2, -1)
    ls = torch.log_softmax(torch.randn(6, 50, generator=g) * 2, -1).requires_grad_(True)
    full = kl_divergence(lt, ls)
    v, i = lt.topk(50, -1)
    torch.testing.assert_close(topk_kl(v, i, ls), full, rtol=1e-4, atol=1e-5)
    prev = 0.0
    for k in (1, 5, 20, 50):  # more buckets, a finer partition: the bound rises to the full KL
        v, i = lt.topk(k, -1)
        kk = topk_kl(v, i, ls)
        assert prev - 1e-5 <= kk.item() <= full.item() + 1e-5
        prev = kk.item()
    kk.backward()
    assert torch.isfinite(ls.grad).all()
    same = topk_kl(*lt.topk(10, -1), lt)
    assert abs(same.item()) < 1e-5  # student == teacher


def test_teacher_cache_is_filled_then_read_and_gives_the_same_heads(folders, tmp_path):
    cache = tmp_path / "teacher"
    opts = dict(steps=6, batch_size=2, seq_len=32, calib_batches=1, lr=1e-2, generate=4,
                teacher_cache=str(cache), teacher_top_k=64, **QUIET)

    def run(out, **kw):
        return castlora.translate(source=str(folders["llama"]), adapter=str(folders["adapter"]),
                                  target=str(folders["neox"]), corpus=[str(folders["corpus"])], out=str(out),
                                  **{**opts, **kw})

    first = run(tmp_path / "a")
    assert first.record["teacher_cache"]["steps_computed"] == 6 and first.record["teacher_cache"]["steps_read"] == 0
    assert len(list(cache.glob("step_*.safetensors"))) == 6 and (cache / "generated.json").exists()
    second = run(tmp_path / "b")
    assert second.record["teacher_cache"]["steps_read"] == 6 and second.record["teacher_cache"]["steps_computed"] == 0
    ha, hb = load_file(str(tmp_path / "a" / "heads.safetensors")), load_file(str(tmp_path / "b" / "heads.safetensors"))
    assert ha.keys() == hb.keys()
    for k in ha:
        torch.testing.assert_close(ha[k], hb[k])
    # other training options on the same teacher: allowed, and still read from the cache
    third = run(tmp_path / "c", lr=5e-3, beta=0.5)
    assert third.record["teacher_cache"]["steps_read"] == 6
    # a different teacher (the imitation control: the LoRA off) must not reuse it
    with pytest.raises(CastloraError, match="another teacher.*teacher_lora"):
        run(tmp_path / "d", teacher_lora=False)
    # another seed means other batches: caught by the fingerprint of step 0
    with pytest.raises(CastloraError, match="another batch"):
        run(tmp_path / "e", seed=1)
    manifest = json.loads((cache / "manifest.json").read_text())
    # --teacher auto (the default) is stored as the teacher it chose, with the blend's weight
    chosen = first.record["teacher"]["teacher"]
    assert chosen in ("source", "blend") and first.record["config"]["teacher"] == "auto"
    assert manifest["top_k"] == 64 and manifest["teacher"] == chosen
    assert manifest["delta_weight"] == (0.5 if chosen == "blend" else None)


def test_a_damaged_teacher_cache_file_is_named_not_used(folders, tmp_path):
    cache = tmp_path / "teacher"
    opts = dict(steps=2, batch_size=2, seq_len=32, calib_batches=1, generate=0, teacher_cache=str(cache), **QUIET)
    run = lambda out: castlora.translate(source=str(folders["llama"]), adapter=str(folders["adapter"]),  # noqa: E731
                                         target=str(folders["neox"]), corpus=[str(folders["corpus"])],
                                         out=str(out), **opts)
    run(tmp_path / "a")
    step1 = cache / "step_000001.safetensors"
    step1.write_bytes(step1.read_bytes()[:100])  # truncated, as by a full disk or a copy cut short
    with pytest.raises(CastloraError, match="step_000001.safetensors is not a readable teacher-cache file"):
        run(tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_translate_with_autocast_trains_and_exports(folders, tmp_path, amp):
    """The whole loop under autocast (fp16 with its loss scaler) on CPU: finite losses, a loadable adapter."""
    res = castlora.translate(source=str(folders["llama"]), adapter=str(folders["adapter"]),
                             target=str(folders["neox"]), corpus=[str(folders["corpus"])], out=str(tmp_path / amp),
                             steps=3, batch_size=2, seq_len=32, calib_batches=1, generate=0, amp=amp,
                             gradient_checkpointing=True, **QUIET)
    curve = res.record["loss_curve"]
    assert len(curve) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in curve)
    assert res.record["config"]["amp"] == amp and res.record["config"]["gradient_checkpointing"]
    assert (tmp_path / amp / "adapter_model.safetensors").exists()
