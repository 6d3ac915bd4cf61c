"""Speed and memory of a CAST step against its floor.

floor = one source forward (no grad) + one target forward and backward to the activations (no
weight gradients) at the same batch; a CAST step adds the LoRA, the heads, the loss and the
optimizer. Prints tokens/s, step time, `step/floor: X.XX`, peak memory and, on CUDA, TFLOP/s.

  python benchmarks/throughput.py --source ../shared/zoo/llama --target ../shared/zoo/mistral --device cpu
  python benchmarks/throughput.py --preset 7b --device cuda --dtype bfloat16 --batch 8 --seq-len 512
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from castlora.adapters import load_adapter
from castlora.cast_module import PortedKernel, attached, deltas_off
from castlora.closed_form import random_init
from castlora.families import model_sites
from castlora.models import load_model, load_tokenizer, torch_dtype
from castlora.site_map import map_sites, proportional_layer_map
from castlora.tokens import PairBatch, encode_pair, shared_vocab
from castlora.teacher_cache import TeacherCache
from castlora.pair import ModelPair
from castlora.teachers import make_teacher
from castlora.train import LoopConfig, autocast, cast_loss, head_optimizer, step_setup, update_heads

ROLES_7B = ["q", "k", "v", "o", "gate", "up", "down"]


def preset_models(name: str, dtype, device):
    """Random-weight models with 7B shapes, built from configs (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    if name == "7b":
        s_cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
        t_cfg = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, sliding_window=None)
    elif name == "tiny":  # the same code path at a size any CPU runs in seconds
        s_cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                            vocab_size=32000)
        t_cfg = MistralConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=6,
                              num_key_value_heads=2, vocab_size=32000, sliding_window=None)
    else:
        raise SystemExit(f"unknown preset {name!r}")
    models = []
    for cls, cfg in ((LlamaForCausalLM, s_cfg), (MistralForCausalLM, t_cfg)):
        with torch.device(device):
            m = cls._from_config(cfg, dtype=dtype)
        m.eval().requires_grad_(False)
        models.append(m)
    return models


def make_lora(source, roles, rank, folder: Path):
    from peft import LoraConfig, get_peft_model
    sites = model_sites(source)
    modules = sorted({s.path for (i, r), s in sites.sites.items() if r in roles})
    peft_model = get_peft_model(source, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules,
                                                   init_lora_weights=False))
    peft_model.save_pretrained(str(folder))
    return peft_model


