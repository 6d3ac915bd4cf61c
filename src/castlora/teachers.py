"""Teachers and objectives, registered by name.

A teacher is the distribution the student (the target with its ported deltas) learns at every aligned
position. CAST's teachers are one family: log p_S+LoRA + w (log p_T - log p_S), renormalised over the
shared vocabulary, where w says how much of the source base's own habits is swapped for the target
base's (w = 0: source+LoRA itself; w = 1: the target base tilted by exactly what the LoRA changes on the
source). An objective compares the teacher's output with the student's log-probs.

An experiment adds a teacher or an objective by registering it here (`@register_teacher("name")`,
`@register_objective("name")`) and naming it in its settings; nothing patches a module attribute.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from .capture import capture
from .cast_module import PortedKernel, deltas_off
from .families import Site
from .losses import delta_teacher, kl_divergence, shared_log_probs, topk_kl
from .teacher_cache import TeacherOutput
from .tokens import PairBatch, SharedVocab

TEACHERS: dict[str, Callable[..., "Teacher"]] = {}
OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {}


def register_teacher(name: str):
    def add(factory):
        TEACHERS[name] = factory
        return factory
    return add


def register_objective(name: str):
    def add(fn):
        OBJECTIVES[name] = fn
        return fn
    return add


class Teacher(ABC):
    """The source side of a step (no grad): the teacher's log-probs at the aligned positions and,
    for the MSE term, each kernel's view of its source-site inputs."""

    needs_target: bool = False  # does the teacher read the target base (a cache keys on the target then)

    def __init__(self, teacher_lora: bool = True):
        # False: the source base in the place of source+LoRA, the imitation control
        self.teacher_lora = teacher_lora

    @abstractmethod
    def outputs(self, pair, batch: PairBatch, cols: SharedVocab, tau: float, want_z: bool) -> TeacherOutput:
        ...


class MixedTeacher(Teacher):
    """log p_S+LoRA + w (log p_T - log p_S): the registered CAST teachers differ only in w."""

    def __init__(self, weight: float, name: str, teacher_lora: bool = True):
        super().__init__(teacher_lora)
        self.weight, self.name = float(weight), name
        self.needs_target = self.weight != 0

    def outputs(self, pair, batch: PairBatch, cols: SharedVocab, tau: float, want_z: bool) -> TeacherOutput:
        source_paths = sorted({p.source_module for p, _ in pair.ports}) if want_z else []

        def logp_source(use_lora: bool):
            with capture(pair.source_inner, inputs=source_paths if use_lora else ()) as cap:
                if use_lora:
                    out = pair.source(input_ids=batch.ids_s, attention_mask=batch.mask_s)
                else:
                    with pair.source.disable_adapter():
                        out = pair.source(input_ids=batch.ids_s, attention_mask=batch.mask_s)
            return shared_log_probs(batch.gather(out.logits, "s"), cols.ids_s, tau), cap.inputs

        with torch.no_grad():
            # the LoRA's view of its inputs is read even for the control: the MSE term is the same in both
            lp_lora, inputs = logp_source(True)
            z = source_z(pair.ports, inputs, batch) if want_z else None
            if self.teacher_lora and self.weight == 0:
                return TeacherOutput(logp=lp_lora, z=z)
            lp_base, _ = logp_source(False)
            lp_teach = lp_lora if self.teacher_lora else lp_base
            if self.weight == 0:
                return TeacherOutput(logp=lp_teach, z=z)
            with deltas_off(pair.wrappers):
                t_logits = pair.target(input_ids=batch.ids_t, attention_mask=batch.mask_t).logits
            lp_t = shared_log_probs(batch.gather(t_logits, "t"), cols.ids_t, tau)
            return TeacherOutput(logp=delta_teacher(lp_t, lp_teach.to(lp_t.device), lp_base.to(lp_t.device),
                                                    self.weight), z=z)


@register_teacher("source")
def source_teacher(delta_weight: float = 0.5, teacher_lora: bool = True) -> Teacher:
    return MixedTeacher(0.0, "source", teacher_lora)


@register_teacher("delta")
def delta_teacher_(delta_weight: float = 0.5, teacher_lora: bool = True) -> Teacher:
    return MixedTeacher(1.0, "delta", teacher_lora)


@register_teacher("blend")
def blend_teacher(delta_weight: float = 0.5, teacher_lora: bool = True) -> Teacher:
    return MixedTeacher(delta_weight, "blend", teacher_lora)


def make_teacher(name: str, delta_weight: float = 0.5, teacher_lora: bool = True) -> Teacher:
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; registered: {', '.join(TEACHERS)}")
    return TEACHERS[name](delta_weight=delta_weight, teacher_lora=teacher_lora)


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


@register_objective("kl")
def forward_kl(teacher: TeacherOutput, logp_student: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(teacher || student) at the aligned positions, times tau^2 (over the teacher's top-k and one
    bucket for the rest when the teacher comes from a cache)."""
    if teacher.logp is not None:
        return kl_divergence(teacher.logp, logp_student, tau, teacher.weight)
    return topk_kl(teacher.values, teacher.index, logp_student, tau, teacher.weight)


__all__ = ["TEACHERS", "OBJECTIVES", "Teacher", "MixedTeacher", "register_teacher", "register_objective",
           "make_teacher", "source_z", "forward_kl"]
