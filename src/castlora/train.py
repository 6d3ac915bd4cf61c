"""The head-training loop (CAST.md step 5): L = alpha * KL + beta * MSE, heads only.

Per step: the teacher reads the batch on the source side (no grad), the student (target with
ported deltas) reads it on the target side, both are compared on aligned positions over the
shared vocabulary. Batches are a pure function of the step number, so a run resumed from a
checkpoint ends with the same heads as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .capture import capture
from .checkpointing import checkpointed_blocks
from .cast_module import CastLinear, PortedKernel, deltas_off, input_device
from .errors import CastloraError, TrainingDiverged
from .families import Site
from .losses import delta_teacher, kl_divergence, lora_effect, relative_mse, shared_log_probs, topk_kl
from .safe_io import is_disk_full
from .teacher_cache import TeacherCache, TeacherOutput
from .tokens import PairBatch, SharedVocab
from .vocab_head import shared_logits

TEACHERS = ("source", "blend", "delta", "source_base")
# how much of the source base each teacher swaps for the target base (losses.delta_teacher's weight)
TEACHER_DELTA_WEIGHT = {"source": 0.0, "source_base": 0.0, "delta": 1.0}
POSITION_WEIGHTS = ("uniform", "lora-effect")


@dataclass
class LoopConfig:
    steps: int
    lr: float = 2e-3
    alpha: float = 1.0
    beta: float = 0.1
    temperature: float = 1.0
    teacher: str = "source"
    delta_weight: float = 0.5  # teacher "blend": log p_S+LoRA + delta_weight * (log p_T - log p_S)
    lora_weight: float = 1.0  # a: the teacher applies a x the LoRA's effect on the source (losses.delta_teacher)
    other_bucket: bool = False  # KL over the shared vocabulary + one bucket for the rest (losses.shared_log_probs)
    teacher_lora: bool = True  # False: the teacher's source side without the LoRA (the imitation control)
    unaligned_weight: float = 0.0  # KL(target base || student) at the unaligned target positions (cast_loss)
    backoff: float = 0.0  # halve the lr when the KL's running mean climbs this fraction above its lowest (0 = off)
    position_weight: str = "uniform"  # "lora-effect": weight each position's KL by KL(S+LoRA || S) there
    warmup: int = 20
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    log_every: int = 10
    amp: str = "off"  # "bf16" | "fp16": autocast the forward passes (GPU)
    checkpointing: bool = False  # recompute the target's blocks in the backward pass (less memory)


@dataclass
class LoopState:
    step: int = 0
    history: list[dict] = field(default_factory=list)
    tokens_seen: int = 0
    seconds: float = 0.0
    lr_scale: float = 1.0  # halved by each back-off (LoopConfig.backoff)
    kl_mean: float | None = None  # running mean of the training KL, and its lowest value since the last back-off
    kl_low: float | None = None


BACKOFF_MEAN = 0.9  # the running mean's decay: about the last 10 steps


def back_off(state: LoopState, kl: float, cfg: LoopConfig) -> tuple[float, float, float]:
    """The watch on the KL after a step with KL `kl`: (running mean, its lowest value since the last
    back-off, lr scale). From the first step (greet's KL climbed during warmup, before it blew up
    at step 14), when the running mean climbs `cfg.backoff` above its lowest
    value, the lr is halved for the rest of the run and the watch starts again. Why: the lr that
    suits one LoRA diverges on another (shakespeare's 3e-2 threw greet's KL from 3.6 to 6-35 within
    35 steps, docs/results.md), and a mean that climbs over ten steps is no batch's noise. Pure: the
    loop stores the result with the step, so a resumed run watches exactly as an uninterrupted one."""
    mean = kl if state.kl_mean is None else BACKOFF_MEAN * state.kl_mean + (1 - BACKOFF_MEAN) * kl
    low = mean if state.kl_low is None else min(state.kl_low, mean)
    if cfg.backoff > 0 and mean > (1 + cfg.backoff) * low:
        return mean, mean, state.lr_scale / 2
    return mean, low, state.lr_scale


def replay_back_off(kls: list[float], backoff: float) -> tuple[list[int], float]:
    """The watch of `back_off` replayed over a recorded KL curve, as fit_heads would run it: (the
    steps it backs off at, the final lr scale). For recorded runs (benchmarks/backoff_replay.py)."""
    cfg, state, steps = LoopConfig(steps=len(kls), backoff=backoff), LoopState(), []
    for kl in kls:
        mean, low, scale = back_off(state, kl, cfg)
        if scale < state.lr_scale:
            steps.append(state.step)
        state.step += 1
        state.kl_mean, state.kl_low, state.lr_scale = mean, low, scale
    return steps, state.lr_scale


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warmup, then cosine decay to 10% (a function of the step: nothing to checkpoint)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    """Mixed precision for the forward passes (the losses are computed in float32 regardless)."""
    if amp not in AMP:
        raise ValueError(f"unknown --amp {amp!r}; choose one of {sorted(AMP)}")
    if AMP[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP[amp])


def teacher_outputs(source, source_inner, target, wrappers, ports: list[tuple[PortedKernel, Site]],
                    batch: PairBatch, cols: SharedVocab, teacher: str, tau: float, want_z: bool,
                    position_weight: str = "uniform", delta_weight: float = 0.5,
                    teacher_lora: bool = True, lora_weight: float = 1.0, other: bool = False) -> TeacherOutput:
    """The source side of a step (no grad): the teacher's log-probs over the shared vocabulary at
    the aligned positions, each kernel's view of its source-site inputs (for the MSE term), and
    with `position_weight` "lora-effect" each position's weight: KL(S+LoRA || S) there over its
    batch mean, so the KL dwells where the LoRA acts and not where the teacher only holds the
    source base's habits (the imitation control's whole signal).

    Every teacher is log p_S+LoRA + w (log p_T - log p_S), renormalised: w = 0 for "source", 1 for
    "delta", `delta_weight` for "blend"; `lora_weight` a scales the LoRA's term (log p_S+LoRA -
    log p_S). `teacher_lora` False puts the source base in the place of S+LoRA: the same teacher
    with the LoRA switched off, the imitation control ("source_base" is "source" without the LoRA).
    `other`: every distribution has one more column, its mass outside the shared vocabulary, which
    the teacher formula treats like a token."""
    source_paths = sorted({p.source_module for p, _ in ports}) if want_z else []

    def logp_source(use_lora: bool):
        with capture(source_inner, inputs=source_paths if use_lora else ()) as cap:
            if use_lora:
                out = source(input_ids=batch.ids_s, attention_mask=batch.mask_s)
            else:
                with source.disable_adapter():
                    out = source(input_ids=batch.ids_s, attention_mask=batch.mask_s)
        logits = batch.gather(out.logits, "s")
        return shared_log_probs(logits, cols.ids_s, tau, other), cap.inputs

    with torch.no_grad():
        lp_lora, inputs = logp_source(True)
        z = None
        if want_z:
            z = source_z(ports, inputs, batch)
        use_lora = teacher_lora and teacher != "source_base"
        w = TEACHER_DELTA_WEIGHT.get(teacher, delta_weight)
        if use_lora and w == 0 and lora_weight == 1 and position_weight == "uniform":
            return TeacherOutput(logp=lp_lora, z=z)
        lp_base, _ = logp_source(False)
        weight = None
        if position_weight == "lora-effect":  # the LoRA's real effect, also in the imitation control
            effect = lora_effect(lp_lora, lp_base)
            weight = effect / effect.mean().clamp_min(1e-12)
        lp_teach = lp_lora if use_lora else lp_base
        if w == 0:
            logp = lp_teach if lora_weight == 1 else delta_teacher(None, lp_teach, lp_base, 0.0, lora_weight)
            return TeacherOutput(logp=logp, z=z, weight=weight)
        with deltas_off(wrappers):
            t_logits = target(input_ids=batch.ids_t, attention_mask=batch.mask_t).logits
        lp_t = shared_log_probs(batch.gather(t_logits, "t"), cols.ids_t, tau, other)
        return TeacherOutput(logp=delta_teacher(lp_t, lp_teach.to(lp_t.device), lp_base.to(lp_t.device), w,
                                                lora_weight),
                             z=z, weight=weight)


def source_z(ports: list[tuple[PortedKernel, Site]], inputs: dict[str, torch.Tensor], batch: PairBatch
             ) -> list[torch.Tensor]:
    """Each kernel's view `in_basis^T x_S` of its source-site inputs at the aligned positions (the MSE
    term's target), in the order of `ports`. Kernels that read one tensor (q, k and v read the same
    hidden states, gate and up too) share one gather and one matmul against their bases side by side."""
    groups: dict[tuple, list[int]] = {}
    for i, (port, _) in enumerate(ports):
        x = inputs[port.source_module]
        same_tensor = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)
        groups.setdefault((same_tensor, port.in_basis.device), []).append(i)
    z: list[torch.Tensor | None] = [None] * len(ports)
    for (_, device), idx in groups.items():
        x = batch.gather(inputs[ports[idx[0]][0].source_module], "s").to(device).float()
        bases = [ports[i][0].in_basis for i in idx]
        for i, part in zip(idx, (x @ torch.cat(bases, 1)).split([b.shape[1] for b in bases], -1)):
            z[i] = part
    return z


def cast_loss(source, source_inner, target, wrappers, ports: list[tuple[PortedKernel, Site]], batch: PairBatch,
              cols: SharedVocab, cfg: LoopConfig, cache: TeacherCache | None = None, step: int = 0,
              teacher_out: TeacherOutput | None = None):
    """One CAST step's loss: teacher (no grad; `teacher_out` when given, else from `cache` when it
    holds this step) vs student on aligned positions, plus the MSE term and, with
    cfg.unaligned_weight, the anchor at the unaligned positions. Returns (loss, kl, mse, anchor). `cols`: the shared
    vocabulary's columns in each model's logits (None where vocab_head.shared_logits already
    restricted them)."""
    device = input_device(target)
    with autocast(device, cfg.amp):
        t_out = teacher_out
        if t_out is None and cache is not None:
            t_out = cache.load(step, batch)
        if t_out is None:
            t_out = teacher_outputs(source, source_inner, target, wrappers, ports, batch, cols, cfg.teacher,
                                    cfg.temperature, cfg.beta > 0, cfg.position_weight, cfg.delta_weight,
                                    cfg.teacher_lora, cfg.lora_weight, cfg.other_bucket)
            if cache is not None:  # the same top-k whether the step was read or computed: same heads
                t_out = t_out.top_k(cache.top_k)
                cache.save(step, batch, t_out)
        logits = target(input_ids=batch.ids_t, attention_mask=batch.mask_t).logits
    lp_student = shared_log_probs(batch.gather(logits, "t"), cols.ids_t, cfg.temperature,
                                  cfg.other_bucket)
    t_out = t_out.to(lp_student.device)
    if t_out.logp is not None:
        kl = kl_divergence(t_out.logp, lp_student, cfg.temperature, t_out.weight)
    else:
        kl = topk_kl(t_out.values, t_out.index, lp_student, cfg.temperature, t_out.weight)
    mse = torch.zeros((), device=logits.device)
    if cfg.beta > 0:
        mse = kernel_mse(ports, t_out.z, batch).to(logits.device)
    anchor = torch.zeros((), device=logits.device)
    if cfg.unaligned_weight > 0:
        anchor = unaligned_anchor(target, wrappers, batch, logits, cols, cfg)
    return cfg.alpha * kl + cfg.beta * mse + cfg.unaligned_weight * anchor, kl, mse, anchor


def kernel_mse(ports: list[tuple[PortedKernel, Site]], z_source: list[torch.Tensor], batch: PairBatch) -> torch.Tensor:
    """The MSE term: the mean over kernels of relative_mse(the student's z at the aligned target positions,
    the source's z there). Kernels whose z share a device, dtype and width are stacked and go through one
    gather and one reduction together: per kernel it was a dozen small ops forward and backward, ~4,500
    kernel launches per step at 7B shapes (224 kernels), each with host work that outlasts the op itself."""
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for (port, _), z_s in zip(ports, z_source):
        z_t = port.last_z
        groups.setdefault((z_t.device, z_t.dtype, z_t.shape[-1]), []).append((z_t, z_s))
    total = None
    for (device, _, _), items in groups.items():
        z_t = batch.gather(torch.stack([z for z, _ in items], -2), "t")  # N x kernels x r
        z_s = torch.stack([z.to(device) for _, z in items], -2)
        part = relative_mse(z_t, z_s, (0, 2)).sum()  # one relative MSE per kernel
        total = part if total is None else total + part.to(total.device)
    return total / len(ports)


def unaligned_anchor(target, wrappers, batch: PairBatch, logits: torch.Tensor, cols: SharedVocab,
                     cfg: LoopConfig) -> torch.Tensor:
    """KL(target base || student) summed over the target positions that align with none of the
    source's, over the number of aligned positions: at weight 1 each such position counts as much as
    an aligned one. There the teacher has nothing to say (the source is inside a word the target
    splits), yet the ported deltas act there too; this holds the target to its own prediction where
    it cannot be taught (docs/results.md: from neox the ports lost ground at those positions)."""
    real, aligned = batch.target_positions()
    where = (real & ~aligned).to(logits.device)
    if not where.any():
        return logits.sum() * 0.0
    with torch.no_grad(), deltas_off(wrappers):
        base = target(input_ids=batch.ids_t, attention_mask=batch.mask_t).logits
    lp_base = shared_log_probs(base[where.to(base.device)], cols.ids_t, cfg.temperature, cfg.other_bucket)
    lp_student = shared_log_probs(logits[where], cols.ids_t, cfg.temperature, cfg.other_bucket)
    kl = (lp_base.exp() * (lp_base - lp_student.to(lp_base.device))).sum()
    return kl.to(logits.device) / max(1, batch.num_aligned) * cfg.temperature ** 2


@contextlib.contextmanager
def held_out_kl(source, source_inner, target, wrappers, ports: list[tuple[PortedKernel, Site]],
                batches: list[PairBatch], vocab: SharedVocab, cfg: LoopConfig):
    """Yields a function that returns the mean KL to the teacher over `batches` with the heads as they
    are now. The teacher runs once per batch here; each call runs only the target."""
    cfg = replace(cfg, beta=0.0, unaligned_weight=0.0, checkpointing=False)  # the KL alone; no backward, so no checkpointing
    device = input_device(target)
    with torch.no_grad(), step_setup(source_inner, target, vocab, [], cfg) as cols:
        with autocast(device, cfg.amp):
            teachers = [teacher_outputs(source, source_inner, target, wrappers, ports, b, cols, cfg.teacher,
                                        cfg.temperature, False, cfg.position_weight, cfg.delta_weight,
                                        cfg.teacher_lora, cfg.lora_weight, cfg.other_bucket)
                        for b in batches]

        def kl_at() -> float:
            kls = [cast_loss(source, source_inner, target, wrappers, ports, b, cols, cfg, teacher_out=t)[1].item()
                   for b, t in zip(batches, teachers)]
            return sum(kls) / len(kls)

        yield kl_at


@contextlib.contextmanager
def step_setup(source_inner, target, vocab: SharedVocab, target_blocks: list[str], cfg: LoopConfig):
    """What every step runs inside: logits over the shared vocabulary only (both models), and the
    target's blocks checkpointed when asked. Yields the columns to pass to `cast_loss`."""
    if cfg.other_bucket:  # the bucket needs every column: no restricted output layer
        with checkpointed_blocks(target, target_blocks, cfg.checkpointing):
            yield vocab
        return
    with shared_logits(source_inner, vocab.ids_s) as cols_s, shared_logits(target, vocab.ids_t) as cols_t, \
            checkpointed_blocks(target, target_blocks, cfg.checkpointing):
        yield SharedVocab(cols_s, cols_t)


def head_optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW over the heads, fused: one kernel per device and dtype updates every head, where the
    for-loop version runs ~8 ops per parameter (two per kernel), and on the CPU reads each step count
    back with a sync. Devices without a fused AdamW get the multi-tensor (foreach) one."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)


def update_heads(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], scaler: torch.amp.GradScaler,
                 grad_clip: float) -> None:
    """The update after the backward: unscale (fp16), clip the heads' gradient norm, step. All on
    the device: no value is read back to the host."""
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    scaler.step(opt)
    scaler.update()


