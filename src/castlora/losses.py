"""Pure tensor functions for the CAST loss (docs/method.md, "Loss")."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shared_log_probs(logits: torch.Tensor, vocab_ids: torch.Tensor | None, tau: float = 1.0) -> torch.Tensor:
    """Log-distribution over the shared vocabulary only, renormalised, at temperature tau.
    `vocab_ids` None: the logits already are the shared columns (vocab_head.shared_logits)."""
    if vocab_ids is not None:
        logits = logits.index_select(-1, vocab_ids.to(logits.device))
    return F.log_softmax(logits.float() / tau, dim=-1)


def delta_teacher(logp_target_base: torch.Tensor | None, logp_source_lora: torch.Tensor,
                  logp_source_base: torch.Tensor, weight: float | torch.Tensor = 1.0) -> torch.Tensor:
    """log p = log p_T + (log p_S+LoRA - log p_S), renormalised: T's own distribution, tilted by
    exactly what the LoRA changes on S. With a zero LoRA it is p_T itself.

    `weight` w swaps only part of the source base for the target's:
    log p = log p_S+LoRA + w (log p_T - log p_S). w = 1 is the delta teacher above, w = 0 the
    source teacher; in between, the teacher keeps some of S+LoRA's absolute predictions.

    `logp_target_base` may be None when w = 0. `weight` may also be a tensor of one w per position
    (shape (..., 1))."""
    logp = logp_source_lora
    if isinstance(weight, torch.Tensor) or weight != 0:
        logp = logp + weight * (logp_target_base - logp_source_base)
    return F.log_softmax(logp, dim=-1)


def position_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions, or the weighted mean when `weight` (one number per position) is given."""
    if weight is None:
        return values.mean()
    weight = weight.to(values.device, values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1e-12)


def kl_divergence(logp_teacher: torch.Tensor, logp_student: torch.Tensor, tau: float = 1.0,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions (weighted by `weight` when given) of KL(teacher || student), times
    tau^2 (keeps gradients comparable across temperatures, as in distillation)."""
    if logp_teacher.numel() == 0:
        return logp_student.sum() * 0.0
    kl = (logp_teacher.exp() * (logp_teacher - logp_student)).sum(-1)
    return position_mean(kl, weight) * tau * tau


def topk_kl(values: torch.Tensor, index: torch.Tensor, logp_student: torch.Tensor, tau: float = 1.0,
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) over k+1 buckets: the teacher's top-k pieces (log-probs `values` at
    `index`) and the rest of the vocabulary as one bucket. It never exceeds the full KL, equals it
    when k covers the vocabulary, and needs only the top-k of the teacher (teacher_cache)."""
    if values.numel() == 0:
        return logp_student.sum() * 0.0
    lq = logp_student.gather(-1, index.long())
    p = values.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    lq_rest = torch.log1p(-lq.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (p * (values - lq)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * lq_rest
    return position_mean(kl, weight) * tau * tau


def relative_mse(pred: torch.Tensor, target: torch.Tensor, dim: tuple[int, ...] | None = None) -> torch.Tensor:
    """||pred - target||^2 / ||target||^2, the norms over the dimensions `dim` (default: all of them)."""
    dim = tuple(range(pred.dim())) if dim is None else dim
    pred, target = pred.float(), target.float()
    return (pred - target).pow(2).sum(dim) / target.pow(2).sum(dim).clamp_min(1e-12)
