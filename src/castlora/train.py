"""The head-training loop (docs/method.md, step 5): L = KL + beta * MSE, heads only.

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

from .checkpointing import checkpointed_blocks
from .cast_module import PortedKernel, input_device
from .errors import CastloraError, TrainingDiverged
from .families import Site
from .losses import relative_mse, shared_log_probs
from .pair import ModelPair
from .safe_io import is_disk_full
from .teacher_cache import TeacherCache, TeacherOutput
from .teachers import OBJECTIVES, Teacher
from .tokens import PairBatch, SharedVocab
from .vocab_head import shared_logits

@dataclass
class LoopConfig:
    steps: int
    lr: float = 2e-3
    beta: float = 0.1
    temperature: float = 1.0
    objective: str = "kl"  # teachers.OBJECTIVES
    backoff: float = 0.0  # halve the lr when the KL's running mean climbs this fraction above its lowest (0 = off)
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
    35 steps), and a mean that climbs over ten steps is no batch's noise. Pure: the
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


def cast_loss(pair: ModelPair, batch: PairBatch, cols: SharedVocab, cfg: LoopConfig, teacher: Teacher,
              cache: TeacherCache | None = None, step: int = 0, teacher_out: TeacherOutput | None = None):
    """One CAST step's loss: the objective between teacher (no grad; `teacher_out` when given, else from
    `cache` when it holds this step) and student at the aligned positions, plus beta x the MSE term.
    Returns (loss, kl, mse). `cols`: the shared vocabulary's columns in each model's logits (None where
    vocab_head.shared_logits already restricted them)."""
    device = input_device(pair.target)
    with autocast(device, cfg.amp):
        t_out = teacher_out
        if t_out is None and cache is not None:
            t_out = cache.load(step, batch)
        if t_out is None:
            t_out = teacher.outputs(pair, batch, cols, cfg.temperature, cfg.beta > 0)
            if cache is not None:  # the same top-k whether the step was read or computed: same heads
                t_out = t_out.top_k(cache.top_k)
                cache.save(step, batch, t_out)
        logits = pair.target(input_ids=batch.ids_t, attention_mask=batch.mask_t).logits
    lp_student = shared_log_probs(batch.gather(logits, "t"), cols.ids_t, cfg.temperature)
    t_out = t_out.to(lp_student.device)
    kl = OBJECTIVES[cfg.objective](t_out, lp_student, cfg.temperature)
    mse = torch.zeros((), device=logits.device)
    if cfg.beta > 0:
        mse = kernel_mse(pair.ports, t_out.z, batch).to(logits.device)
    return kl + cfg.beta * mse, kl, mse


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


@contextlib.contextmanager
def held_out_kl(pair: ModelPair, batches: list[PairBatch], vocab: SharedVocab, cfg: LoopConfig, teacher: Teacher):
    """Yields a function that returns the mean KL to the teacher over `batches` with the heads as they
    are now. The teacher runs once per batch here; each call runs only the target."""
    cfg = replace(cfg, beta=0.0, checkpointing=False)  # the KL alone; no backward, so no checkpointing
    device = input_device(pair.target)
    with torch.no_grad(), step_setup(pair, vocab, [], cfg) as cols:
        with autocast(device, cfg.amp):
            teachers = [teacher.outputs(pair, b, cols, cfg.temperature, False) for b in batches]

        def kl_at() -> float:
            kls = [cast_loss(pair, b, cols, cfg, teacher, teacher_out=t)[1].item() for b, t in zip(batches, teachers)]
            return sum(kls) / len(kls)

        yield kl_at


@contextlib.contextmanager
def step_setup(pair: ModelPair, vocab: SharedVocab, target_blocks: list[str], cfg: LoopConfig):
    """What every step runs inside: logits over the shared vocabulary only (both models), and the
    target's blocks checkpointed when asked. Yields the columns to pass to `cast_loss`."""
    with shared_logits(pair.source_inner, vocab.ids_s) as cols_s, shared_logits(pair.target, vocab.ids_t) as cols_t, \
            checkpointed_blocks(pair.target, target_blocks, cfg.checkpointing):
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
    bad = [k for k, v in heads.items() if not torch.isfinite(v).all()]
    if bad:  # resuming would train on (or export) NaN heads
        raise CastloraError(f"the checkpoint in {folder} holds non-finite head weights ({', '.join(bad[:3])}): it "
                            "cannot be resumed; rerun with --overwrite instead of --resume")
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


def fit_heads(pair: ModelPair, make_batch: Callable[[int], PairBatch], vocab: SharedVocab, cfg: LoopConfig,
              teacher: Teacher, workdir: Path | None = None, resume: bool = False,
              log: Callable[[dict], None] | None = None, progress: bool = True, cache: TeacherCache | None = None
              ) -> LoopState:
    """Train the heads of `pair.ports` for cfg.steps steps. Only head parameters get gradients."""
    ports = pair.ports
    params = [p for port, _ in ports for p in port.parameters()]
    opt = head_optimizer(params, cfg.lr)
    ckpt = workdir / "checkpoint" if workdir else None
    state = LoopState()
    if resume and ckpt:
        for folder in (ckpt, ckpt.with_name(ckpt.name + ".old")):  # .old: killed between save's renames
            if folder.exists():
                state = load_checkpoint(folder, ports, opt)
                break
        if state.step > cfg.steps:
            raise CastloraError(f"the checkpoint to resume is at step {state.step}, past --steps {cfg.steps}: "
                                f"resume with --steps {state.step} or more, or rerun with --overwrite")
    for port, _ in ports:
        port.record = cfg.beta > 0
    device = input_device(pair.target)
    # fp16 autocast needs loss scaling (its small gradients underflow); bf16 does not
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not progress, desc="castlora", dynamic_ncols=True)
    updating = False
    try:
        with step_setup(pair, vocab, pair.t_sites.layer_paths, cfg) as cols:
            while state.step < cfg.steps:
                t0 = time.perf_counter()
                batch = make_batch(state.step)
                n_tok = int(batch.mask_t.sum())  # counted where the batch was built, before it goes to the device
                batch = batch.to(device)
                loss, kl, mse = cast_loss(pair, batch, cols, cfg, teacher, cache, state.step)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                # The step's one read back to the host, after the backward is queued: a read before
                # it would leave the GPU idle while the host queues the backward's kernels.
                values = dict(zip(("loss", "kl", "mse"),
                                  torch.stack([v.detach().float().to(loss.device) for v in (loss, kl, mse)]).tolist()))
                for name in ("kl", "mse"):
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