def save_checkpoint(folder: Path, ports: list[tuple[PortedKernel, Site]], opt, state: LoopState) -> None:
    """heads + optimizer moments as safetensors, the rest as JSON; written to a sibling folder, then
    swapped in by renames, so a kill at any moment leaves one complete checkpoint (`folder`, or
    `folder`.old between the two renames; fit_heads resumes from either)."""
    tmp = folder.with_name(folder.name + ".tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({f"{i}.{k}": v.detach().cpu().contiguous() for i, (p, _) in enumerate(ports)
                   for k, v in p.state_dict().items()}, str(tmp / "heads.safetensors"))
        opt_state = opt.state_dict()
        tensors, scalars = {}, {}
        for idx, st in opt_state["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars[f"{idx}.{k}"] = v
        save_file(tensors or {"_empty": torch.zeros(1)}, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({
            "step": state.step, "history": state.history, "tokens_seen": state.tokens_seen,
            "seconds": state.seconds, "lr_scale": state.lr_scale, "kl_mean": state.kl_mean, "kl_low": state.kl_low,
            "param_groups": opt_state["param_groups"], "scalars": scalars}))
    except Exception as e:
        if not is_disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise CastloraError(f"disk full while writing the checkpoint of step {state.step} to {folder}: {e}. "
                            "The previous checkpoint (if any) is kept: free some space and rerun with "
                            "--resume") from e
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, ports: list[tuple[PortedKernel, Site]], opt) -> LoopState:
    heads = load_file(str(folder / "heads.safetensors"))
    for i, (p, _) in enumerate(ports):
        p.load_state_dict({k.split(".", 1)[1]: v for k, v in heads.items() if k.split(".", 1)[0] == str(i)})
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict = {}
    for k, v in tensors.items():
        if k == "_empty":
            continue
        idx, name = k.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for k, v in meta["scalars"].items():
        idx, name = k.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return LoopState(meta["step"], meta["history"], meta["tokens_seen"], meta["seconds"], meta.get("lr_scale", 1.0),
                     meta.get("kl_mean"), meta.get("kl_low"))