def timed(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class KernelCount(TorchDispatchMode):
    """Counts the aten ops that run a kernel (views excluded). On a GPU each is about one launch, each
    with microseconds of host work: with hundreds of small ports that host work, not the GPU's, can
    set the step's pace, and it shows on any machine, CPU included."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.n += 1
        return func(*args, **(kwargs or {}))


def kernels_of(fn) -> int:
    with KernelCount() as count:
        fn()
    return count.n


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source")
    ap.add_argument("--target")
    ap.add_argument("--adapter", help="source LoRA folder (default: a random rank-R LoRA on --roles)")
    ap.add_argument("--preset", choices=["7b", "tiny"], help="random-weight models built from configs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--roles", nargs="+", default=ROLES_7B)
    ap.add_argument("--teacher", default="source")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                    help="autocast of the CAST step (auto: bf16 on CUDA, off on CPU)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the target's blocks")
    ap.add_argument("--teacher-top-k", type=int, default=128, help="top-k of the precomputed-teacher step")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    dtype = torch_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    tmp = Path(tempfile.mkdtemp(prefix="castlora-bench-"))

    if args.preset:
        src, tgt = preset_models(args.preset, dtype, args.device)
        ids = torch.randint(3, 32000, (args.batch, args.seq_len), device=args.device)
        mask = torch.ones_like(ids)
        pos = torch.arange(args.seq_len, device=args.device).expand(args.batch, -1)
        batch = PairBatch(ids, mask, ids, mask, pos, pos, torch.ones_like(pos, dtype=torch.bool))
        vocab_ids = torch.arange(32000, device=args.device)
        from castlora.tokens import SharedVocab
        vocab = SharedVocab(vocab_ids, vocab_ids)
        label = f"preset {args.preset}"
    else:
        if not (args.source and args.target):
            ap.error("give --source and --target, or --preset")
        src = load_model(args.source, dtype, args.device)
        tgt = load_model(args.target, dtype, args.device)
        tok_s, tok_t = load_tokenizer(args.source), load_tokenizer(args.target)
        from castlora.corpus import make_chunks, read_corpus
        shared = Path(args.source).resolve().parents[1]
        docs = read_corpus([str(shared / "data" / "general" / "valid.txt.gz")])
        texts = make_chunks(docs, tok_s, args.seq_len, args.batch, seed=0)
        batch = encode_pair(texts, tok_s, tok_t, args.seq_len, int(args.seq_len * 1.5)).to(args.device)
        vocab = shared_vocab(tok_s, tok_t)
        label = f"{Path(args.source).name} -> {Path(args.target).name}"

    if args.adapter:
        from peft import PeftModel
        adapter = args.adapter
        source = PeftModel.from_pretrained(src, adapter).eval()
    else:
        source = make_lora(src, args.roles, args.rank, tmp / "lora")
        adapter = str(tmp / "lora")
    source.requires_grad_(False)
    source_inner = source.base_model.model
    s_sites, t_sites = model_sites(source_inner), model_sites(tgt)
    lora = load_adapter(adapter, s_sites)
    pairs, _ = map_sites(lora.kernels, t_sites, proportional_layer_map(s_sites.num_layers, t_sites.num_layers),
                         allow_drop=True)
    ports = [(PortedKernel(p.kernel, p.target).to(args.device), p.target) for p in pairs]
    random_init(ports)
    n_tok_s, n_tok_t = int(batch.mask_s.sum()), int(batch.mask_t.sum())
    emb = tgt.get_input_embeddings()
    amp = args.amp if args.amp != "auto" else ("bf16" if args.device.startswith("cuda") else "off")
    floor_ctx = autocast(torch.device(args.device), amp)

    def floor_source():
        with torch.no_grad(), source.disable_adapter(), floor_ctx:
            src(input_ids=batch.ids_s, attention_mask=batch.mask_s)

    def floor_target():
        x = emb(batch.ids_t).detach().requires_grad_(True)  # gradients to activations only
        with floor_ctx:
            logits = tgt(inputs_embeds=x, attention_mask=batch.mask_t).logits
        logits.float().logsumexp(-1).mean().backward()

    loop = LoopConfig(steps=1, amp=amp, checkpointing=args.gradient_checkpointing)
    teacher = make_teacher(args.teacher)
    pair = ModelPair(source, tgt, None, None, s_sites, t_sites, ports)
    cache = TeacherCache(tmp / "teacher", {"bench": True}, args.teacher_top_k)
    params = [p for port, _ in ports for p in port.parameters()]
    opt = head_optimizer(params, 1e-4)
    scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=amp == "fp16")

    def cast_step(wrappers, cols, use_cache=None):
        """The step fit_heads runs (teacher, student, loss, backward, its one read back, the update)."""
        for port, _ in ports:
            port.record = True
        loss, kl, mse = cast_loss(pair, batch, cols, loop, teacher, use_cache, 0)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        torch.stack([v.detach().float() for v in (loss, kl, mse)]).tolist()
        update_heads(opt, params, scaler, loop.grad_clip)

    with attached(tgt, ports) as pair.wrappers:
        wrappers = pair.wrappers
        # the floor: the models as they are (full output layer), the target without the ported deltas
        with deltas_off(wrappers):
            for _ in range(args.warmup):
                floor_source(), floor_target()
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t_src = timed(floor_source, args.repeats, args.device)
            t_tgt = timed(floor_target, args.repeats, args.device)
        with step_setup(pair, vocab, t_sites.layer_paths, loop) as cols:
            for _ in range(args.warmup):
                cast_step(wrappers, cols)
            cast_step(wrappers, cols, cache)  # computes the teacher once and writes it: later calls read it
            t_step = timed(lambda: cast_step(wrappers, cols), args.repeats, args.device)
            t_cached = timed(lambda: cast_step(wrappers, cols, cache), args.repeats, args.device)
            k_step = kernels_of(lambda: cast_step(wrappers, cols))
            k_cached = kernels_of(lambda: cast_step(wrappers, cols, cache))
        with deltas_off(wrappers):
            k_floor = kernels_of(floor_source) + kernels_of(floor_target)
    floor = t_src + t_tgt
    peak = peak_memory_gib(args.device)
    p_s = sum(p.numel() for n, p in src.named_parameters() if "embed_tokens" not in n and "lora" not in n)
    p_t = sum(p.numel() for n, p in tgt.named_parameters() if "embed_tokens" not in n)
    flops = 2 * p_s * n_tok_s + 4 * p_t * n_tok_t  # source fwd + target fwd and activation-grad bwd
    weights_gib = (sum(p.numel() * p.element_size() for p in src.parameters())
                   + sum(p.numel() * p.element_size() for p in tgt.parameters())) / 2**30
    gc.collect()
    print(f"pair: {label}  device: {args.device}  dtype: {str(dtype).replace('torch.', '')}  amp: {amp}  "
          f"checkpointing: {args.gradient_checkpointing}  "
          f"batch: {args.batch} x {args.seq_len}  kernels: {len(ports)}  threads: {torch.get_num_threads()}")
    print(f"{'what':<28}{'seconds':>10}{'target tok/s':>14}")
    print(f"{'floor: source forward':<28}{t_src:>10.4f}")
    print(f"{'floor: target fwd+bwd':<28}{t_tgt:>10.4f}")
    print(f"{'floor (sum)':<28}{floor:>10.4f}{n_tok_t / floor:>14.0f}")
    print(f"{'CAST step':<28}{t_step:>10.4f}{n_tok_t / t_step:>14.0f}")
    print(f"{'CAST step, cached teacher':<28}{t_cached:>10.4f}{n_tok_t / t_cached:>14.0f}")
    print(f"step/floor: {t_step / floor:.2f}")
    print(f"kernels per step: floor {k_floor}, CAST step {k_step}, cached-teacher step {k_cached}; "
          f"CAST step over the floor per port: {(k_step - k_floor) / len(ports):.1f}")
    print(f"peak memory: {peak:.2f} GiB ({'GPU allocated' if args.device.startswith('cuda') else 'process max RSS'}); "
          f"model weights: {weights_gib:.2f} GiB; ratio {peak / weights_gib:.2f}")
    if args.device.startswith("cuda"):
        print(f"achieved: {flops / t_step / 1e12:.1f} TFLOP/s (step), {flops / floor / 1e12:.1f} TFLOP/s (floor)")
    print(f"projected 1000 steps: {1000 * t_step / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