def fit_heads(source, source_inner, target, wrappers: list[CastLinear], ports: list[tuple[PortedKernel, Site]],
              make_batch: Callable[[int], PairBatch], vocab: SharedVocab, cfg: LoopConfig,
              workdir: Path | None = None, resume: bool = False, log: Callable[[dict], None] | None = None,
              progress: bool = True, target_blocks: list[str] = (), cache: TeacherCache | None = None) -> LoopState:
    """Train the heads of `ports` for cfg.steps steps. Only head parameters get gradients."""
    if cfg.teacher not in TEACHERS:
        raise ValueError(f"unknown teacher {cfg.teacher!r}; choose one of {TEACHERS}")
    if cfg.position_weight not in POSITION_WEIGHTS:
        raise ValueError(f"unknown position weight {cfg.position_weight!r}; choose one of {POSITION_WEIGHTS}")
    params = [p for port, _ in ports for p in port.parameters()]
    opt = head_optimizer(params, cfg.lr)
    ckpt = workdir / "checkpoint" if workdir else None
    state = LoopState()
    if resume and ckpt:
        for folder in (ckpt, ckpt.with_name(ckpt.name + ".old")):  # .old: killed between save's renames
            if folder.exists():
                state = load_checkpoint(folder, ports, opt)
                break
    for port, _ in ports:
        port.record = cfg.beta > 0
    device = input_device(target)
    # fp16 autocast needs loss scaling (its small gradients underflow); bf16 does not
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not progress, desc="castlora", dynamic_ncols=True)
    updating = False
    try:
        with step_setup(source_inner, target, vocab, list(target_blocks), cfg) as cols:
            while state.step < cfg.steps:
                t0 = time.perf_counter()
                batch = make_batch(state.step)
                n_tok = int(batch.mask_t.sum())  # counted where the batch was built, before it goes to the device
                batch = batch.to(device)
                loss, kl, mse, anchor = cast_loss(source, source_inner, target, wrappers, ports, batch, cols, cfg,
                                                  cache, state.step)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                # The step's one read back to the host, after the backward is queued: a read before
                # it would leave the GPU idle while the host queues the backward's kernels.
                values = dict(zip(("loss", "kl", "mse", "anchor"),
                                  torch.stack([v.detach().float().to(loss.device)
                                               for v in (loss, kl, mse, anchor)]).tolist()))
                for name in ("kl", "mse", "anchor"):
                    if not math.isfinite(values[name]):
                        where = (f"The last good checkpoint is in {ckpt}: rerun with --resume to continue from it "
                                 "(perhaps with a lower --lr)" if ckpt and ckpt.exists() else
                                 "No checkpoint was saved before it: rerun, perhaps with a lower --lr")
                        raise TrainingDiverged(f"the {name} loss became {values[name]} at step {state.step}; the "
                                               f"heads were not updated. {where}")
                watch = back_off(state, values["kl"], cfg)
                for g in opt.param_groups:
                    g["lr"] = lr_at(state.step, cfg) * watch[2]
                updating = True  # from here until the state says step+1, a checkpoint would be torn
                update_heads(opt, params, scaler, cfg.grad_clip)
                dt = time.perf_counter() - t0
                backed_off = watch[2] < state.lr_scale
                state.step += 1
                state.kl_mean, state.kl_low, state.lr_scale = watch
                state.tokens_seen += n_tok
                state.seconds += dt
                updating = False
                rec = {"step": state.step, "loss": round(values["loss"], 6), "kl": round(values["kl"], 6),
                       "mse": round(values["mse"], 6), "lr": lr_at(state.step - 1, cfg) * state.lr_scale,
                       **({"backed_off": True} if backed_off else {}),
                       **({"anchor": round(values["anchor"], 6)} if cfg.unaligned_weight > 0 else {}),
                       "aligned": batch.num_aligned, "tok_s": round(n_tok / dt, 1)}
                state.history.append(rec)
                bar.update(1)
                bar.set_postfix(kl=f"{rec['kl']:.4f}", mse=f"{rec['mse']:.3f}", tok_s=f"{rec['tok_s']:.0f}")
                if log and (state.step % cfg.log_every == 0 or state.step == cfg.steps):
                    log(rec)
                if ckpt and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < cfg.steps:
                    save_checkpoint(ckpt, ports, opt, state)
    except KeyboardInterrupt:
        # Ctrl-C: keep the work done so far (SIGKILL falls back to the last periodic checkpoint).
        if ckpt and not updating and state.step > 0:
            save_checkpoint(ckpt, ports, opt, state)
        raise
    finally:
        bar.close()
        for port, _ in ports:
            port.record, port.last_z = False, None
    return state
